"""README.md of an output folder: a model card with the verdict, the numbers, the recipe and how
to run the model with the tools users already have (onnxruntime, optimum, transformers).

Everything comes from the finished report (``report["verdict"]`` is reused, never recomputed)
and the metadata written into the ONNX files, so the card and report.json cannot disagree.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

# The snippets name the folder by this placeholder; tests substitute a real path.
FOLDER = "path/to/this/folder"


def _text(value) -> str:
    """Tenant text (recipe name, file names in warnings) as plain text: a Markdown renderer
    passes raw HTML through, so it must never become markup."""
    return html.escape(str(value), quote=False)


def _mb(n: int | None) -> str:
    if not n:
        return "n/a"
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _numbers(report: dict) -> list[str]:
    rows = ["| | original (fp32) | compressed |", "|---|---|---|"]
    size = report.get("size") or {}
    rows.append(f"| ONNX size | {_mb(size.get('original_bytes'))} | "
                f"{_mb(size.get('compressed_bytes'))} |")
    lat = report.get("latency") or {}
    speed = {s["batch"]: s["words"] for s in (report.get("verdict") or {}).get("speed", [])}
    for bs, ms in (lat.get("original") or {}).items():
        comp = (lat.get("compressed") or {}).get(bs)
        shown = f"{comp:.3f} ms" if comp is not None else "n/a"
        if str(bs) in speed:
            shown += f" ({speed[str(bs)]})"
        rows.append(f"| latency, batch {bs} ({lat.get('threads')} threads) | {ms:.3f} ms | "
                    f"{shown} |")
    metrics = report.get("metrics") or {}
    orig, comp = metrics.get("original") or {}, metrics.get("compressed") or {}
    # Against the original model's torch outputs (the original column is its fp32 ONNX).
    for key, value in comp.items():
        if isinstance(value, (int, float)):
            o = orig.get(key)
            rows.append(f"| {key} | {o:.4f} | {value:.4f} |" if isinstance(o, (int, float))
                        else f"| {key} | | {value:.4f} |")
    return rows


def _onnx_snippet(report: dict, meta: dict) -> str:
    io = meta.get("io") or {}
    inputs = [i["name"] for i in io.get("inputs", [])]
    output = (io.get("outputs") or [{"name": report["model"].get("output")}])[0]["name"]
    pre = meta.get("preprocessing") or {}
    lines = ["import numpy as np", "import onnxruntime as ort", "",
             f'folder = "{FOLDER}"',
             'session = ort.InferenceSession(f"{folder}/model.onnx", '
             'providers=["CPUExecutionProvider"])']
    if pre.get("kind") == "text":
        lines[2:2] = ["from transformers import AutoTokenizer"]
        lines += ["tokenizer = AutoTokenizer.from_pretrained(folder)",
                  f'batch = tokenizer(["A sentence to embed."], padding=True, truncation=True, '
                  f'max_length={pre.get("max_length", 128)}, return_tensors="np")',
                  f'feeds = {{name: batch[name].astype(np.int64) for name in {inputs!r}}}',
                  f'(embeddings,) = session.run(["{output}"], feeds)',
                  "print(embeddings.shape)"]
    else:
        mode = "L" if (pre.get("input_size") or [3])[0] == 1 else "RGB"
        lines[2:2] = ["from PIL import Image", "from timm.data import create_transform"]
        lines += [f"transform = create_transform(input_size={tuple(pre.get('input_size', []))}, "
                  f"mean={tuple(pre.get('mean', []))}, std={tuple(pre.get('std', []))},",
                  f"                             interpolation={pre.get('interpolation')!r}, "
                  f"crop_pct={pre.get('crop_pct', 1.0)!r})",
                  f'pixels = transform(Image.open("image.png").convert("{mode}"))'
                  ".unsqueeze(0).numpy()",
                  f'(out,) = session.run(["{output}"], {{"{inputs[0] if inputs else "x"}": '
                  "pixels})",
                  "print(out.shape)"]
        if meta.get("labels"):
            lines += ["import json",
                      'labels = json.loads(session.get_modelmeta().custom_metadata_map'
                      '["labels"])',
                      "print(labels[int(out[0].argmax())])"]
    return "\n".join(lines)


def _optimum_snippet(report: dict) -> str | None:
    model = report.get("model") or {}
    if model.get("source") != "hf":
        return None
    if model.get("task") == "text-embedding":
        return "\n".join([
            "from optimum.onnxruntime import ORTModelForCustomTasks",
            "from transformers import AutoTokenizer", "",
            f'folder = "{FOLDER}"',
            "# The ONNX model returns pooled, normalized sentence embeddings (not token states),",
            "# so it loads as a custom task; ORTModelForFeatureExtraction wants last_hidden_state.",
            "model = ORTModelForCustomTasks.from_pretrained(folder)",
            "tokenizer = AutoTokenizer.from_pretrained(folder)",
            'batch = tokenizer(["A sentence to embed."], padding=True, return_tensors="np")',
            "embeddings = model(input_ids=batch[\"input_ids\"], "
            "attention_mask=batch[\"attention_mask\"]).sentence_embedding"])
    return "\n".join([
        "from optimum.onnxruntime import ORTModelForImageClassification",
        "from transformers import AutoImageProcessor",
        "from PIL import Image", "",
        f'folder = "{FOLDER}"',
        "model = ORTModelForImageClassification.from_pretrained(folder)",
        "processor = AutoImageProcessor.from_pretrained(folder)",
        'logits = model(**processor(Image.open("image.png"), return_tensors="pt")).logits'])


def _compressed_tensors_snippet(report: dict) -> str:
    text = (report.get("model") or {}).get("task") == "text-embedding"
    lines = ["import torch", "from transformers import AutoModel", "",
             f'folder = "{FOLDER}/compressed-tensors"',
             "# compressed-tensors decompresses the packed weights on load",
             "model = AutoModel.from_pretrained(folder, dtype=torch.float32)"]
    if text:
        lines += ["", "# or, as a sentence encoder (same pooling and normalization as "
                  "model.onnx):",
                  "from sentence_transformers import SentenceTransformer",
                  'embeddings = SentenceTransformer(folder, device="cpu", '
                  'model_kwargs={"dtype": torch.float32}).encode(["A sentence to embed."])']
    return "\n".join(lines)


def model_card(report: dict, out_dir: Path, metadata: dict | None) -> str:
    meta = metadata or {}
    model = report.get("model") or {}
    verdict = (report.get("verdict") or {}).get("line", "")
    recipe = report.get("recipe") or {}
    name = recipe.get("name") or model.get("name") or "model"
    files = {a["name"]: a for a in (report.get("export") or {}).get("artifacts", [])}
    title = _text(name if name == model.get("name") else f"{name}: {model.get('name')}")
    parts = [f"# {title}, compressed with compress {report.get('compress_version')}", "",
             f"**Verdict:** {verdict}", "",
             f"Task: {model.get('task')}; source: {model.get('source')} "
             f"({model.get('params') or 'n/a'} parameters before compression). "
             f"Created {report.get('created_at')}. Full report: report.html / report.json.", "",
             "## Numbers", "", *_numbers(report), "",
             "## Files", ""]
    described = {
        "model.onnx": "the compressed model (ONNX; metadata inside, see below)",
        "model.fp32.onnx": "the original model, exported the same way (the baseline)",
        "config.json": "model configuration (Hugging Face config, or timm pretrained_cfg)",
        "recipe.yaml": "the recipe as run",
        "compressed-tensors/model.safetensors": "packed integer weights in the "
                                                "compressed-tensors format (transformers, vLLM)",
    }
    for rel in sorted(files):
        if rel in described:
            parts.append(f"- `{rel}` ({_mb(files[rel]['bytes'])}): {described[rel]}")
    extra = [f for f in meta.get("consumer_files", []) if f != "config.json"]
    if extra:
        parts.append(f"- {', '.join(f'`{f}`' for f in extra)}: copied from the input model "
                     "folder")
    parts += ["- `report.html`, `report.json`: the full report; `plots/`: its figures", "",
              "## Recipe", "",
              f"SHA-256 of the recipe as canonical JSON: `{meta.get('recipe_sha256')}`; "
              f"of the source weights: `{meta.get('source_weights_sha256')}`.", "",
              "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "",
              "## Run with ONNX Runtime", "",
              "Inputs: " + ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}"
                                     for i in (meta.get("io") or {}).get("inputs", [])) +
              "; outputs: " + ", ".join(f"`{o['name']}` {o['dtype']} {o['shape']}"
                                        for o in (meta.get("io") or {}).get("outputs", [])) +
              ".", "",
              "```python", _onnx_snippet(report, meta), "```", ""]
    optimum = _optimum_snippet(report)
    if optimum:
        parts += ["## Run with optimum", "", "```python", optimum, "```", ""]
    if (out_dir / "compressed-tensors" / "config.json").is_file():
        parts += ["## Load the compressed-tensors copy", "", "```python",
                  _compressed_tensors_snippet(report), "```", ""]
    parts += ["## Metadata in the ONNX file", "",
              "`onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map` holds "
              "`producer`, `compress_version`, `recipe_sha256`, `source_weights_sha256`, `task`, "
              "`inputs`, `outputs`, `preprocessing`"
              + (" and `labels`" if meta.get("labels") else "") + " (JSON strings).", "",
              "Preprocessing:", "", "```json",
              json.dumps(meta.get("preprocessing") or {}, indent=2), "```", ""]
    if report.get("warnings"):
        parts += ["## Warnings", "", *[f"- {_text(w)}" for w in report["warnings"]], ""]
    return "\n".join(parts)


def write_model_card(report: dict, out_dir: Path, metadata: dict | None) -> Path:
    path = out_dir / "README.md"
    path.write_text(model_card(report, out_dir, metadata))
    return path
