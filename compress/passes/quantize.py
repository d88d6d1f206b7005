"""Baseline post-training quantization: W8A8 fake quantization exported as ONNX Q/DQ."""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..calibration import measure_layer_sqnr, observe_activations
from ..context import PassContext
from ..errors import RecipeError
from ..export.ort import u8s8_saturates
from ..models.handle import ModelHandle
from ..patch.attention import (
    explicit_attention_modules,
    make_attention_explicit,
    route_qkv_bias,
)
from ..patch.fused_attention import fuse_attention
from ..quant.fold import fold_batchnorm
from ..quant.functional import search_weight_scale
from ..quant.modules import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    TwoRegionActQuantizer,
)
from ..registry import PassConfig, register_pass
from ..targeting import LayerPatterns, select_modules, set_submodule


class WeightQuant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: Literal[2, 3, 4, 5, 6, 7, 8] = Field(
        8, description="8 runs as int8 in ORT; fewer bits are simulated in int8 (same size)")
    reduce_range: bool | None = Field(
        None, description="8-bit weights with codes within +-63 (ORT's reduce_range), which "
        "ORT's AVX2 u8s8 kernel multiplies without int16 saturation. null: on when this "
        "machine's CPU lacks VNNI/AMX, so the accuracy measured here is what ORT delivers here")
    granularity: Literal["channel"] = Field("channel", description="per output channel")
    symmetric: Literal[True] = True
    observer: Literal["minmax", "mse", "cosine", "percentile"] = Field(
        "minmax", description="per-channel clipping: none, or searched by MSE/cosine error")


class ActivationQuant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: Literal[4, 5, 6, 8] = 8
    symmetric: bool = Field(False, description="false: uint8 with a zero point (fast on x86)")
    observer: Literal["minmax", "percentile", "mse", "cosine"] = Field(
        "minmax", description="range: min-max, percentile, or clipping searched by MSE/cosine")
    percentile: float = Field(99.99, gt=90, le=100, description="for observer: percentile")
    opt_m: list[Literal["gelu", "softmax"]] = Field(
        default_factory=list, description="OPT-m: two-region (fine + 2^m coarser tail) quantizer, "
        "iso-bit (each region at bits-1, 2^bits levels in all; one region at bits where no tail "
        "pays), split and m searched on calibration data by the error of the product the "
        "activation feeds; exported exactly as two integer matmuls (that product costs "
        "twice). Where: 'gelu' = post-GELU inputs (mlp.fc2, BERT output.dense), 'softmax' = "
        "the attention probabilities of probs@v (needs attention_matmuls: true). true means "
        "[gelu], false []")

    @field_validator("opt_m", mode="before")
    @classmethod
    def _opt_m_bool_means_gelu(cls, v):
        # opt_m was a bool (post-GELU only) before the softmax case existed; keep recipes valid
        if isinstance(v, bool):
            return ["gelu"] if v else []
        if isinstance(v, str):
            return [v]
        return v


class QuantizeConfig(PassConfig):
    """Post-training W8A8 quantization (per-channel weights, calibrated per-tensor activations).

    Linear and Conv2d layers get per-output-channel symmetric integer weights and a calibrated
    per-tensor activation quantizer on their input; with ``attention_matmuls`` both inputs of
    ``q @ k^T`` and ``probs @ v`` are quantized too. Exported as ONNX QuantizeLinear/
    DequantizeLinear that ONNX Runtime fuses into integer kernels. Needs calibration data.

    Recipe:
        - type: quantize
          ignore: [head]
          weights: {bits: 8}
          activations: {bits: 8, observer: percentile, percentile: 99.99, opt_m: [softmax]}
          attention_matmuls: true
    """

    type: Literal["quantize"] = "quantize"
    targets: LayerPatterns = Field(default_factory=lambda: ["Linear", "Conv2d"],
                                   description="class names, module names or re:<regex>")
    ignore: LayerPatterns = Field(default_factory=list, description="layers kept in float")
    weights: WeightQuant = Field(default_factory=WeightQuant)
    activations: ActivationQuant | None = Field(
        default_factory=ActivationQuant, description="null: weight-only quantization")
    attention_matmuls: bool = Field(True, description="quantize q@k^T and probs@v inputs")
    fused_attention: bool = Field(
        False, description="export attention as one float ORT MultiHeadAttention node (fast on "
        "CPU); needs attention_matmuls: false")
    sqnr_samples: int = Field(64, ge=1, le=100_000,
                              description="calibration samples for per-layer SQNR")
    engine: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="where the Q/DQ nodes come from. torch: quantized Linear/Conv "
        "modules (inputs quantized, outputs float: what ORT runs fast for Linear layers). "
        "onnx: Q/DQ on every tensor of the exported graph between integer-capable ops (Conv, "
        "Add, pooling, Gemm), calibrated on the same data: what ORT needs to run Conv as "
        "QLinearConv in NHWC. auto: onnx for convolutional networks and conv-attention hybrids, "
        "torch otherwise")

    @field_validator("attention_matmuls")
    @classmethod
    def _opt_m_softmax_needs_attention_matmuls(cls, v, info):
        acts = info.data.get("activations")
        if not v and acts is not None and "softmax" in acts.opt_m:
            raise ValueError("activations.opt_m: [softmax] quantizes the attention "
                             "probabilities of probs@v; set attention_matmuls: true or drop "
                             "softmax from activations.opt_m")
        return v

    @field_validator("fused_attention")
    @classmethod
    def _fused_needs_float_attention(cls, v, info):
        if v and info.data.get("attention_matmuls"):
            raise ValueError("fused attention runs the attention products in float; "
                             "set attention_matmuls: false")
        return v


