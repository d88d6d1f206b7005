"""The web dashboard: one static page (its scripts and styles are mounted at /static)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard():
    return FileResponse(STATIC / "index.html", media_type="text/html")
