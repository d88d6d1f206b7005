"""Bundled recipes, and the checks a recipe must pass before the service queues it.

Besides the recipe schema, a recipe sent to the service may not name files on the server: every
model or data path must be uploaded with the job or point into the bundled reference models
(``reference:digits-vit/calib.npz``). Otherwise a recipe could make the server read any file
it can see. The other ways a recipe could name a file are closed by the schema itself
(compress.specs): ``model.kwargs`` is an allow-list of architecture arguments (no
``checkpoint_path``, ``pretrained_cfg`` or ``cache_dir``) and ``model.name`` cannot carry timm's
``hf-hub:`` or ``local-dir:`` prefixes.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import yaml

from compress import reference
from compress.bundled import bundled_recipe_path
from compress.errors import RecipeError
from compress.recipe import Recipe, parse_recipe

log = logging.getLogger("compress.service")

# upload field -> what it replaces in the recipe
UPLOAD_TARGETS = {"model": "model", "calib": "calibration.path", "eval": "evaluation.path"}


def bundled_recipes(recipes_dir: Path) -> list[dict]:
    """Every valid recipe in ``recipes_dir``: name, description, model, passes and YAML text."""
    out = []
    for path in sorted(recipes_dir.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        try:
            recipe = parse_recipe(yaml.safe_load(text), source=path.name)
        except RecipeError as e:  # a broken bundled file should not take the catalog down
            log.warning("skipping bundled recipe %s: %s", path.name, e)
            continue
        out.append({"name": path.stem, "title": recipe.name, "description": recipe.description,
                    "model_source": recipe.model.source, "task": recipe.model.resolved_task,
                    "passes": [p.type for p in recipe.passes], "yaml": text})
    return out


def bundled_recipe_text(recipes_dir: Path, name: str) -> str | None:
    path = bundled_recipe_path(name, recipes_dir)
    return path.read_text(encoding="utf-8") if path is not None else None


def _reference_problem(value: str) -> str | None:
    ref = value[len(reference.SCHEME):]
    name, _, rest = ref.partition("/")
    rel = PurePosixPath(rest)
    if name not in reference.names():
        return f"unknown reference model {name!r}; known: {', '.join(reference.names())}"
    if rel.is_absolute() or ".." in rel.parts or "\\" in rest:
        return "reference paths must stay inside the reference folder (no '..')"
    return None


def path_fields(recipe: Recipe) -> dict[str, str | None]:
    """The recipe's file paths by field path (what an upload can replace)."""
    return {f"model.{recipe.model.file_field}": recipe.model.file_value,
            "calibration.path": recipe.calibration.path if recipe.calibration else None,
            "evaluation.path": recipe.evaluation.path}


def check_recipe(text: str, *, uploads: set[str], overrides: list[str] = (),
                 source: str = "recipe") -> Recipe:
    """Validate a recipe for the service; RecipeError lists every problem with its field path.

    ``uploads`` names the files sent with the job (model, calib, eval): the fields they replace
    may hold anything, every other path must be a reference model path.
    """
    from compress.recipe import MAX_RECIPE_BYTES, recipe_from_yaml

    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB",
                          source=source)
    recipe = recipe_from_yaml(text, source=source, overrides=list(overrides))
    replaced = {UPLOAD_TARGETS[u] for u in uploads if u in UPLOAD_TARGETS}
    errors = []
    for field_path, value in path_fields(recipe).items():
        if field_path.startswith("model.") and "model" in replaced:
            continue
        if field_path in replaced:
            continue
        upload = next(k for k, v in UPLOAD_TARGETS.items() if field_path.startswith(v))
        if value is None:
            if field_path.startswith("model."):
                errors.append((field_path, f"no model: upload the checkpoint as '{upload}' or "
                                           "set a reference: path"))
            elif field_path == "calibration.path" and recipe.calibration is not None:
                errors.append((field_path, f"no calibration data: upload it as '{upload}' or "
                                           "set a reference: path"))
            continue
        if not value.startswith(reference.SCHEME):
            errors.append((field_path, f"the service does not read server paths ({value!r}); "
                                       f"upload the file as '{upload}' or use a "
                                       "reference:<model>/<file> path"))
            continue
        problem = _reference_problem(value)
        if problem:
            errors.append((field_path, problem))
    if errors:
        raise RecipeError(f"{source}: the service cannot run this recipe ({len(errors)} "
                          f"problem{'s' if len(errors) != 1 else ''})", errors, source=source)
    return recipe