POST_GELU = re.compile(r"(.*\.)?mlp\.fc2|(.*\.)?layer\.\d+\.output\.dense")


def new_act_quantizer(spec: ActivationQuant | None, name: str = "") -> ActQuantizer | None:
    """The activation quantizer for the input of layer ``name`` (for attention products:
    ``<attn>.matmul_av.probs``, the probabilities)."""
    if spec is None:
        return None
    if ("gelu" in spec.opt_m and POST_GELU.fullmatch(name)) or \
            ("softmax" in spec.opt_m and name.endswith("matmul_av.probs")):
        return TwoRegionActQuantizer(spec.bits)
    return ActQuantizer(spec.bits, spec.symmetric, spec.observer, spec.percentile)


def effective_weight_bits(spec: WeightQuant) -> int:
    """Code width actually used: 8-bit weights become 7-bit under reduce_range."""
    reduce = u8s8_saturates() if spec.reduce_range is None else spec.reduce_range
    return 7 if spec.bits == 8 and reduce else spec.bits


def ignored(name: str, patterns: list[str], module: nn.Module) -> bool:
    from ..targeting import _matches

    return any(_matches(p, name, module) for p in patterns)


def wrap_layers(model: nn.Module, config: QuantizeConfig, prefix: str,
                bits: int) -> dict[str, nn.Module]:
    """Replace targeted Linear/Conv2d layers by ``bits``-bit ones; returns them by name."""
    chosen = select_modules(model, config.targets, config.ignore, (nn.Linear, nn.Conv2d),
                            field_prefix=prefix)
    wrapped = {}
    for name, layer in chosen.items():
        act = new_act_quantizer(config.activations, name)
        cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        q = cls(layer, bits, act)
        set_submodule(model, name, q)
        wrapped[name] = q
    return wrapped


def wrap_attention_matmuls(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Module]:
    """Quantize q@k^T and probs@v of every attention module the explicit patch supports (none
    on CNNs, Swin's window attention or EVA's rotary attention: those keep float products)."""
    make_attention_explicit(model, required=False)
    wrapped = {}
    for name, attn in explicit_attention_modules(model).items():
        for part in ("matmul_qk", "matmul_av"):
            full = f"{name}.{part}"
            if ignored(full, config.ignore, getattr(attn, part)):
                continue
            qm = QuantMatMul(new_act_quantizer(config.activations, f"{full}.probs"
                                               if part == "matmul_av" else ""),
                             new_act_quantizer(config.activations))
            setattr(attn, part, qm)
            wrapped[full] = qm
    return wrapped


def choose_engine(model: ModelHandle, config: QuantizeConfig) -> tuple[str, str]:
    """(engine, why) for this model: see ``QuantizeConfig.engine``."""
    if config.engine != "auto":
        return config.engine, "set in the recipe"
    if config.activations is None:
        return "torch", "weight-only quantization runs on the torch modules"
    from ..models.kind import model_kind

    kind = model_kind(model)
    if kind.kind in ("cnn", "hybrid"):
        if config.ignore or config.targets != ["Linear", "Conv2d"] or \
                config.activations.opt_m or config.weights.bits != 8 or \
                config.activations.bits != 8 or config.weights.observer != "minmax":
            return "torch", (f"{kind.kind}, but targets/ignore, opt_m, sub-8-bit widths or "
                             "weight observers are torch-engine options")
        return "onnx", f"{kind.kind}: Conv needs Q/DQ on its output to run as QLinearConv"
    return "torch", f"{kind.kind}: Linear layers run as MatMulIntegerToFloat with float outputs"


@torch.no_grad()
def fold_norms(model: ModelHandle, ctx: PassContext) -> list[str]:
    """Fold BatchNorm into the Conv before it (weights then quantize with the BN scale in)."""
    batch = next(iter(ctx.calib_batches(min(8, len(ctx.calib)))))
    return fold_batchnorm(model.module, lambda: model.forward(batch))


