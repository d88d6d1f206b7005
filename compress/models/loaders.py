"""Build a ModelHandle from a recipe's ModelSpec."""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError, NonFiniteError, UnsupportedModelError
from ..specs import MAX_CHANNELS, MAX_IMAGE_SIDE, ModelSpec
from .handle import HFImageClassifier, ModelHandle, SentenceEmbedder

# HF model types whose encoder we know how to load and export (config.json model_type).
SUPPORTED_HF_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert",
                      "electra", "mpnet", "deberta", "deberta-v2", "ernie", "modernbert")
# HF image classifiers (AutoModelForImageClassification; output: logits).
SUPPORTED_HF_IMAGE_TYPES = ("vit", "deit", "beit", "swin", "dinov2", "convnext", "resnet")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MAX_LISTED_KEYS = 12


def load_model(spec: ModelSpec, path: Path | None) -> ModelHandle:
    """Load the model named by ``spec``; ``path`` is the resolved weights file/folder/ONNX file."""
    if spec.source == "timm":
        return _load_timm(spec, path)
    if spec.source == "hf":
        return _load_hf(spec, path)
    if spec.source == "vim":
        return _load_vim(spec, path)
    return _load_onnx(spec, path)


# --------------------------------------------------------------------------- timm


def check_finite(tensors, where: str) -> None:
    """Raise NonFiniteError naming the first tensors that hold NaN or Inf.

    NaN weights run without an error and give chance accuracy; ``where`` names the file.
    """
    bad = []
    for name, t in tensors:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")
    if bad:
        raise NonFiniteError(f"{where}: tensors hold NaN or Inf: {_fmt_keys(bad)}. The "
                             "checkpoint is damaged or training diverged; export it again from "
                             "a healthy run")


def check_input_size(size: tuple, where: str) -> None:
    """The same bounds as model.preprocess.input_size, for sizes read from a model's files."""
    c, h, w = size
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise UnsupportedModelError(
            f"{where}: input size {list(size)} is out of range; compress takes 1 to "
            f"{MAX_CHANNELS} channels and sides of 1 to {MAX_IMAGE_SIDE} pixels")


# Classes a training checkpoint may hold besides tensors and builtins, admitted to torch's
# weights_only unpickler: DeiT-style main.py (Vim, DeiT) saves its argparse arguments under
# "args". A Namespace is an attribute bag (no code runs to build it) and is dropped unread.
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects.

    ``.pt``/``.pth`` files go through ``torch.load(weights_only=True)``, which admits tensors,
    builtins and ``SAFE_CHECKPOINT_GLOBALS`` only; a training checkpoint's ``model`` (or
    ``state_dict``, ...) entry is unwrapped and everything else in it is dropped."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path.name!r} does not exist; pass the .safetensors "
                             "or .pt file of the trained model (model.weights or --model)")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file {path.name!r} is empty (0 bytes); pass the "
                             ".safetensors or .pt file of the trained model")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"weights file {path.name!r}: expected one of "
                             f"{', '.join(WEIGHT_SUFFIXES)}, got {suffix or 'no extension'!r}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        text = str(e).replace(str(path), path.name)
        why = (text.splitlines() or [type(e).__name__])[0][:300]
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
    if len(keys) <= MAX_LISTED_KEYS:
        return shown
    return shown + f", ... ({len(keys) - MAX_LISTED_KEYS} more)"


TIMM_SHAPE_HINT = ("Check model.name and model.kwargs (e.g. num_classes, img_size) match the "
                   "training run.")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                     hint: str = TIMM_SHAPE_HINT) -> None:
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
            f"{where} do not fit the architecture: " + "; ".join(parts) + ". " + hint)


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
    check_finite(state.items(), f"weights file {weights.name!r}")
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


# --------------------------------------------------------------------------- Vision Mamba

# Backward-direction parameters of a bidirectional (bimamba v2) mixer.
VIM_BACKWARD_KEYS = ("A_b_log", "D_b", "conv1d_b.", "x_proj_b.", "dt_proj_b.")
VIM_SHAPE_HINT = ("Check model.name and model.vim (embed_dim, depth, d_state, img_size, "
                  "patch_size, num_classes) match the training run.")
# Vim's evaluation preprocessing (DeiT's): ImageNet mean/std, bicubic resize, 0.875 crop.
VIM_DATA_CONFIG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                   "interpolation": "bicubic", "crop_pct": 0.875}


def vim_config(spec: ModelSpec):
    """The VimConfig a recipe names: ``model.name``'s config with ``model.vim`` on top."""
    from .vim import VIM_CONFIGS, VimConfig

    base = VIM_CONFIGS[spec.name] if spec.name else VimConfig()
    overrides = spec.vim.overrides() if spec.vim is not None else {}
    try:
        return VimConfig(**{**base.__dict__, **overrides})
    except ValueError as e:
        raise ModelLoadError(f"model.vim does not describe a Vision Mamba: {e}") from None


