"""Generate the recipe reference (docs/recipes.md) from the pydantic models themselves.

A test regenerates it and compares with the committed file, so the reference never drifts
from the code: change a field, run ``compress recipe docs > docs/recipes.md``.
"""

from __future__ import annotations

import json
import textwrap

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


def _type_name(annotation) -> str:
    s = str(annotation)
    for junk in ("typing.", "<class '", "'>", "compress.specs.", "compress.passes."):
        s = s.replace(junk, "")
    return s.replace("|", "\\|")


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
        rows.append(f"|`{name}`|{_type_name(f.annotation)}|{_default(f)}|{desc}|")
    return "\n".join(rows)


def generate() -> str:
    parts = [INTRO]
    sections = [
        ("model", ModelSpec, "Where the model comes from."),
        ("model.preprocess", PreprocessSpec, PreprocessSpec.__doc__),
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