@register_pass(QuantizeConfig, needs_calibration=True)
def quantize(model: ModelHandle, config: QuantizeConfig, ctx: PassContext) -> None:
    module = model.module
    prefix = f"passes.{ctx.index}."
    module.to(ctx.device)
    module.eval()
    folded = fold_norms(model, ctx)
    route_qkv_bias(module)
    engine, why = choose_engine(model, config)
    ctx.report.summary.update(engine=engine, engine_reason=why, folded_batchnorms=len(folded))
    if engine == "onnx":
        if config.activations is None:
            raise RecipeError(f"{prefix}engine: onnx quantizes activations; with activations: "
                              "null (weight-only) use engine: torch or auto",
                              [(f"{prefix}engine", "needs activations")])
        if config.ignore:
            raise RecipeError(f"{prefix}ignore is not available with engine: onnx (the graph "
                              "quantizer addresses ONNX nodes, not modules); use engine: torch, "
                              "or the ort_quantize pass with nodes_to_exclude",
                              [(f"{prefix}ignore", "not available with engine: onnx")])
        # Checks the targets the same way, so a typo still fails here, not after export.
        select_modules(module, config.targets, config.ignore, (nn.Linear, nn.Conv2d),
                       field_prefix=prefix)
        acts = config.activations
        model.info["graph_quantize"] = {
            "index": ctx.index, "report": ctx.report, "observer": acts.observer,
            "percentile": acts.percentile,
            "reduce_range": effective_weight_bits(config.weights) == 7,
            "samples": len(ctx.calib)}
        if config.attention_matmuls or config.fused_attention:
            ctx.report.summary["skipped"] = [
                "attention_matmuls/fused_attention: the graph engine keeps products of two "
                "activations in float"]
        return
    skipped = []
    fused = fuse_attention(module, required=False) if config.fused_attention else []
    if config.fused_attention and not fused:
        skipped.append("fused_attention: no attention module this patch supports (timm "
                       "Attention without q/k norm, BERT-style self-attention)")
    w_bits = effective_weight_bits(config.weights)
    layers = wrap_layers(module, config, prefix, w_bits)
    matmuls = {}
    if config.attention_matmuls and config.activations is not None:
        matmuls = wrap_attention_matmuls(module, config)
        if not matmuls:
            skipped.append("attention_matmuls: no attention module the explicit patch supports "
                           "(timm Attention, BERT-style self-attention); products stay float")
    module.to(ctx.device)
    opt_m = {}
    unobserved = []
    if config.activations is not None:
        observe_activations(model, ctx)
        unobserved = [n for n, q in layers.items() if q.input_quantizer is not None
                      and q.input_quantizer.mode == "off"]
        unobserved += [n for n, qm in matmuls.items() if qm.a_quantizer.mode == "off"]
        if unobserved:
            skipped.append(f"{len(unobserved)} layer(s) never ran on the calibration data, their "
                           f"inputs stay float: {', '.join(unobserved[:8])}")
        for name, q in layers.items():
            if isinstance(q.input_quantizer, TwoRegionActQuantizer) and name not in unobserved:
                opt_m[name] = q.input_quantizer.search(q.weight.T)
        for name, qm in matmuls.items():
            if isinstance(qm.a_quantizer, TwoRegionActQuantizer) and name not in unobserved:
                opt_m[name] = qm.a_quantizer.search()  # by the error of probs @ v
        for name, best in opt_m.items():
            ctx.report.add_layer(name, opt_m_split=float(f"{float(best['split']):.4g}"),
                                 opt_m_m=best["m"], opt_m_region_bits=best["region_bits"])
    for q in layers.values():
        wobs = config.weights.observer
        q.quantize_weight(None if wobs == "minmax" else
                          search_weight_scale(q.weight, w_bits, wobs))
    ctx.progress(0.9, "measuring per-layer SQNR")
    sqnr = measure_layer_sqnr(model, ctx, config.sqnr_samples)
    a_bits = config.activations.bits if config.activations else None
    for name, q in layers.items():
        ctx.report.add_layer(name, kind=type(q).__name__.removeprefix("Quant"),
                             params=q.weight.numel(), weight_bits=config.weights.bits,
                             # int8 codes (any width below 8 is simulated in them) plus an fp32
                             # scale and an int8 zero point per output channel
                             weight_bits_stored=round(8 + 40 / q.weight[0].numel(), 3),
                             act_bits=None if name in unobserved else a_bits,
                             sqnr_db=sqnr[name],
                             simulated=config.weights.bits != 8 or (a_bits or 8) != 8)
    for name in matmuls:
        ctx.report.add_layer(name, kind="MatMul", params=0, weight_bits=None, act_bits=a_bits,
                             sqnr_db=sqnr[name], simulated=(a_bits or 8) != 8)
    measured = [v for v in sqnr.values() if v == v]  # layers never reached have NaN SQNR
    ctx.report.summary.update(
        quantized_layers=len(layers), quantized_matmuls=len(matmuls),
        fused_attention=len(fused), opt_m_layers=len(opt_m),
        weight_bits=config.weights.bits, weight_code_bits=w_bits, act_bits=a_bits,
        observer=config.activations.observer if config.activations else None,
        min_sqnr_db=min(measured) if measured else None, unobserved_layers=len(unobserved),
        skipped=skipped)
