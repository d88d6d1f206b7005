"""What makes an output folder self-describing: ONNX metadata, the files other tools read.

Every ONNX file compress writes carries ``metadata_props`` (read back with
``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``):

  producer, compress_version   who wrote it
  recipe_sha256                SHA-256 of the recipe as written to recipe.yaml, as canonical JSON
                               (keys sorted, no spaces: ``canonical_json``)
  source_weights_sha256        SHA-256 of the original weights file (a model folder: of its
                               ``sha256  name`` lines over its .safetensors files, sorted)
  task, model_name, model_source
  inputs, outputs              JSON lists of {name, dtype, shape} (symbolic dims by name)
  preprocessing                JSON: image mean/std/size/interpolation/crop (timm's data config
                               or the preprocessor config) or the tokenizer and pooling
  labels                       JSON list of class names, where known

Beside the ONNX files: Hugging Face models get their config.json, tokenizer and preprocessor
files copied from the input folder (so optimum's ``ORTModelFor...from_pretrained(out)`` opens
the folder), timm models a config.json in timm's own ``pretrained_cfg`` layout
(``timm.models._hub.save_config_for_hf``), and a compressed-tensors copy the tokenizer and
sentence-transformers module files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import onnx

from .. import __version__
from ..checksums import sha256_file
from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

PRODUCER = "compress"
# Files of a Hugging Face model folder that describe how to feed the model (never weights).
HF_CONSUMER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                     "merges.txt", "sentencepiece.bpe.model", "spm.model", "spiece.model",
                     "preprocessor_config.json")


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def recipe_sha256(recipe: dict) -> str:
    """SHA-256 of ``recipe`` (the recipe.yaml content) as canonical JSON."""
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()


def source_weights_sha256(path: Path | None) -> str | None:
    """The weights file's SHA-256; for a model folder, SHA-256 of its SHA256SUMS-style lines
    (``<sha256>  <name>``, sorted by name) over the weight files in it."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    lines = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest() if files else None


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "unknown"


def _value_infos(values, skip: set[str]) -> list[dict]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _dtype_name(t.elem_type), "shape": shape})
    return out


