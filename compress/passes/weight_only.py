"""Weight-only block quantization (INT2/4/8, RTN, GPTQ or HQQ) exported as MatMulNBits."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field
from torch import nn

from ..context import PassContext
from ..errors import RecipeError
from ..models.handle import ModelHandle
from ..patch.attention import route_qkv_bias
from ..quant.functional import sqnr_db
from ..quant.nbits import NBitsConv2d, NBitsEmbedding, NBitsLinear, quantize_conv_weight
from ..quant.weight_only import GroupQuantized, HessianAccumulator, gptq, hqq, rtn
from ..registry import PassConfig, register_pass
from ..targeting import LayerPatterns, select_modules, set_submodule

Method = Literal["rtn", "gptq", "hqq"]


def _power_of_two_block(v: int) -> int:
    if v < 16 or v & (v - 1):
        raise ValueError("block_size must be a power of two >= 16 (MatMulNBits)")
    return v


# Columns per scale in MatMulNBits / GatherBlockQuantized.
BlockSize = Annotated[int, AfterValidator(_power_of_two_block)]


class WeightOnlyConfig(PassConfig):
    """Weight-only quantization of Linear layers (and embeddings) to 2-8 bits in blocks.

    Each row of a weight is split into blocks of ``block_size`` input columns with their own
    scale and zero point. ``method``: ``rtn`` (round to nearest, optional MSE range search),
    ``gptq`` (Frantar et al., https://arxiv.org/abs/2210.17323: error compensation through the
    inverse Hessian of the layer inputs; needs calibration data) or ``hqq`` (half-quadratic
    zero-point optimization, data-free). Exports as ONNX Runtime ``MatMulNBits`` (2, 4, 8 bits
    run natively; 3, 5, 6 in the 8-bit container, simulated) and ``GatherBlockQuantized`` for
    embeddings. With ``safetensors: true`` also writes ``compressed-tensors/`` (packed INT-N in
    the compressed-tensors ``pack-quantized`` layout that Hugging Face transformers reads).

    Recipe:
        - type: weight_only
          targets: [Linear, Embedding]
          ignore: [head]
          bits: 4
          block_size: 32
          method: gptq
          safetensors: true
    """

    type: Literal["weight_only"] = "weight_only"
    targets: LayerPatterns = Field(
        default_factory=lambda: ["Linear", "Conv2d"],
        description="Linear, Conv2d and/or Embedding: class, name or re:<regex>. Conv2d kernels "
        "are quantized per output channel in blocks of their flattened rows (RTN) and exported "
        "as blocked DequantizeLinear -> Conv")
    ignore: LayerPatterns = Field(default_factory=list, description="layers kept in float")
    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    embedding_bits: Literal[2, 3, 4, 5, 6, 8] | None = Field(
        None, description="bits for Embedding layers (default: bits)")
    block_size: BlockSize = Field(32, description="columns per scale; a power of two >= 16")
    symmetric: bool = Field(False, description="false: a zero point per block")
    method: Method = "gptq"
    act_order: bool = Field(False, description="GPTQ: quantize columns by decreasing Hessian "
                                               "diagonal (static groups)")
    percdamp: float = Field(0.01, gt=0, le=1, description="GPTQ Hessian dampening")
    mse_grid: int = Field(0, ge=0, le=100, description="RTN/GPTQ range-shrink search steps")
    accuracy_level: Literal[0, 1, 4] = Field(
        4, description="MatMulNBits: 4 = int8 compute (fast), 0/1 = float compute")
    calibration_samples: int = Field(128, ge=1, le=100_000, description="GPTQ Hessian samples")
    safetensors: bool = Field(False, description="also write compressed-tensors/ safetensors")


def check_block_sizes(layers: dict[str, nn.Module], block: int, field: str) -> None:
    """RecipeError listing every layer whose input width is not a multiple of ``block``."""
    bad = [(n, _in_dim(m)) for n, m in layers.items() if _in_dim(m) % block]
    if bad:
        lines = "; ".join(f"{n} (columns={k})" for n, k in bad[:10])
        raise RecipeError(
            f"{field}={block} does not divide the input width of {len(bad)} layer(s): {lines}. "
            f"Use a smaller block size or add them to ignore",
            [(field, f"{len(bad)} layers have widths not divisible by {block}")])


def layer_block_size(width: int, block: int) -> int | None:
    """``block`` if it divides ``width``; else the largest power of two >= 16 below it that
    does (a 368-wide classifier head under 32 takes 16); None where none does."""
    while block >= 16:
        if width % block == 0:
            return block
        block //= 2
    return None


def _in_dim(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.embedding_dim


@torch.no_grad()
def collect_hessians(model: ModelHandle, layers: dict[str, nn.Linear], ctx: PassContext,
                     samples: int) -> dict[str, torch.Tensor]:
    """``2/n sum x x^T`` of each Linear's input over the calibration data (float model)."""
    acc = {n: HessianAccumulator(m.in_features) for n, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: acc[n].add(args[0]))
             for n, m in layers.items()]
    try:
        for batch in ctx.calib_batches(samples):
            model.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.h for n, a in acc.items()}


def quantize_weight(w: torch.Tensor, bits: int, block: int, symmetric: bool, method: str,
                    h: torch.Tensor | None = None, act_order: bool = False,
                    percdamp: float = 0.01, mse_grid: int = 0) -> GroupQuantized:
    w = w.detach().float().cpu()
    if method == "gptq" and h is not None:
        return gptq(w, h, bits, block, symmetric, percdamp, act_order, mse_grid=mse_grid)
    if method == "hqq" and not symmetric:
        return hqq(w, bits, block)
    return rtn(w, bits, block, symmetric, mse_grid)


