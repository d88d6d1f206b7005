"""Binarization after BiBERT: 1-bit weights (W1A32, W1A8, W1A1), Bi-Attention, distillation.

The algorithms are tensor functions in ``quant/binary.py`` and ``distill.py``; this module picks
the layers, swaps the modules in, runs the distillation, and writes the 1-bit packed weights
file beside the ONNX model.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..calibration import observe_activations
from ..context import PassContext
from ..distill import DistillSettings, distill
from ..errors import UnsupportedModelError
from ..models.handle import ModelHandle
from ..models.kind import applicable_passes, model_kind, require
from ..patch.attention import (
    ExplicitTimmAttention,
    explicit_attention_modules,
    make_attention_explicit,
)
from ..quant.binary import (
    BiMatMulAV,
    BiMatMulQK,
    BinaryLinear,
    BoolAttention,
    binary_ops_flops,
)
from ..quant.modules import ActQuantizer, MatMul
from ..registry import PassConfig, register_pass
from ..targeting import LayerPatterns, select_modules, set_submodule

PACKED_FILE = "model.binary.safetensors"
HEAD_NAMES = re.compile(r"(.*\.)?(head|classifier|lm_head|pooler(\..*)?)")


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    output: float = Field(1.0, ge=0, description="KL on logits / 1 - cosine on embeddings")
    labels: float = Field(0.5, ge=0, description="cross-entropy on labels, when the data has them")
    qkv: float = Field(1.0, ge=0, description="DMD: Q, K, V similarity directions, all layers")
    hidden: float = Field(1.0, ge=0, description="DMD: hidden-state directions, all layers")


class DistillationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["none", "output", "dmd"] = Field(
        "dmd", description="none: binarize only; output: logits/embeddings; dmd: BiBERT's "
                           "Direction-Matching Distillation plus the output term")
    steps: int = Field(300, ge=1, le=1_000_000)
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=1024)
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup: float = Field(0.1, ge=0, le=1, description="fraction of steps of linear warm-up")
    max_seconds: float | None = Field(None, gt=0, description="stop training after this long")
    temperature: float = Field(1.0, gt=0)
    weights: LossWeights = Field(default_factory=LossWeights)


class BinaryExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    block_size: Literal[32, 64, 128] = Field(
        32, description="MatMulNBits block (2-bit kernels are fast for 32, 64, 128)")
    accuracy_level: Literal[0, 4] = Field(
        4, description="4: int8 activations inside the kernel (fast); 0: float (slow path)")
    packed_weights: bool = Field(True, description=f"write {PACKED_FILE} (1 bit per weight)")


class BinarizeConfig(PassConfig):
    """Binarization after BiBERT: 1-bit weights, optional 1-bit activations and Bi-Attention.

    Weights become ``alpha * sign(W - mean W)`` per output row (alpha = mean |W - mean W|);
    ``level`` picks the inputs: float (W1A32), int8 (W1A8, calibrated) or ``sign(x)`` (W1A1).
    ``bi_attention`` replaces the softmax by BiBERT's ``bool(sign(Q) sign(K)^T)`` and uses
    ``sign(V)``. Embeddings and the head stay in float (BiBERT). Accuracy comes back through
    distillation from the original model on the calibration data (labels used when present):
    Direction-Matching Distillation (Q, K, V similarity and hidden-state directions) plus
    the output term. Exported as ``com.microsoft::MatMulNBits`` 2-bit (codes ±1, alpha as
    scale: ONNX Runtime has no 1-bit kernel), with a 1-bit packed safetensors file beside it.
    Paper: https://arxiv.org/abs/2203.06390. Needs calibration data unless
    ``distillation.method`` is none and the level is not W1A8.

    Recipe:
        - type: binarize
          level: W1A32
          bi_attention: false
          distillation: {method: dmd, steps: 2000, lr: 0.0005, batch_size: 64}
          export: {block_size: 32}
    """

    type: Literal["binarize"] = "binarize"
    level: Literal["W1A32", "W1A8", "W1A1"] = Field(
        "W1A32", description="W1A32: 1-bit weights; W1A8: + int8 inputs; W1A1: + sign inputs")
    targets: LayerPatterns = Field(default_factory=lambda: ["Linear"],
                                   description="class names, module names or re:<regex>")
    ignore: LayerPatterns = Field(default_factory=list, description="layers kept in float")
    keep_head: bool = Field(True, description="keep the classifier / pooler in float (BiBERT)")
    bi_attention: bool = Field(False, description="BiBERT's Bi-Attention instead of softmax")
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    export: BinaryExportSpec = Field(default_factory=BinaryExportSpec)


def _needs_calibration(config: BinarizeConfig) -> bool:
    return config.distillation.method != "none" or config.level == "W1A8"


def head_names(module: nn.Module) -> list[str]:
    """The classifier (timm ``get_classifier``) and pooler / head Linear layers, by name."""
    cls = module.get_classifier() if hasattr(module, "get_classifier") else None
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and (m is cls or HEAD_NAMES.fullmatch(n))]


def _forward_fn(task: str):
    if task == "image-classification":
        return lambda m, b: m(b["pixel_values"])
    return lambda m, b: m(b["input_ids"], b["attention_mask"])


def apply_bi_attention(module: nn.Module) -> list[str]:
    make_attention_explicit(module)
    names = []
    for name, attn in explicit_attention_modules(module).items():
        # timm scales q before the product (a sign erases it): divide by sqrt(d) here instead.
        scale = attn.head_dim ** -0.5 if isinstance(attn, ExplicitTimmAttention) else 1.0
        attn.matmul_qk = BiMatMulQK(scale)
        attn.softmax = BoolAttention()
        attn.matmul_av = BiMatMulAV()
        names.append(name)
    return names


@torch.no_grad()
def count_macs(module: nn.Module, forward, batch: dict) -> tuple[float, float]:
    """(float MACs, binary MACs) of one forward pass; binary = both operands 1-bit."""
    fp, binary = [0.0], [0.0]

    def hook(mod, args, out):
        if isinstance(mod, BinaryLinear):
            macs = out.numel() * mod.in_features
            (binary if mod.act == "sign" else fp)[0] += macs
        elif isinstance(mod, nn.Linear):
            fp[0] += out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            k = mod.weight[0].numel()
            fp[0] += out.numel() * k
        elif isinstance(mod, (MatMul, BiMatMulQK, BiMatMulAV)):
            macs = out.numel() * args[0].shape[-1]
            (binary if isinstance(mod, (BiMatMulQK, BiMatMulAV)) else fp)[0] += macs

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, BinaryLinear, MatMul, BiMatMulQK,
                                 BiMatMulAV))]
    try:
        forward(module, batch)
    finally:
        for h in handles:
            h.remove()
    return fp[0], binary[0]


def write_packed(module: nn.Module, layers: dict[str, BinaryLinear], path, meta: dict) -> dict:
    """1-bit packed signs + alpha per row for binary layers, float32 for everything else."""
    from safetensors.torch import save_file

    skip = {f"{n}.{p}" for n in layers for p in ("weight", "qweight", "scales")}
    tensors, binary_bytes = {}, 0
    for name, layer in layers.items():
        signs, alpha = layer.packed()
        tensors[f"{name}.weight_signs"] = signs
        tensors[f"{name}.weight_alpha"] = alpha
        binary_bytes += signs.numel() + alpha.numel() * 4
    for k, v in module.state_dict().items():
        if k not in skip and not k.endswith(("zero_point",)) and v.is_floating_point():
            tensors[k] = v.detach().float().cpu().contiguous().clone()
    layout = {n: {"in_features": lay.in_features, "out_features": lay.out_features, "act": lay.act}
              for n, lay in layers.items()}
    save_file(tensors, str(path), metadata={
        "format": "compress-binary-v1",
        "weights": "W = alpha[:, None] * (2 * bit - 1); bit j of byte i of a row is column 8i+j",
        "layers": json.dumps(layout), **{k: str(v) for k, v in meta.items()}})
    return {"binary_bytes": binary_bytes, "file_bytes": path.stat().st_size}


@register_pass(BinarizeConfig, needs_calibration=_needs_calibration)
def binarize(model: ModelHandle, config: BinarizeConfig, ctx: PassContext) -> None:
    require(model_kind(model), "binarize", where=f"passes.{ctx.index}")
    module = model.module
    prefix = f"passes.{ctx.index}."
    dist = config.distillation
    teacher = copy.deepcopy(module).eval() if dist.method != "none" else None
    ignore = list(config.ignore) + (head_names(module) if config.keep_head else [])
    chosen = select_modules(module, config.targets, ignore, (nn.Linear,), field_prefix=prefix)
    act = {"W1A32": "none", "W1A8": "int8", "W1A1": "sign"}[config.level]
    layers: dict[str, BinaryLinear] = {}
    for name, lin in chosen.items():
        quantizer = ActQuantizer(8, symmetric=False) if act == "int8" else None
        b = BinaryLinear(lin, act, quantizer, config.export.block_size,
                         config.export.accuracy_level)
        set_submodule(module, name, b)
        layers[name] = b
    # Explicit attention routes the attention products through modules (counted below,
    # replaced by Bi-Attention); outputs are unchanged. Models whose attention has no explicit
    # form (windowed, DistilBERT, ALBERT, ...) still get their Linear layers binarized.
    try:
        make_attention_explicit(module)
    except UnsupportedModelError as e:
        needs = [f for f, on in (("bi_attention", config.bi_attention),
                                 ("distillation.method: dmd", dist.method == "dmd")) if on]
        if needs:
            kind = model_kind(model)
            raise UnsupportedModelError(
                f"passes.{ctx.index}: {' and '.join(needs)} need timm Attention or BERT-style "
                f"self-attention, and {kind.label} has none ({e}). Set bi_attention: false and "
                "distillation.method: output to binarize its Linear layers, or use "
                f"{', '.join(a for a in applicable_passes(kind) if a != 'binarize')}") from None
    bi_attn = apply_bi_attention(module) if config.bi_attention else []
    module.to(ctx.device)
    forward = _forward_fn(model.task)

    summary = ctx.report.summary
    result = None
    if teacher is not None:
        settings = DistillSettings(
            method=dist.method, steps=dist.steps, lr=dist.lr, batch_size=dist.batch_size,
            weight_decay=dist.weight_decay, warmup=dist.warmup, max_seconds=dist.max_seconds,
            output_weight=dist.weights.output, label_weight=dist.weights.labels,
            qkv_weight=dist.weights.qkv, hidden_weight=dist.weights.hidden,
            temperature=dist.temperature, log_every=max(1, dist.steps // 100))
        calib = ctx.calib
        result = distill(module, teacher, calib.inputs, calib.labels, forward, model.task,
                         settings, ctx.device,
                         progress=lambda f, m: ctx.progress(0.85 * f, m))
        del teacher
        for p in module.parameters():
            p.requires_grad_(False)
        summary["distillation"] = {
            "method": dist.method, "steps": result.steps, "seconds": result.seconds,
            "device": result.device, "stopped_early": result.stopped_early,
            "samples": len(calib), "labels_used": calib.labels is not None and
            model.task == "image-classification" and dist.weights.labels > 0,
            "first": result.first, "last": result.last}
        _loss_plot(ctx, result.history)
    module.eval()
    if act == "int8":
        ctx.progress(0.87, "calibrating int8 inputs")
        observe_activations(model, ctx)
    for b in layers.values():
        b.freeze()

    # Sizes and bits per weight of the binarized layers.
    n_w = sum(b.weight.numel() for b in layers.values())
    onnx_bytes = sum(b.qweight.numel() + b.scales.numel() * 4 for b in layers.values())
    packed_bytes = sum(-(-b.in_features // 8) * b.out_features + b.out_features * 4
                       for b in layers.values())
    a_bits = {"none": None, "int8": 8, "sign": 1}[act]
    for name, b in layers.items():
        ctx.report.add_layer(name, kind="BinaryLinear", params=b.weight.numel(), weight_bits=1,
                             act_bits=a_bits, simulated=True)
    for name in bi_attn:
        ctx.report.add_layer(f"{name}.bi_attention", kind="BiAttention", params=0,
                             weight_bits=None, act_bits=1, simulated=True)
    example = next(ctx.calib_batches(1)) if ctx.calib is not None else {
        k: v.to(ctx.device) for k, v in model.example_inputs(1).items()}
    fp_macs, bin_macs = count_macs(module, forward, example)
    orig_macs = fp_macs + bin_macs
    bops = binary_ops_flops(fp_macs, bin_macs)
    summary.update(
        level=config.level, bi_attention=config.bi_attention, binary_layers=len(layers),
        binary_weights=n_w,
        bits_per_weight={
            "stored_onnx": round(8 * onnx_bytes / max(n_w, 1), 3),
            "stored_packed": round(8 * packed_bytes / max(n_w, 1), 3),
            "executed": "2-bit weights (MatMulNBits codes ±1, scale alpha)"
                        + (", int8 inputs (accuracy_level 4)" if config.export.accuracy_level == 4
                           else ", float inputs"),
            "activations": {"none": "float32", "int8": "uint8 per tensor (QDQ)",
                            "sign": "±1 (Sign), as int8 inside the kernel"}[act]},
        binary_layer_bytes={"fp32": 4 * n_w, "onnx_2bit": onnx_bytes, "packed_1bit": packed_bytes},
        binary_ops={"macs_per_sample": int(orig_macs), "float_macs": int(fp_macs),
                    "binary_macs": int(bin_macs), "bibert_flops": int(bops),
                    "theoretical_saving": round(orig_macs / max(bops, 1.0), 2),
                    "note": "BiBERT's count: float MACs + binary MACs / 64 (1-bit x 1-bit only)"},
    )
    if config.export.packed_weights:
        path = ctx.out_dir / PACKED_FILE
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        info = write_packed(module, layers, path, {"level": config.level,
                                                   "bi_attention": config.bi_attention})
        summary["packed_weights"] = {"file": PACKED_FILE, **info}
    ctx.progress(1.0, "binarized")


def _loss_plot(ctx: PassContext, history: list[dict]) -> None:
    if len(history) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = [h["step"] for h in history]
    for key in ("loss", "output", "qkv", "hidden", "labels"):
        if key in history[0]:
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ctx.save_plot(fig, "distill_loss", "Distillation loss")