def _vim_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """A one-directional Mamba checkpoint loads strictly into the official code's non-fused
    path and silently computes half the model; say so by name instead of listing 120 keys."""
    missing = [k for k in model.state_dict() if k not in state]
    backward = [k for k in missing if k.split(".")[-1] in ("A_b_log", "D_b") or
                any(f".{p}" in k for p in VIM_BACKWARD_KEYS[2:])]
    if missing and len(backward) == len(missing):
        raise ModelLoadError(
            f"{where} are a one-directional Mamba checkpoint: the backward-direction "
            f"parameters of the bidirectional Vim mixer (A_b_log, D_b, conv1d_b, x_proj_b, "
            f"dt_proj_b; {len(backward)} keys, e.g. {_fmt_keys(backward[:3])}) are missing. "
            "source vim loads Vision Mamba (hustvl/Vim, bimamba v2) checkpoints only")
    check_state_dict(model, state, where, VIM_SHAPE_HINT)


def _load_vim(spec: ModelSpec, weights: Path | None) -> ModelHandle:
    from .vim import VisionMamba

    cfg = vim_config(spec)
    notes = []
    if weights is None:
        # Seeded, so that two runs of the same recipe measure the same model.
        torch.manual_seed(0)
        model = VisionMamba(cfg)
        notes.append("no model.weights: seeded random initialization (latency and pipeline "
                     "checks only; accuracy is chance)")
    else:
        model = VisionMamba(cfg)
        state = read_state_dict(weights)
        _vim_mismatch(model, state, f"weights {weights.name!r}")
        check_finite(state.items(), f"weights file {weights.name!r}")
        model.load_state_dict(state, strict=True)
    model.eval()
    chans = cfg.in_chans
    data_config = {"input_size": (chans, cfg.img_size, cfg.img_size), **VIM_DATA_CONFIG}
    for key in ("mean", "std"):
        if len(data_config[key]) != chans:
            data_config[key] = (sum(data_config[key]) / 3,) * chans
    pp = spec.preprocess
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        value = getattr(pp, key)
        if value is not None:
            data_config[key] = tuple(value) if isinstance(value, list) else value
    if tuple(data_config["input_size"]) != (chans, cfg.img_size, cfg.img_size):
        raise ModelLoadError(
            f"model.preprocess.input_size {list(data_config['input_size'])} does not match the "
            f"Vim's input [{chans}, {cfg.img_size}, {cfg.img_size}] (its position embedding is "
            "fixed); set model.vim.img_size / in_chans instead")
    name = spec.name or f"vim_d{cfg.embed_dim}x{cfg.depth}"
    handle = ModelHandle(task="image-classification", source="vim", name=name, module=model,
                         data_config=data_config)
    handle.info["load_notes"] = notes
    return handle


# --------------------------------------------------------------------------- Hugging Face


