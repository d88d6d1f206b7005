"""Recipes: versioned YAML validated by pydantic, unknown fields forbidden.

A recipe says which model to load, which data to calibrate and evaluate on, which passes to run
in order and how to export. Errors name the exact field path (``passes.0.weights.bits``).
"""

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from . import passes as _passes  # noqa: F401  (registers every pass before the union is built)
from .errors import RecipeError
from .registry import all_passes
from .specs import (
    MAX_NAME_CHARS,
    CalibrationSpec,
    EvaluationSpec,
    ExportSpec,
    ModelSpec,
    StrictModel,
)

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short YAML file; one limit for CLI and service


def _pass_union():
    configs = [e.config_cls for e in all_passes().values()]
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator="type")]  # noqa: UP007


def _build_recipe_class():
    pass_union = _pass_union()

    class Recipe(StrictModel):
        """A compression recipe (version 1)."""

        version: Literal[1] = Field(description="recipe format version; this build reads 1")
        name: str = Field("", max_length=MAX_NAME_CHARS)
        description: str = Field("", max_length=10_000)
        device: Literal["auto", "cpu", "cuda"] = Field(
            "auto", description="where calibration and training run; auto picks CUDA if present")
        model: ModelSpec
        calibration: CalibrationSpec | None = None
        evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
        passes: list[pass_union] = Field(default_factory=list)  # type: ignore[valid-type]
        export: ExportSpec = Field(default_factory=ExportSpec)
        # Folder that relative paths resolve against (the recipe file's folder, or the CWD).
        _base_dir: str | None = PrivateAttr(None)

        @model_validator(mode="after")
        def _check_passes(self):
            registry = all_passes()
            seen_onnx = False
            for i, p in enumerate(self.passes):
                entry = registry[p.type]
                if entry.calibration_needed(p) and self.calibration is None:
                    raise ValueError(f"passes.{i} ({p.type}) needs calibration data: add a "
                                     "'calibration:' section with a path (or pass --calib)")
                if entry.stage == "onnx":
                    seen_onnx = True
                elif seen_onnx:
                    raise ValueError(f"passes.{i} ({p.type}) works on the torch model but comes "
                                     "after an ONNX-stage pass; put torch passes first")
                if self.model.source == "onnx" and entry.stage == "torch":
                    raise ValueError(f"passes.{i} ({p.type}) needs a torch model, but the model "
                                     "source is 'onnx'; use an ONNX-stage pass or a timm/hf model")
            return self

    return Recipe


Recipe = _build_recipe_class()


def _format_loc(loc: tuple) -> str:
    parts = []
    for i, p in enumerate(loc):
        # Discriminated unions add the tag ('quantize') after the list index; drop it.
        if i >= 2 and loc[i - 2] == "passes" and isinstance(loc[i - 1], int):
            continue
        if isinstance(p, str) and (p.startswith("function-") or _UNION_TAG.fullmatch(p)):
            continue
        parts.append(str(p))
    return ".".join(parts)


# Union members that pydantic adds to an error's loc ('img_size.constrained-int'); not fields.
_UNION_TAG = re.compile(r"(constrained-)?(int|float|bool|str)|(list|tuple|dict|literal)\[.*\]")
# Type mismatches against the other members of a union: noise when a member gave a real reason.
_UNION_MISMATCH = {"int_type", "int_parsing", "float_type", "float_parsing", "bool_type",
                   "string_type", "list_type", "tuple_type", "dict_type", "model_type",
                   "literal_error", "int_from_float"}


# A recipe of thousands of misspelt keys must not cost seconds or answer megabytes.
MAX_REPORTED_ERRORS = 50


def _format_errors(errors: list[dict]) -> list[tuple[str, str]]:
    formatted = [(_format_error(err), err["type"]) for err in errors]
    # A union mismatch at a path is noise when a more specific reason sits at or under it:
    # collect every prefix of every reason's path once (linear, not pairwise).
    covered = set()
    for (path, _), kind in formatted:
        if kind not in _UNION_MISMATCH:
            parts = path.split(".")
            covered.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    unique: dict[tuple[str, str], None] = {}
    for (path, msg), kind in formatted:
        if not (kind in _UNION_MISMATCH and path in covered):
            unique.setdefault((path, msg), None)
    out = list(unique)
    if len(out) > MAX_REPORTED_ERRORS:
        more = len(out) - MAX_REPORTED_ERRORS
        out = out[:MAX_REPORTED_ERRORS] + [("", f"... and {more} more problems not listed; "
                                                "fix the ones above first")]
    return out


