"""A job submission: the recipe (uploaded, as text, or bundled by name) checked for the service,
the uploaded model and data checked and unpacked, and the job queued (``prepare_job``)."""

from __future__ import annotations

from pathlib import Path

from compress.errors import InputError
from compress.recipe import recipe_to_yaml

from ..archives import ArchiveLimits
from ..recipes import bundled_recipe_text, bundled_recipes, check_recipe
from ..settings import Settings
from ..store import Job, JobStore
from ..uploads import MAX_RECIPE_BYTES, Form, prepare_data, prepare_model
from .errors import ApiError


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(settings.max_archive_bytes, settings.max_archive_files,
                         settings.max_archive_ratio)


def _recipe_text(form: Form, settings: Settings) -> tuple[str, str]:
    """(recipe text, its source name for messages)."""
    recipe_name = form.text("recipe_name")
    if "recipe" in form.files:
        upload = form.files["recipe"]
        if upload.size > MAX_RECIPE_BYTES:
            raise ApiError(413, f"recipe file is larger than {MAX_RECIPE_BYTES >> 20} MiB",
                           "UploadError", [{"loc": "recipe", "msg": "too large"}])
        text = upload.path.read_text(encoding="utf-8", errors="replace")
        upload.path.unlink()
        return text, "recipe"
    if form.text("recipe"):
        return form.text("recipe"), "recipe"
    if recipe_name:
        text = bundled_recipe_text(settings.recipes_dir, recipe_name)
        if text is None:
            names = ", ".join(r["name"] for r in bundled_recipes(settings.recipes_dir))
            raise ApiError(422, f"no bundled recipe {recipe_name[:100]!r}; known: {names}",
                           "RecipeError", [{"loc": "recipe_name", "msg": "unknown recipe"}])
        return text, recipe_name
    raise ApiError(422, "send a recipe: a 'recipe' file or text, or 'recipe_name' of a bundled "
                        "recipe", "RecipeError", [{"loc": "recipe", "msg": "field required"}])


def prepare_job(form: Form, tenant: str, job_id: str, job_dir: Path, store: JobStore,
                settings: Settings) -> Job:
    """Check the recipe and the uploads of one submission and queue the job (a worker thread:
    archives are extracted here)."""
    text, source = _recipe_text(form, settings)
    uploads = {k for k in form.files if k != "recipe"}
    recipe = check_recipe(text, uploads=uploads, overrides=form.fields.get("set", []),
                          source=source)
    limits = archive_limits(settings)
    inputs = {}
    if "model" in form.files:
        try:
            model_path = prepare_model(form.files["model"], limits)
        except InputError as e:
            raise ApiError(422, str(e), type(e).__name__,
                           [{"loc": "model", "msg": str(e)}]) from None
        check_model_fits(recipe.model.source, model_path)
        inputs["model"] = model_path.relative_to(job_dir).as_posix()
    for key in ("calib", "eval"):
        if key in form.files:
            try:
                data_path = prepare_data(form.files[key], limits)
            except InputError as e:
                raise ApiError(422, str(e), type(e).__name__,
                               [{"loc": key, "msg": str(e)}]) from None
            inputs[key] = data_path.relative_to(job_dir).as_posix()
    return store.create(tenant, name=recipe.name or form.text("recipe_name") or "job",
                        recipe_yaml=recipe_to_yaml(recipe), inputs=inputs, job_id=job_id)


def check_model_fits(source: str, path: Path) -> None:
    """The uploaded model is of the kind the recipe's ``model.source`` loads."""
    expected = {"timm": "a .safetensors or .pt/.pth weights file",
                "vim": "a .safetensors or .pt/.pth weights file",
                "onnx": "an .onnx file", "hf": "a zip/tar of a Hugging Face model folder"}[source]
    fits = {"timm": path.is_file() and path.suffix in (".safetensors", ".pt", ".pth"),
            "vim": path.is_file() and path.suffix in (".safetensors", ".pt", ".pth"),
            "onnx": path.is_file() and path.suffix == ".onnx",
            "hf": path.is_dir()}[source]
    if not fits:
        raise ApiError(422, f"model: the recipe's model.source is {source!r}, which needs "
                            f"{expected}; got {path.name!r}", "ModelLoadError",
                       [{"loc": "model", "msg": f"expected {expected}"}])