def onnx_io(path: Path) -> dict[str, list[dict]]:
    """Graph inputs (initializers left out) and outputs with dtypes and (symbolic) shapes."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return {"inputs": _value_infos(proto.graph.input, inits),
            "outputs": _value_infos(proto.graph.output, set())}


def _plain(value):
    """Tuples -> lists, recursively (JSON and comparisons in tests)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def preprocessing(handle: ModelHandle, source_dir: Path | None, max_length: int) -> dict:
    """How to turn raw input into the ONNX inputs, as compress itself does it."""
    if handle.task == "text-embedding":
        tok = handle.tokenizer
        pooling = getattr(handle.module, "pooling", None)
        normalize = getattr(handle.module, "normalize", None)
        return {"kind": "text", "tokenizer": type(tok).__name__ if tok is not None else None,
                "max_length": min(max_length, handle.max_positions),
                "padding": "longest", "truncation": True,
                "pooling": pooling, "normalize": normalize,
                "tokenizer_files": "copied beside the ONNX file" if source_dir else None}
    cfg = dict(handle.data_config or {})
    out = {"kind": "image", "layout": "NCHW", "dtype": "float32",
           **{k: _plain(cfg[k]) for k in ("input_size", "mean", "std", "interpolation",
                                           "crop_pct", "crop_mode") if k in cfg}}
    out["source"] = {"timm": "timm data config (pretrained_cfg, recipe overrides)",
                     "hf": "preprocessor_config.json", "onnx": "recipe model.preprocess"
                     }.get(handle.source)
    if handle.source == "hf" and source_dir is not None and \
            (source_dir / "preprocessor_config.json").is_file():
        try:
            out["preprocessor_config"] = json.loads(
                (source_dir / "preprocessor_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass  # the loader already refused a broken file; nothing more to add
    return out


def labels(handle: ModelHandle, eval_path: Path | None,
           num_outputs: int | None) -> list[str] | None:
    """Class names by output index, where known: a Hugging Face config's id2label, timm's
    pretrained_cfg label_names, else the class folders of an image-folder evaluation set (the
    order compress's data loader numbers them in). Only a list with one name per output."""
    if handle.task != "image-classification" or handle.token_map:
        return None
    names = _label_names(handle, eval_path)
    return names if names and len(names) == num_outputs else None


def _label_names(handle: ModelHandle, eval_path: Path | None) -> list[str] | None:
    module = handle.module
    hf = getattr(module, "hf_model", None)
    id2label = getattr(getattr(hf, "config", None), "id2label", None)
    if id2label:
        names = [str(id2label[i]) for i in sorted(id2label)]
        # transformers fills LABEL_0.. when a config names no classes: not real labels.
        if not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return names
    pcfg = getattr(module, "pretrained_cfg", None) or {}
    if pcfg.get("label_names"):
        names = pcfg["label_names"]
        return [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else \
            [str(n) for n in names]
    if eval_path is not None and eval_path.is_dir():
        classes = sorted(p.name for p in eval_path.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        return classes or None
    return None


def timm_config(handle: ModelHandle, kwargs: dict) -> dict | None:
    """config.json in timm's Hugging Face layout (architecture, num_classes, model_args,
    pretrained_cfg) from the loaded model, with the preprocessing compress used. Must run
    before any pass patches the model (class swaps lose the factory's recorded arguments)."""
    if handle.source != "timm" or handle.module is None:
        return None
    import tempfile

    from timm.models._hub import save_config_for_hf

    data = {k: _plain(v) for k, v in (handle.data_config or {}).items()
            if k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        try:
            save_config_for_hf(handle.module, str(path), model_args=dict(kwargs),
                               data_config=data)
        except (ValueError, TypeError, KeyError, AttributeError, AssertionError,
                RuntimeError) as e:
            # An auxiliary file: a model timm cannot describe still compresses.
            log.warning("timm config.json not written: %s: %s", type(e).__name__, e)
            return None
        return json.loads(path.read_text())


def onnx_metadata(*, handle: ModelHandle, recipe: dict, source_sha256: str | None,
                  io: dict, preprocess: dict, class_names: list[str] | None) -> dict[str, str]:
    """The metadata_props written into every ONNX file of a run (values are strings)."""
    props = {"producer": PRODUCER, "compress_version": __version__,
             "recipe_sha256": recipe_sha256(recipe),
             "source_weights_sha256": source_sha256 or "unknown",
             "task": handle.task, "model_name": handle.name, "model_source": handle.source,
             "inputs": canonical_json(io["inputs"]), "outputs": canonical_json(io["outputs"]),
             "preprocessing": canonical_json(preprocess)}
    if class_names:
        props["labels"] = canonical_json(class_names)
    return props


def write_onnx_metadata(path: Path, props: dict[str, str]) -> None:
    """Set ``props`` in the file's metadata_props (others kept; external data left in place)."""
    proto = onnx.load(str(path), load_external_data=False)
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for k, v in keep + sorted(props.items()):
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


def copy_hf_files(source_dir: Path, dest: Path) -> list[str]:
    """Copy the config, tokenizer and preprocessor files of a Hugging Face folder (plain files
    only, never weights); returns the names copied."""
    copied = []
    dest.mkdir(parents=True, exist_ok=True)
    for name in HF_CONSUMER_FILES:
        src = source_dir / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def write_sentence_transformers_files(dest: Path, hidden: int, pooling: str, normalize: bool,
                                      max_seq_length: int) -> None:
    """modules.json and module configs that make ``SentenceTransformer(dest)`` compute what the
    compressed ONNX model computes: the transformer, mean or [CLS] pooling, L2 normalization."""
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (dest / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    (dest / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (dest / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))


def complete_compressed_tensors(dest: Path, handle: ModelHandle, source_dir: Path | None,
                                max_length: int) -> None:
    """Make a compressed-tensors folder open on its own: tokenizer files and, for a sentence
    encoder, the sentence-transformers modules (transformers reads config.json from it)."""
    if source_dir is None or not (dest / "config.json").is_file():
        return
    for name in HF_CONSUMER_FILES:
        src = source_dir / name
        if name != "config.json" and src.is_file() and not src.is_symlink():
            shutil.copyfile(src, dest / name)
    if handle.task == "text-embedding" and handle.module is not None:
        cfg = json.loads((dest / "config.json").read_text())
        write_sentence_transformers_files(
            dest, int(cfg.get("hidden_size") or 0), getattr(handle.module, "pooling", "mean"),
            bool(getattr(handle.module, "normalize", True)),
            min(max_length, handle.max_positions))


def describe_source(handle: ModelHandle, model_path: Path | None, kwargs: dict) -> dict:
    """What must be read from the original model before any pass changes it."""
    return {"sha256": source_weights_sha256(model_path),
            "dir": model_path if model_path is not None and model_path.is_dir() else None,
            "timm_config": timm_config(handle, kwargs)}


def write_output_metadata(out: Path, onnx_paths: list[Path], *, handle: ModelHandle,
                          source: dict, recipe: dict, max_length: int,
                          eval_path: Path | None) -> dict:
    """Write the ONNX metadata, config.json and consumer files into ``out``; returns what the
    report records (the metadata without the repeated input/output lists)."""
    source_dir = source.get("dir") if handle.source == "hf" else None
    io = onnx_io(onnx_paths[0])
    preprocess = preprocessing(handle, source_dir, max_length)
    width = (io["outputs"][0]["shape"] or [None])[-1] if io["outputs"] else None
    class_names = labels(handle, eval_path, width if isinstance(width, int) else None)
    props = onnx_metadata(handle=handle, recipe=recipe, source_sha256=source.get("sha256"),
                          io=io, preprocess=preprocess, class_names=class_names)
    for path in onnx_paths:
        write_onnx_metadata(path, props)
    files = []
    if source_dir is not None:
        files = copy_hf_files(source_dir, out)
        complete_compressed_tensors(out / "compressed-tensors", handle, source_dir, max_length)
    elif source.get("timm_config") is not None:
        cfg = dict(source["timm_config"])
        if class_names and not cfg.get("label_names") and \
                len(class_names) == cfg.get("num_classes"):
            cfg["label_names"] = class_names
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        files = ["config.json"]
    return {"recipe_sha256": props["recipe_sha256"],
            "source_weights_sha256": source.get("sha256"), "io": io,
            "preprocessing": preprocess, "labels": class_names, "consumer_files": files}
