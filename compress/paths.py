"""Resolve paths from recipes and the command line."""

from __future__ import annotations

from pathlib import Path

from . import reference


def resolve_path(value: str, base_dir: Path | None) -> Path:
    """``reference:<name>/<file>`` -> cached reference file; relative paths -> under base_dir."""
    if value.startswith(reference.SCHEME):
        return reference.resolve(value[len(reference.SCHEME):])
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p
