"""SQ-b: SmoothQuant with a per-channel shift, folded into LayerNorm and Linear parameters."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..context import PassContext
from ..errors import UnsupportedModelError
from ..models.handle import ModelHandle
from ..quant.modules import ChannelAffine, apply_input_transform
from ..quant.smoothing import (
    fold_into_layernorm,
    fold_into_linear,
    quantized_linear_error,
    search_alpha,
    smoothing_factors,
)
from ..registry import PassConfig, register_pass
from ..targeting import LayerPatterns, _matches

ROWS_PER_GROUP = 4096  # calibration rows (tokens) kept per LayerNorm -> Linear group for alpha


class SmoothQuantConfig(PassConfig):
    """SmoothQuant with a per-channel shift (MPTQ-ViT's SQ-b) for LayerNorm -> Linear pairs.

    Moves activation outliers into the weights before quantization: the Linear input becomes
    ``(x - z) / s`` (``z`` centres each channel, ``s = max|x - z|^alpha / max|W|^(1-alpha)``)
    and the Linear's weight and bias absorb ``s`` and ``z`` so the float model computes the same
    function. Pre-LN ViT/DeiT (norm1 -> qkv, norm2 -> fc1) and timm patch merging fold it into
    the LayerNorm for free; post-LN BERT (attention.output.LayerNorm -> intermediate.dense,
    previous LayerNorm -> query/key/value) keeps it as one elementwise op before the Linear,
    because the LayerNorm output is also the residual. ``alpha: search`` picks, per group, the
    alpha with the least quantized output error on calibration data. Put it before ``quantize``.

    Recipe:
        - type: smooth_quant
          alpha: search
          alphas: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
          shift: true
    """

    type: Literal["smooth_quant"] = "smooth_quant"
    alpha: float | Literal["search"] = Field(
        0.5, description="migration strength in [0, 1], or 'search' over alphas per group")
    alphas: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                                description="grid for alpha: search")
    shift: bool = Field(True, description="per-channel shift z (SQ-b); false: plain SmoothQuant")
    w_bits: int = Field(8, ge=2, le=8, description="weight bits the alpha search assumes")
    a_bits: int = Field(8, ge=2, le=8, description="activation bits the alpha search assumes")
    ignore: LayerPatterns = Field(default_factory=list,
                                  description="Linear names (or re:regex) left unsmoothed")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if isinstance(v, float) and not 0 <= v <= 1:
            raise ValueError("alpha must be in [0, 1] or 'search'")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v):
        if not v or any(not 0 <= a <= 1 for a in v):
            raise ValueError("alphas must be a non-empty list of values in [0, 1]")
        return v


class Group:
    """A LayerNorm and the Linear layers that read its output."""

    def __init__(self, name: str, norm: nn.LayerNorm, linears: dict[str, nn.Linear],
                 foldable: bool):
        self.name, self.norm, self.linears, self.foldable = name, norm, linears, foldable
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def observe(self, x: torch.Tensor, gen: torch.Generator) -> None:
        x = x.detach().flatten(0, -2).float().cpu()
        lo, hi = x.amin(0), x.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.kept < ROWS_PER_GROUP:
            take = min(ROWS_PER_GROUP - self.kept, x.shape[0])
            self.rows.append(x[torch.randperm(x.shape[0], generator=gen)[:take]])
            self.kept += take


def find_groups(model: nn.Module) -> list[Group]:
    """LayerNorm -> Linear groups of timm ViT/DeiT blocks, timm patch merging and BERT layers."""
    groups = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if isinstance(getattr(m, "norm1", None), nn.LayerNorm) and \
                isinstance(getattr(attn, "qkv", None), nn.Linear) and \
                type(m).__name__ == "Block":  # timm ViT/DeiT; Swin pads after norm1
            groups.append(Group(f"{p}norm1", m.norm1, {f"{p}attn.qkv": attn.qkv}, True))
            if isinstance(getattr(m, "norm2", None), nn.LayerNorm) and \
                    isinstance(getattr(mlp, "fc1", None), nn.Linear):
                groups.append(Group(f"{p}norm2", m.norm2, {f"{p}mlp.fc1": mlp.fc1}, True))
        elif type(m).__name__ == "PatchMerging" and isinstance(getattr(m, "norm", None),
                                                                nn.LayerNorm) \
                and isinstance(getattr(m, "reduction", None), nn.Linear):
            groups.append(Group(f"{p}norm", m.norm, {f"{p}reduction": m.reduction}, True))
        elif hasattr(m, "layer") and isinstance(m.layer, nn.ModuleList) and \
                all(hasattr(layer, "attention") and hasattr(layer, "intermediate")
                    for layer in m.layer):
            groups += _bert_groups(model, name, m)
    return groups


def _bert_groups(model: nn.Module, name: str, encoder: nn.Module) -> list[Group]:
    groups = []
    parent = name.rpartition(".")[0]
    emb_name = f"{parent}.embeddings" if parent else "embeddings"
    try:
        prev_name, prev = f"{emb_name}.LayerNorm", model.get_submodule(f"{emb_name}.LayerNorm")
    except AttributeError:
        prev_name, prev = None, None
    for i, layer in enumerate(encoder.layer):
        p = f"{name}.layer.{i}"
        sa = layer.attention.self
        if isinstance(prev, nn.LayerNorm):
            groups.append(Group(prev_name, prev, {f"{p}.attention.self.{k}": getattr(sa, k)
                                                  for k in ("query", "key", "value")}, False))
        groups.append(Group(f"{p}.attention.output.LayerNorm", layer.attention.output.LayerNorm,
                            {f"{p}.intermediate.dense": layer.intermediate.dense}, False))
        prev_name, prev = f"{p}.output.LayerNorm", layer.output.LayerNorm
    return groups


@torch.no_grad()
def collect(model: ModelHandle, groups: list[Group], ctx: PassContext) -> None:
    gen = torch.Generator().manual_seed(0)
    hooks = []
    for g in groups:
        first = next(iter(g.linears.values()))
        hooks.append(first.register_forward_pre_hook(
            lambda mod, args, g=g: g.observe(args[0], gen)))
    try:
        n, total = 0, len(ctx.calib)
        for batch in ctx.calib_batches():
            model.forward(batch)
            n += next(iter(batch.values())).shape[0]
            ctx.progress(0.7 * n / total, f"collecting activation ranges {n}/{total}")
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def smooth_group(g: Group, alpha: float, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the smoothing of ``g`` into its parameters; returns (s, z)."""
    linears = list(g.linears.values())
    dev = linears[0].weight.device
    s, z = smoothing_factors(g.min, g.max, [lin.weight.cpu() for lin in linears], alpha, shift)
    s, z = s.to(dev), z.to(dev)
    for lin in linears:
        w, b = fold_into_linear(lin.weight, lin.bias, s, z)
        lin.weight.copy_(w)
        if lin.bias is None:
            lin.bias = nn.Parameter(b)
        else:
            lin.bias.copy_(b)
    if g.foldable:
        gamma, beta = fold_into_layernorm(g.norm.weight, g.norm.bias, s, z)
        g.norm.weight.copy_(gamma)
        g.norm.bias.copy_(beta)
    else:
        # One shared module: q, k and v export identical nodes on one input, which ORT's
        # common-subexpression elimination merges into one.
        transform = ChannelAffine(z, 1 / s)
        for lin in linears:
            lin.input_transform = transform
            lin.register_forward_pre_hook(apply_input_transform)
    return s, z


@register_pass(SmoothQuantConfig, needs_calibration=True)
def smooth_quant(model: ModelHandle, config: SmoothQuantConfig, ctx: PassContext) -> None:
    groups = find_groups(model.module)
    groups = [g for g in groups
              if not any(_matches(p, n, lin) for n, lin in g.linears.items()
                         for p in config.ignore)]
    if not groups:
        raise UnsupportedModelError(
            "smooth_quant found no LayerNorm -> Linear pair (timm ViT/DeiT blocks, patch merging, "
            "BERT layers) to smooth")
    model.module.to(ctx.device)
    collect(model, groups, ctx)
    for i, g in enumerate(groups):
        if g.min is None:
            continue
        ctx.progress(0.7 + 0.3 * i / len(groups), f"smoothing {g.name}")
        x = torch.cat(g.rows)
        weights = [(lin.weight.detach().cpu().float(),
                    None if lin.bias is None else lin.bias.detach().cpu().float())
                   for lin in g.linears.values()]
        one, zero = torch.ones(x.shape[1]), torch.zeros(x.shape[1])
        before = sum(quantized_linear_error(x, w, b, one, zero, config.w_bits, config.a_bits)
                     for w, b in weights)
        if config.alpha == "search":
            alpha, errors = search_alpha(x, weights, config.alphas, config.shift, config.w_bits,
                                         config.a_bits)
        else:
            alpha = config.alpha
            _, errors = search_alpha(x, weights, [alpha], config.shift, config.w_bits,
                                     config.a_bits)
        s, _ = smooth_group(g, alpha, config.shift)
        for name in g.linears:
            ctx.report.add_layer(name, smooth_alpha=alpha, smooth_folded=g.foldable,
                                 smooth_err_before=round(before, 5),
                                 smooth_err_after=round(errors[alpha], 5),
                                 smooth_scale_range=[round(float(s.min()), 4),
                                                     round(float(s.max()), 4)])
    ctx.report.summary.update(
        groups=len(groups), folded=sum(g.foldable for g in groups),
        explicit=sum(not g.foldable for g in groups), shift=config.shift,
        alpha=config.alpha if config.alpha != "search" else "search")
