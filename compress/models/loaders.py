"""Build a ModelHandle from a recipe's ModelSpec."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from ..specs import ModelSpec
from .handle import ModelHandle, SentenceEmbedder

# HF model types whose encoder we know how to load, patch and export.
SUPPORTED_HF_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MAX_LISTED_KEYS = 12


def load_model(spec: ModelSpec, path: Path | None) -> ModelHandle:
    """Load the model named by ``spec``; ``path`` is the resolved weights file/folder/ONNX file."""
    if spec.source == "timm":
        return _load_timm(spec, path)
    if spec.source == "hf":
        return _load_hf(spec, path)
    return _load_onnx(spec, path)


# --------------------------------------------------------------------------- timm


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist; pass the .safetensors or "
                             ".pt file of the trained model (model.weights or --model)")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"weights file {path.name!r}: expected one of "
                             f"{', '.join(WEIGHT_SUFFIXES)}, got {suffix or 'no extension'!r}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        why = str(e).splitlines()[0][:300]
        hint = (" The file holds Python objects that are not plain tensors; save it with "
                "torch.save(model.state_dict()) or as .safetensors." if "weights_only" in str(e)
                or "Unsupported global" in str(e) else "")
        raise ModelLoadError(f"cannot read weights file {path.name!r}: {why}.{hint}") from None
    # Unwrap common training-checkpoint layouts.
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path.name!r} is not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise ModelLoadError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if shaped:
            parts.append(f"mis-shaped keys: {_fmt_keys(shaped)}")
        raise ModelLoadError(
            f"{where} do not fit the architecture: " + "; ".join(parts) +
            ". Check model.name and model.kwargs (e.g. num_classes, img_size) match the training run.")


def _load_timm(spec: ModelSpec, weights: Path | None) -> ModelHandle:
    import timm
    import timm.data

    name = spec.name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnsupportedModelError(f"model.name {name!r} is not a timm architecture.{hint} "
                                    "See timm.list_models() for the names this install knows.")
    if weights is None:
        raise ModelLoadError("model.weights is required for timm models (a .safetensors or .pt "
                             "file); compress never downloads pretrained weights")
    try:
        model = timm.create_model(name, pretrained=False, **spec.kwargs)
    except TypeError as e:
        raise ModelLoadError(f"model.kwargs do not fit timm {name!r}: {e}") from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ModelLoadError(f"timm could not build {name!r} with model.kwargs {spec.kwargs}: "
                             f"{e}") from None
    state = read_state_dict(weights)
    notes = []
    if getattr(model, "num_classes", None) == 0:
        # A classifier's checkpoint loaded as a feature extractor: the head is dropped on
        # purpose (num_classes 0), so its weights are expected and left out.
        head = [k for k in state if k.startswith("head.") and k not in model.state_dict()]
        if head:
            state = {k: v for k, v in state.items() if k not in head}
            notes.append(f"model.kwargs num_classes=0: ignored the checkpoint's classifier "
                         f"weights ({', '.join(sorted(head))})")
    check_state_dict(model, state, f"weights {weights.name!r}")
    model.load_state_dict(state, strict=True)
    model.eval()
    cfg = timm.data.resolve_data_config(model=model)
    # pretrained_cfg keeps the default resolution even when kwargs changed img_size/in_chans.
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        chans = getattr(getattr(pe, "proj", None), "in_channels", cfg["input_size"][0])
        cfg["input_size"] = (chans, *tuple(pe.img_size))
    chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        if len(cfg[key]) != chans:
            avg = sum(cfg[key]) / len(cfg[key])
            cfg[key] = (avg,) * chans
    pp = spec.preprocess
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        value = getattr(pp, key)
        if value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    if len(cfg["input_size"]) != 3:
        raise ModelLoadError(f"model.preprocess.input_size must be [channels, height, width], "
                             f"got {list(cfg['input_size'])}")
    handle = ModelHandle(task=spec.resolved_task, source="timm", name=name, module=model,
                         data_config=cfg, token_map=_outputs_token_map(model))
    handle.info["load_notes"] = notes
    return handle


def _outputs_token_map(model: torch.nn.Module) -> bool:
    """True when a timm model returns its token map [B, N, C] (no pooling, no attention pool)."""
    return (getattr(model, "global_pool", None) == "" and
            getattr(model, "attn_pool", None) is None and hasattr(model, "blocks"))


# --------------------------------------------------------------------------- Hugging Face


def _load_hf(spec: ModelSpec, folder: Path | None) -> ModelHandle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused-pooler-weights notice is expected here

    if folder is None or not folder.is_dir():
        raise ModelLoadError(f"model.path {str(folder)!r} is not a folder; pass a Hugging Face "
                             "model folder holding config.json, the tokenizer and "
                             "model.safetensors")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(folder)!r} has no config.json; it is not a "
                             "Hugging Face model folder")
    if spec.resolved_task != "text-embedding":
        raise UnsupportedModelError(f"model.task {spec.resolved_task!r} is not supported for "
                                    "Hugging Face models; use text-embedding")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON: {e}") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        raise UnsupportedModelError(
            f"model folder {folder.name!r} holds a {model_type!r} model; supported encoder "
            f"families: {', '.join(SUPPORTED_HF_TYPES)}")
    if cfg.get("auto_map"):
        raise UnsupportedModelError(f"model folder {folder.name!r} needs custom code (auto_map in "
                                    "config.json); compress never runs code from model folders")
    if not list(folder.glob("*.safetensors")):
        raise ModelLoadError(f"model folder {folder.name!r} has no .safetensors weights; pickled "
                             "pytorch_model.bin is refused. Convert it with "
                             "model.save_pretrained(dir, safe_serialization=True)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        transformer = AutoModel.from_pretrained(
            str(folder), config=config, local_files_only=True, use_safetensors=True,
            attn_implementation="eager", trust_remote_code=False, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load Hugging Face model from {folder.name!r}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    transformer.eval()
    module = SentenceEmbedder(transformer, pooling=spec.pooling, normalize=spec.normalize).eval()
    max_pos = int(getattr(config, "max_position_embeddings", 512))
    if model_type in ("roberta", "xlm-roberta"):
        max_pos -= 2  # RoBERTa offsets positions by the padding index
    return ModelHandle(task="text-embedding", source="hf", name=folder.name, module=module,
                       tokenizer=tokenizer, max_positions=max_pos)


# --------------------------------------------------------------------------- ONNX


def _load_onnx(spec: ModelSpec, path: Path | None) -> ModelHandle:
    import onnx

    if path is None or not path.is_file():
        raise ModelLoadError(f"model.path {str(path)!r} is not a file; pass an .onnx file")
    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several unrelated types
        raise ModelLoadError(f"{path.name}: not a valid ONNX model: "
                             f"{str(e).splitlines()[0][:300]}") from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    task = spec.resolved_task
    if task == "image-classification":
        if len(inputs) != 1:
            raise UnsupportedModelError(f"{path.name}: an image classifier needs one input, the "
                                        f"graph has {[i.name for i in inputs]}")
        dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            raise UnsupportedModelError(f"{path.name}: input {inputs[0].name!r} has shape {dims}; "
                                        "expected [batch, channels, height, width] with fixed C, H, W")
        data_config = {"input_size": tuple(dims[1:]), "mean": (0.0,) * dims[1],
                       "std": (1.0,) * dims[1], "interpolation": "bilinear", "crop_pct": 1.0}
        pp = spec.preprocess
        for key in ("mean", "std", "interpolation", "crop_pct"):
            if getattr(pp, key) is not None:
                v = getattr(pp, key)
                data_config[key] = tuple(v) if isinstance(v, list) else v
        return ModelHandle(task=task, source="onnx", name=path.stem, onnx_path=path,
                           data_config=data_config)
    names = {i.name for i in inputs}
    if not {"input_ids", "attention_mask"} <= names:
        raise UnsupportedModelError(f"{path.name}: a text encoder needs inputs input_ids and "
                                    f"attention_mask; the graph has {sorted(names)}")
    raise UnsupportedModelError(f"{path.name}: ONNX text encoders need a tokenizer; load the "
                                "Hugging Face folder (source: hf) instead")