def make_nbits(layer: nn.Module, gq: GroupQuantized, input_quantizer=None,
               accuracy_level: int = 4) -> nn.Module:
    if isinstance(layer, nn.Embedding):
        return NBitsEmbedding(layer, gq)
    return NBitsLinear(layer, gq, input_quantizer, accuracy_level)


@register_pass(WeightOnlyConfig, needs_calibration=lambda c: c.method == "gptq")
def weight_only(model: ModelHandle, config: WeightOnlyConfig, ctx: PassContext) -> None:
    prefix = f"passes.{ctx.index}."
    route_qkv_bias(model.module)  # BEiT/EVA qkv would otherwise bypass the quantized module
    layers = select_modules(model.module, config.targets, config.ignore,
                            (nn.Linear, nn.Embedding, nn.Conv2d), field_prefix=prefix)
    convs = {n: m for n, m in layers.items() if isinstance(m, nn.Conv2d)}
    # Conv rows are padded to whole blocks (ONNX's blocked DequantizeLinear allows a short
    # last block); MatMulNBits and GatherBlockQuantized need whole blocks, so a layer whose
    # width block_size does not divide takes a smaller block, or stays float where no power of
    # two >= 16 divides it: a model with one odd layer still gets INT4 everywhere else.
    blocks = {n: config.block_size if n in convs else layer_block_size(_in_dim(m),
                                                                        config.block_size)
              for n, m in layers.items()}
    smaller = {n: b for n, b in blocks.items() if b is not None and b != config.block_size}
    kept = [n for n, b in blocks.items() if b is None]
    if smaller:
        ctx.report.warn(f"{prefix}block_size={config.block_size} does not divide the input "
                        f"width of {len(smaller)} layer(s); they use smaller blocks: "
                        + ", ".join(f"{n} (columns={_in_dim(layers[n])}, block {b})"
                                    for n, b in list(smaller.items())[:10]))
    if kept:
        ctx.report.warn(f"{len(kept)} layer(s) kept float: no power of two >= 16 divides their "
                        "input width: " + ", ".join(f"{n} (columns={_in_dim(layers[n])})"
                                                   for n in kept[:10]))
        layers = {n: m for n, m in layers.items() if n not in kept}
    if config.safetensors and config.method == "hqq":
        raise RecipeError(f"{prefix}safetensors needs integer zero points: use method rtn or "
                          f"gptq with safetensors (HQQ's zero points are float)",
                          [(f"{prefix}safetensors", "not available with method hqq")])
    hessians = {}
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if config.method == "gptq":
        ctx.progress(0.05, "collecting GPTQ Hessians")
        hessians = collect_hessians(model, linears, ctx, config.calibration_samples)
    saved = {}
    for i, (name, layer) in enumerate(layers.items()):
        ctx.progress(0.2 + 0.7 * i / len(layers), f"quantizing {name}")
        if name in convs:
            # GPTQ would need the unfolded (im2col) inputs' Hessian; RTN with integer zero
            # points is what the blocked DequantizeLinear stores.
            gq = quantize_conv_weight(layer, config.bits, config.block_size, config.symmetric,
                                      config.mse_grid)
            w = layer.weight.detach().float().cpu().flatten(1)
            wq = gq.dequantize()[:, :w.shape[1]]
            q = NBitsConv2d(layer, gq).to(layer.weight.device)
            set_submodule(model.module, name, q)
            ctx.report.add_layer(name, kind="Conv2d", params=layer.weight.numel(),
                                 weight_bits=config.bits, act_bits=None,
                                 sqnr_db=round(sqnr_db(w, wq), 2), simulated=q.simulated,
                                 method="rtn", block_size=config.block_size)
            continue
        emb = isinstance(layer, nn.Embedding)
        bits = (config.embedding_bits or config.bits) if emb else config.bits
        method = "rtn" if emb else config.method  # GatherBlockQuantized: integer zero points
        gq = quantize_weight(layer.weight, bits, blocks[name], config.symmetric, method,
                             hessians.get(name), config.act_order, config.percdamp,
                             config.mse_grid)
        w = layer.weight.detach().float().cpu()
        wq = gq.dequantize()
        if name in hessians:
            # Output SQNR on the calibration inputs: tr(E H E^T) against tr(W H W^T).
            h = hessians[name].float()
            noise = float(((w - wq) @ h * (w - wq)).sum())
            sig = float((w @ h * w).sum())
            sqnr = 10 * torch.log10(torch.tensor(sig / max(noise, 1e-30))).item()
        else:
            sqnr = sqnr_db(w, wq)
        q = make_nbits(layer, gq, accuracy_level=config.accuracy_level).to(layer.weight.device)
        set_submodule(model.module, name, q)
        saved[name] = (gq, config.symmetric, type(layer).__name__)
        ctx.report.add_layer(name, kind=type(layer).__name__, params=layer.weight.numel(),
                             weight_bits=bits, act_bits=None, sqnr_db=round(sqnr, 2),
                             simulated=q.simulated, method=method, block_size=blocks[name])
    n_params = sum(layers[n].weight.numel() for n in layers)
    summary = {"quantized_layers": len(layers), "bits": config.bits, "method": config.method,
                   "block_size": config.block_size, "symmetric": config.symmetric,
                   "quantized_params": n_params, "float_layers": kept,
                   "smaller_blocks": smaller}
    if config.safetensors:
        from ..export.compressed_tensors import save_pack_quantized

        path = save_pack_quantized(model.module, saved, ctx.out_dir / "compressed-tensors")
        summary["safetensors"] = str(path.relative_to(ctx.out_dir))
        summary["safetensors_mb"] = round(path.stat().st_size / 1e6, 3)
    ctx.report.summary.update(summary)
