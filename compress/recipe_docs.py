"""Generate the recipe reference (docs/recipes.md) from the pydantic models themselves.

A test regenerates it and compares with the committed file, so the reference never drifts
from the code: change a field, run ``compress recipe docs > docs/recipes.md``.
"""

from __future__ import annotations

import json
import textwrap
import types
from typing import Annotated, Literal, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .recipe import Recipe
from .registry import all_passes
from .specs import (
    CalibrationSpec,
    EvaluationSpec,
    ExportSpec,
    GateSpec,
    LatencySpec,
    ModelSpec,
    PreprocessSpec,
    TimmKwargs,
    VimSpec,
)

INTRO = """# Recipe reference

A recipe is a YAML file validated before anything runs. Unknown fields are errors, and every
error names its field path (`passes.0.weights.bits`). Relative paths resolve against the
recipe's folder; `reference:<name>/<file>` names a bundled reference model or data set
(`compress reference build` lists them). The CLI's `--model`, `--calib`, `--eval` replace the
model and data paths, and `--set KEY=VALUE` edits any field (`--set passes.0.weights.bits=4`).
`compress recipe schema` prints the JSON Schema; `compress recipe validate FILE` checks a file.

This page is generated from the code by `compress recipe docs`.

```yaml
version: 1                 # required; this build reads version 1
name: my-model-w8a8
device: auto               # auto | cpu | cuda: where calibration and training run
model: {...}               # what to load
calibration: {...}         # data the passes calibrate on (needed by some passes)
evaluation: {...}          # data the report and the quality gate measure on
passes: [...]              # ordered; torch passes first, then ONNX passes
export: {...}              # ONNX export settings
```
"""


def _bounds(metadata, unit: str = "items") -> str:
    """Pydantic constraints as text: ``1 to 1,024``, ``>= 0``, ``1 to 16 items``."""
    lo = hi = None
    lo_op, hi_op = ">=", "<="
    n_min = n_max = None
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, lo_op = m.gt, ">"
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi, hi_op = m.lt, "<"
        elif isinstance(m, annotated_types.MinLen):
            n_min = m.min_length
        elif isinstance(m, annotated_types.MaxLen):
            n_max = m.max_length
    parts = []
    if lo is not None and hi is not None and lo_op == ">=" and hi_op == "<=":
        parts.append(f"{lo:,} to {hi:,}")
    else:
        parts += [f"{op} {v:,}" for op, v in ((lo_op, lo), (hi_op, hi)) if v is not None]
    if n_max is not None:
        parts.append(f"{n_max:,} {unit}" if n_min == n_max else
                     f"{n_min:,} to {n_max:,} {unit}" if n_min else f"up to {n_max:,} {unit}")
    elif n_min:
        parts.append(f"at least {n_min} {unit}")
    return ", ".join(parts)


def _type_name(annotation, metadata=()) -> str:
    """A readable type with its bounds: ``list[int 1 to 1024] (1 to 16 items)``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner, *meta = args
        for m in meta:  # Field(...) inside Annotated carries its constraints in .metadata
            meta += getattr(m, "metadata", [])
        return _type_name(inner, [*meta, *metadata])
    is_str = annotation is str or str in args
    bounds = _bounds(metadata, "chars" if is_str else "items")
    suffix = f" ({bounds})" if bounds else ""
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args) + suffix
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]{suffix}"
    return getattr(annotation, "__name__", str(annotation)) + suffix


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def fields_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    rows = ["|field|type|default|description|", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        desc = (f.description or "").replace("|", "\\|")
        rows.append(f"|`{name}`|{_type_name(f.annotation, f.metadata)}|{_default(f)}|{desc}|")
    return "\n".join(rows)


def kwargs_table() -> str:
    rows = ["|argument|type|", "|---|---|"]
    for name, hint in get_type_hints(TimmKwargs, include_extras=True).items():
        rows.append(f"|`{name}`|{_type_name(hint)}|")
    return "\n".join(rows)


def generate() -> str:
    parts = [INTRO]
    sections = [
        ("model", ModelSpec, "Where the model comes from."),
        ("model.preprocess", PreprocessSpec, PreprocessSpec.__doc__),
        ("model.vim", VimSpec, VimSpec.__doc__),
        ("calibration", CalibrationSpec,
         "Calibration data: an image folder (one subfolder per class), an .npz/.npy array of "
         "model-ready inputs, a .txt file (one sentence per line) or .jsonl. A seeded subset of "
         "`num_samples` is used."),
        ("evaluation", EvaluationSpec,
         "Evaluation data (same formats; labels from class folders or an npz `labels` array), "
         "the quality gate and latency measurement. Without it, metrics use the calibration "
         "data and the report says so."),
        ("evaluation.gate", GateSpec, GateSpec.__doc__),
        ("evaluation.latency", LatencySpec, "ONNX Runtime latency of the original and the "
         "compressed model, measured side by side."),
        ("export", ExportSpec, "ONNX export. The original model is exported as "
         "model.fp32.onnx and the compressed one as model.onnx."),
    ]
    for title, model, doc in sections:
        parts.append(f"## `{title}`\n\n{textwrap.dedent(doc or '').strip()}\n\n"
                     f"{fields_table(model)}\n")
        if model is ModelSpec:
            doc = textwrap.dedent(TimmKwargs.__doc__.split("\n", 1)[1]).strip()
            parts.append(f"### `model.kwargs` (source timm)\n\n{doc} Source hf and onnx take "
                         f"no kwargs.\n\n{kwargs_table()}\n")
    parts.append("## `passes`\n\nEach entry has a `type` and that pass's fields. Torch passes "
                 "change the PyTorch model before export; ONNX passes rewrite the exported "
                 "graph afterwards.\n")
    for name, entry in sorted(all_passes().items()):
        doc = textwrap.dedent((entry.config_cls.__doc__ or "").split("\n", 1)[-1]).strip()
        summary = (entry.config_cls.__doc__ or "").strip().splitlines()[0]
        calib = entry.needs_calibration
        calib_text = ("needs calibration data" if calib is True else
                      "no calibration data" if calib is False else
                      "calibration data depending on its settings")
        parts.append(f"### `{name}` ({entry.stage} stage, {calib_text})\n\n{summary}\n\n"
                     f"{doc}\n\n{fields_table(entry.config_cls, skip=('type',))}\n")
        _ = Recipe  # the union these configs belong to
    return "\n".join(parts).rstrip() + "\n"