def _load_hf(spec: ModelSpec, folder: Path | None) -> ModelHandle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused-pooler-weights notice is expected here

    if folder is None or not folder.is_dir():
        raise ModelLoadError(f"model.path {getattr(folder, 'name', None)!r} is not a folder; "
                             "pass a Hugging Face "
                             "model folder holding config.json, the tokenizer and "
                             "model.safetensors")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder.name!r} has no config.json; it is not a "
                             "Hugging Face model folder")
    task = spec.resolved_task
    if task not in ("text-embedding", "image-classification"):
        raise UnsupportedModelError(f"model.task {task!r} is not supported for Hugging Face "
                                    "models; use text-embedding or image-classification")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder.name}/config.json: not valid JSON: {e}") from None
    model_type = cfg.get("model_type")
    known = SUPPORTED_HF_TYPES if task == "text-embedding" else SUPPORTED_HF_IMAGE_TYPES
    if model_type not in known:
        other = SUPPORTED_HF_IMAGE_TYPES if task == "text-embedding" else SUPPORTED_HF_TYPES
        other_task = "image-classification" if task == "text-embedding" else "text-embedding"
        hint = f" Set model.task: {other_task} for this model." if model_type in other else ""
        raise UnsupportedModelError(
            f"model folder {folder.name!r} holds a {model_type!r} model; supported for "
            f"{task}: {', '.join(known)}.{hint}")
    if cfg.get("auto_map"):
        raise UnsupportedModelError(f"model folder {folder.name!r} needs custom code (auto_map in "
                                    "config.json); compress never runs code from model folders")
    _check_file_references(folder)
    if not list(folder.glob("*.safetensors")):
        raise ModelLoadError(f"model folder {folder.name!r} has no .safetensors weights; pickled "
                             "pytorch_model.bin is refused. Convert it with "
                             "model.save_pretrained(dir, safe_serialization=True)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if task == "image-classification":
            return _load_hf_image(folder, config, model_type)
        extra = {"add_pooling_layer": False} if _accepts(AutoModel, config,
                                                        "add_pooling_layer") else {}
        transformer = AutoModel.from_pretrained(
            str(folder), config=config, local_files_only=True, use_safetensors=True,
            attn_implementation="eager", trust_remote_code=False, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        text = str(e).replace(str(folder), folder.name)
        why = (text.splitlines() or [type(e).__name__])[0][:300]
        raise ModelLoadError(f"cannot load Hugging Face model from {folder.name!r}: "
                             f"{why}") from None
    check_finite(transformer.state_dict().items(), f"model folder {folder.name!r}")
    transformer.eval()
    module = SentenceEmbedder(transformer, pooling=spec.pooling, normalize=spec.normalize).eval()
    max_pos = int(getattr(config, "max_position_embeddings", 512))
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        max_pos -= 2  # RoBERTa offsets positions by the padding index
    return ModelHandle(task="text-embedding", source="hf", name=folder.name, module=module,
                       tokenizer=tokenizer, max_positions=max_pos)


# The JSON files transformers reads from a model folder. A key such as ``vocab_file`` or
# ``tokenizer_file`` in them is opened as given, so an absolute path or '..' would make the
# server read a file outside the folder.
HF_JSON_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json", "generation_config.json")


def _outside_refs(value, key: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _outside_refs(v, str(k))]
    if isinstance(value, list):
        return [r for v in value for r in _outside_refs(v, key)]
    # name_or_path is only a label (often the saving machine's folder), never opened.
    if isinstance(value, str) and key.endswith(("_file", "_files", "_dir", "_path")) and \
            key not in ("name_or_path", "_name_or_path"):
        p = value.replace("\\", "/")
        if p.startswith(("/", "~")) or ".." in p.split("/") or ":" in p:
            return [(key, value)]
    return []


def _check_file_references(folder: Path) -> None:
    for name in HF_JSON_FILES:
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{folder.name}/{name}: not valid JSON: {e}") from None
        refs = _outside_refs(data)
        if refs:
            shown = ", ".join(f"{k}: {v!r}" for k, v in refs[:5])
            raise ModelLoadError(
                f"{folder.name}/{name} names files outside the model folder ({shown}); "
                "compress reads only the files inside it. Remove these keys or give bare file "
                "names of files in the folder")


def _accepts(auto_cls, config, kwarg: str) -> bool:
    """Whether the class ``auto_cls`` picks for ``config`` takes ``kwarg`` (DistilBERT,
    ALBERT's and DeBERTa's base models have no pooling layer to switch off)."""
    import inspect

    cls = auto_cls._model_mapping.get(type(config), None)
    return cls is not None and kwarg in inspect.signature(cls.__init__).parameters


def _load_hf_image(folder: Path, config, model_type: str) -> ModelHandle:
    """A Hugging Face image classifier; preprocessing from preprocessor_config.json."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(
        str(folder), config=config, local_files_only=True, use_safetensors=True,
        attn_implementation="eager", trust_remote_code=False)
    check_finite(model.state_dict().items(), f"model folder {folder.name!r}")
    model.eval()
    size = getattr(config, "image_size", 224)
    pre = {}
    if (folder / "preprocessor_config.json").is_file():
        try:
            pre = json.loads((folder / "preprocessor_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{folder.name}/preprocessor_config.json: not valid JSON: "
                                 f"{e}") from None
    psize = pre.get("crop_size") or pre.get("size") or size
    if isinstance(psize, dict):
        psize = psize.get("height") or psize.get("shortest_edge") or size
    chans = int(getattr(config, "num_channels", 3))
    mean = tuple(pre.get("image_mean", (0.5,) * chans))
    std = tuple(pre.get("image_std", (0.5,) * chans))
    check_input_size((chans, int(psize), int(psize)),
                     f"{folder.name}/preprocessor_config.json and config.json")
    data_config = {"input_size": (chans, int(psize), int(psize)), "mean": mean, "std": std,
                   "interpolation": "bilinear", "crop_pct": 1.0}
    return ModelHandle(task="image-classification", source="hf", name=folder.name,
                       module=HFImageClassifier(model).eval(), data_config=data_config)


# --------------------------------------------------------------------------- ONNX


def _check_onnx_initializers(proto, path: Path) -> None:
    """NaN/Inf in the graph's float initializers (those stored in the file itself)."""
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    tensors = []
    for init in proto.graph.initializer:
        if init.data_type in floats and init.data_location != TensorProto.EXTERNAL:
            tensors.append((init.name, torch.from_numpy(
                numpy_helper.to_array(init).astype("float32"))))  # a writable copy
    check_finite(tensors, f"ONNX file {path.name!r}")


def _load_onnx(spec: ModelSpec, path: Path | None) -> ModelHandle:
    import onnx

    if path is None or not path.is_file():
        raise ModelLoadError(f"model.path {getattr(path, 'name', None)!r} is not a file; pass "
                             "an .onnx file")
    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several unrelated types
        text = str(e).replace(str(path), path.name).replace(str(path.parent) + os.sep, "")
        why = (text.splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path.name}: not a valid ONNX model ({why[:300]}); expected an "
                             ".onnx file written by torch.onnx.export or onnx.save") from None
    _check_onnx_initializers(proto, path)
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
                                        "expected [batch, channels, height, width] with fixed "
                                        "C, H, W")
        check_input_size(tuple(dims[1:]), f"{path.name}: input {inputs[0].name!r}")
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
