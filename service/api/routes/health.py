"""Liveness and readiness probes (no token needed)."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from compress import __version__

from ...schemas import Health
from ..deps import RunnerDep, SettingsDep, StoreDep
from ..errors import responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=responses())
def healthz():
    """Liveness: the process answers."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz", response_model=Health,
            responses={**responses(), 503: {"model": Health, "description": "not ready"}})
def readyz(store: StoreDep, settings: SettingsDep, runner: RunnerDep):
    """Readiness: database reachable, data folder writable, workers alive."""
    checks = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["database"] = f"error: {type(e).__name__}"
    checks["data_dir"] = "ok" if os.access(settings.data_dir, os.W_OK) else "not writable"
    checks["workers"] = "ok" if runner.healthy() else "not running"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", "version": __version__, "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)