def _format_error(err: dict) -> tuple[str, str]:
    path = _format_loc(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (not allowed here); check its spelling and indentation"
    elif err["type"] == "union_tag_invalid":
        given = err.get("input")
        tag = str(given.get("type", "")) if isinstance(given, dict) else ""
        known = sorted(all_passes())
        close = difflib.get_close_matches(tag, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        msg = f"unknown pass type {tag!r}.{hint} Known passes: {', '.join(known)}"
        path = path + ".type" if path else "type"
    elif err["type"] == "union_tag_not_found":
        msg = "each pass needs a 'type' naming it, e.g. 'type: quantize'"
    elif err["type"] == "literal_error" and err["loc"] == ("version",):
        msg = f"{msg} (this build reads recipe version {RECIPE_VERSION})"
    if err["type"] not in ("extra_forbidden", "missing") and "input" in err and \
            not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return path, msg.removeprefix("Value error, ")


def _apply_override(data: dict, assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. "
                          "passes.0.weights.bits=4")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as e:  # a tag (!!python/...), bad or too deep YAML
        problem = getattr(e, "problem", None) or "nested too deeply"
        raise RecipeError(f"--set {key}: the value is not plain YAML ({problem}); give a "
                          "number, string, list or mapping", [(key, f"invalid value: {problem}")]
                          ) from None
    set_dotted(data, key, value)


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists, creating missing sections."""
    parts = key.split(".")
    node: Any = data
    for j, part in enumerate(parts):
        last = j == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {'.'.join(parts[:j])} has {len(node)} entries; "
                                  f"{part!r} is not an index into it")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # missing, or an empty section (`calibration: null`)
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"--set {key}: {'.'.join(parts[:j])} is a value, not a section")


def parse_recipe(data: Any, *, source: str = "<recipe>", overrides: list[str] = (),
                 values: dict[str, Any] | None = None) -> Recipe:
    """Validate already-parsed YAML (a dict) into a Recipe.

    ``overrides`` are ``KEY=VALUE`` strings (values parsed as YAML); ``values`` maps dotted keys
    to values set as they are (used for paths given on the command line).
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with 'version', "
                          f"'model', ...; got {type(data).__name__}", source=source)
    for o in overrides:
        _apply_override(data, o)
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = _format_errors(e.errors())
        errors, blamed = _blame_overrides(errors, overrides)
        what = f"{', '.join(f'--set {o}' for o in blamed)} (on {source})" if blamed else source
        raise RecipeError(f"{what}: invalid recipe ({len(errors)} problem"
                          f"{'s' if len(errors) != 1 else ''})", errors, source=source) from None


def _blame_overrides(errors: list[tuple[str, str]], overrides: list[str]
                     ) -> tuple[list[tuple[str, str]], list[str]]:
    """Name the --set that caused each error: a field at, above or below an override's key.

    Returns the errors (messages marked "(from --set KEY=VALUE)") and the overrides to blame
    when every error comes from one of them, so the headline names the override, not the file.
    """
    keys = [(o.partition("=")[0], o) for o in overrides]
    marked, blamed, all_from_overrides = [], [], bool(errors)
    for path, msg in errors:
        cause = next((o for k, o in reversed(keys) if path == k or path.startswith(k + ".")
                      or (path and k.startswith(path + "."))), None)
        if cause is None:
            all_from_overrides = False
            marked.append((path, msg))
            continue
        marked.append((path, f"{msg} (from --set {cause})"))
        if cause not in blamed:
            blamed.append(cause)
    return marked, blamed if all_from_overrides else []


def load_recipe(path: str | Path, *, overrides: list[str] = (),
                values: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file. Relative data/model paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass the path of a YAML "
                          "recipe, or one of the bundled recipes in recipes/", source=str(path))
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe "
                          "is a short YAML file", source=str(path))
    text = path.read_text(encoding="utf-8", errors="replace")
    recipe = recipe_from_yaml(text, source=str(path), overrides=overrides, values=values)
    recipe._base_dir = str(path.resolve().parent)
    return recipe


def recipe_from_yaml(text: str, *, source: str = "<recipe>", overrides: list[str] = (),
                     values: dict[str, Any] | None = None) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except RecursionError:  # PyYAML recurses once per nesting level
        raise RecipeError(f"{source}: not valid YAML: nested too deeply (a recipe is a few "
                          "levels deep)", source=source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}", source=source) from None
    return parse_recipe(data, source=source, overrides=overrides, values=values)


def recipe_base_dir(recipe: Recipe) -> Path | None:
    return Path(recipe._base_dir) if recipe._base_dir else None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
