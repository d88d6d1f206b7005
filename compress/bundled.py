"""The bundled recipes (recipes/*.yaml), found by name.

They are package data: ``compress/bundled_recipes`` is a link to ``recipes/`` in a source
checkout and, in an installed wheel, a folder holding copies of them; this module is the one place
that finds them. Read as plain YAML on purpose: `compress recipe list` and name lookup must not
import the pass registry (torch and every pass) just to show a catalog. `compress recipe
validate` checks them.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

# Resolved, so that a checkout names them recipes/NAME.yaml (the path its users edit).
RECIPES_DIR = (Path(__file__).resolve().parent / "bundled_recipes").resolve()
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def bundled_recipe_path(name: str, recipes_dir: Path = RECIPES_DIR) -> Path | None:
    """recipes/NAME.yaml for a bundled recipe name (with or without .yaml), else None."""
    if not RECIPE_NAME.fullmatch(name):
        return None
    path = recipes_dir / f"{name.removesuffix('.yaml')}.yaml"
    return path if path.is_file() else None


def bundled_recipe_names(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def list_bundled(recipes_dir: Path = RECIPES_DIR) -> list[dict]:
    """name, model, passes and the first line of the description of every bundled recipe."""
    out = []
    for path in sorted(recipes_dir.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            out.append({"name": path.stem, "model": "?", "passes": [],
                        "description": "(not a valid recipe file)"})
            continue
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        shown = model.get("name") or model.get("path") or "?"
        passes = [p.get("type", "?") for p in data.get("passes") or [] if isinstance(p, dict)]
        description = str(data.get("description") or data.get("name") or "").strip()
        out.append({"name": path.stem, "model": f"{model.get('source', '?')}:{shown}",
                    "passes": passes, "description": description.splitlines()[0] if
                    description else ""})
    return out
