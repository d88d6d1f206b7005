"""SQ-b: SmoothQuant with a per-channel shift, folded into LayerNorm and Linear parameters."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..context import PassContext
from ..models.handle import ModelHandle
from ..models.vim import RMSNorm
from ..patch.attention import route_qkv_bias
from ..quant.fold import outputs_match, trace_pairs
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
# Norms whose output is ``normalized * weight (+ bias)`` over the last dimension: the smoothing
# folds into weight and bias. Vim's RMSNorm has a weight and an optional bias for this.
NORMS: tuple[type, ...] = (nn.LayerNorm, RMSNorm)


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


@torch.no_grad()
def find_groups(model: ModelHandle, batch: dict[str, torch.Tensor]) -> list[Group]:
    """LayerNorm -> Linear groups, found from one traced forward on ``batch``.

    A group is a LayerNorm (over the last dimension, with a scale) and every Linear whose input
    is exactly its output: pre-LN transformer blocks (norm1 -> qkv or q/k/v, norm2 -> fc1 or
    SwiGLU's two projections), patch merging, ConvNeXt's channels-last norm -> fc1, BERT's
    LayerNorm -> q/k/v and -> intermediate.dense, Vision Mamba's RMSNorm -> in_proj. No Linear
    is recognised by name. Where the
    LayerNorm's output goes only to those Linears the smoothing folds into it; where it also
    feeds something else (post-LN BERT's residual), folding would change the model, which a
    trial fold detects on ``batch``, so the group keeps an explicit input step instead.
    """
    module = model.module
    pairs = trace_pairs(module, lambda: model.forward(batch), NORMS, (nn.Linear,))
    groups = []
    for norm_name, lin_names in pairs.items():
        norm = module.get_submodule(norm_name)
        linears = {n: module.get_submodule(n) for n in lin_names}
        if norm.weight is None or len(norm.normalized_shape) != 1 or \
                any(lin.in_features != norm.normalized_shape[0] for lin in linears.values()):
            continue
        groups.append(Group(norm_name, norm, linears, foldable=False))
    _mark_foldable(model, batch, groups)
    return groups


@torch.no_grad()
def _mark_foldable(model: ModelHandle, batch: dict[str, torch.Tensor],
                   groups: list[Group]) -> None:
    """Set ``foldable`` on the groups whose LayerNorm output feeds nothing but their Linears:
    fold a random smoothing into LayerNorm and Linears and see whether the output moves."""
    if not groups:
        return
    reference = model.forward(batch)
    gen = torch.Generator().manual_seed(0)

    def trial(group_list):
        saved = []
        for g in group_list:
            c = g.norm.normalized_shape[0]
            s = (torch.rand(c, generator=gen) + 0.5).to(g.norm.weight.device)
            z = (torch.randn(c, generator=gen) * 0.1).to(g.norm.weight.device)
            saved.append(_fold(g, s, z))
        ok = outputs_match(reference, model.forward(batch), rtol=1e-3)
        for g, state in zip(group_list, saved, strict=True):
            _restore(g, state)
        return ok

    if trial(groups):
        for g in groups:
            g.foldable = True
        return
    for g in groups:
        g.foldable = trial([g])


def _fold_into_linears(linears, s: torch.Tensor, z: torch.Tensor) -> None:
    """Give each Linear the smoothing: its weight takes the scale s, its bias the shift z."""
    for lin in linears:
        w, b = fold_into_linear(lin.weight, lin.bias, s, z)
        lin.weight.copy_(w)
        if lin.bias is None:
            lin.bias = nn.Parameter(b)
        else:
            lin.bias.copy_(b)


def _fold(g: Group, s: torch.Tensor, z: torch.Tensor) -> dict:
    """Fold ``(x - z) / s`` into the LayerNorm and its inverse into the Linears (in place);
    returns what ``_restore`` needs."""
    state = {"norm_weight": g.norm.weight.detach().clone(),
             "norm_bias": None if g.norm.bias is None else g.norm.bias.detach().clone(),
             "linears": {n: (lin.weight.detach().clone(),
                             None if lin.bias is None else lin.bias.detach().clone())
                         for n, lin in g.linears.items()}}
    _fold_into_linears(g.linears.values(), s, z)
    if g.norm.bias is None:
        g.norm.bias = nn.Parameter(torch.zeros_like(g.norm.weight))
    gamma, beta = fold_into_layernorm(g.norm.weight, g.norm.bias, s, z)
    g.norm.weight.copy_(gamma)
    g.norm.bias.copy_(beta)
    return state


def _restore(g: Group, state: dict) -> None:
    g.norm.weight.copy_(state["norm_weight"])
    if state["norm_bias"] is None:
        g.norm.bias = None
    else:
        g.norm.bias.copy_(state["norm_bias"])
    for n, lin in g.linears.items():
        w, b = state["linears"][n]
        lin.weight.copy_(w)
        if b is None:
            lin.bias = None
        else:
            lin.bias.copy_(b)


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
    if g.foldable:
        _fold(g, s, z)
    else:
        _fold_into_linears(linears, s, z)
        # One shared module: q, k and v export identical nodes on one input, which ORT's
        # common-subexpression elimination merges into one.
        transform = ChannelAffine(z, 1 / s)
        for lin in linears:
            lin.input_transform = transform
            lin.register_forward_pre_hook(apply_input_transform)
    return s, z


@register_pass(SmoothQuantConfig, needs_calibration=True)
def smooth_quant(model: ModelHandle, config: SmoothQuantConfig, ctx: PassContext) -> None:
    model.module.to(ctx.device)
    model.module.eval()
    batch = next(iter(ctx.calib_batches(min(8, len(ctx.calib)))))
    route_qkv_bias(model.module)  # so norm1 -> qkv shows up where qkv bypassed its forward
    groups = find_groups(model, batch)
    groups = [g for g in groups
              if not any(_matches(p, n, lin) for n, lin in g.linears.items()
                         for p in config.ignore)]
    if not groups:
        # Optional step: CNNs, or norms that reach their Linear through padding or reshapes
        # (Swin's window attention), have nothing to smooth; quantization still applies.
        ctx.report.summary.update(groups=0, folded=0, explicit=0, shift=config.shift, skipped=[
            "smooth_quant: no LayerNorm whose output is a Linear's input; nothing smoothed"])
        return
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
