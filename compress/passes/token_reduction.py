"""Token merging and pruning passes for plain-token ViTs: ``tome``, ``evit``, ``text_token_prune``.

Which models they apply to is ``compress.models.kind``'s decision (timm VisionTransformer and
Eva: ViT, DeiT, DeiT3, EVA-02, ViT with registers); other kinds get exit 2 naming what applies.

Both reduce the tokens between each block's attention and its MLP (``patch.vit_tokens``), keep
class/distillation/register tokens, and export with token counts fixed per input resolution
(any batch size). ``auto`` searches the strength on the calibration data.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..context import PassContext
from ..errors import RecipeError, UnsupportedModelError
from ..models.handle import ModelHandle
from ..models.kind import model_kind, require
from ..patch.vit_tokens import (
    check_token_model,
    patch_vit,
    vit_dims,
    vit_token_count,
    with_prefix_only,
)
from ..registry import PassConfig, register_pass
from ..specs import TokenCount
from ..tokens.auto import AutoSchedule, auto_needs_data, check_auto, fidelity_check
from ..tokens.merge import parse_r
from ..tokens.pictures import save_kept_patch_plot
from ..tokens.plan import Merge, Prune, plan_counts
from ..tokens.prune import keep_count
from ..tokens.schedule import estimated_speedup, search_strength

__all__ = ["AutoSchedule", "EvitConfig", "TextTokenPruneConfig", "TomeConfig", "evit",
           "text_token_prune", "tome"]


class TomeConfig(PassConfig):
    """ToMe token merging (bipartite soft matching, size-weighted, proportional attention).

    In every block, between attention and MLP, the ``r`` most similar token pairs (cosine of
    the keys averaged over heads) merge into their size-weighted average; attention adds
    log(size) so a merged token counts as the tokens it stands for. Class, distillation and
    register tokens are never merged. ``schedule: decreasing`` merges 2r in the first block
    down to 0 in the last (same total). ``auto`` picks r on the calibration data. Training-
    free; timm plain-token ViTs (ViT/DeiT/DeiT3/EVA-02, registers; global_pool token or avg).

    Recipe:
        - type: tome
          r: 16
          schedule: constant
          prop_attn: true
    """

    type: Literal["tome"] = "tome"
    r: TokenCount | Annotated[list[TokenCount], Field(max_length=256)] = Field(
        8, description="tokens merged per block, or one count per block")
    schedule: Literal["constant", "decreasing"] = "constant"
    prop_attn: bool = Field(True, description="add log(size) to attention scores")
    auto: AutoSchedule | None = Field(None, description="search r instead (overrides r)")
    final_prefix_only: bool = Field(True, description=(
        "class-token-pooled models: run the last MLP on the prefix tokens only (exact)"))

    @model_validator(mode="after")
    def _r(self):
        rs = self.r if isinstance(self.r, list) else [self.r]
        if any(v < 0 for v in rs):
            raise ValueError("r must be >= 0")
        return self


class EvitConfig(PassConfig):
    """EViT attentive token pruning: keep the tokens the class token attends to most.

    At the chosen blocks, after attention, the ``keep_rate`` share of patch tokens with the
    highest class-token attention (mean over heads) is kept in order and the rest is fused into
    one token (their attention-weighted average, carrying their summed size). Training-free
    here (the paper fine-tunes); timm plain-token ViTs with a class token.

    Recipe:
        - type: evit
          keep_rate: 0.7
          locations: [3, 6, 9]
    """

    type: Literal["evit"] = "evit"
    keep_rate: float = Field(0.7, gt=0, le=1, description="share of patch tokens kept per stage")
    locations: list[Annotated[int, Field(ge=0, le=255)]] | None = Field(
        None, max_length=256, description=(
        "0-based blocks that prune; default: depth/4, depth/2, 3*depth/4"))
    prop_attn: bool = Field(True, description="add log(size) to attention scores")
    auto: AutoSchedule | None = Field(None, description="search keep_rate instead")
    plot_images: int = Field(4, ge=0, le=32, description=(
        "calibration images pictured in the report with the patches each stage kept"))
    final_prefix_only: bool = Field(True, description=(
        "class-token-pooled models: run the last MLP on the prefix tokens only (exact)"))


# --------------------------------------------------------------------------- shared plumbing


def _report_schedule(ctx: PassContext, counts: list[int], dim: int, ratio: float, **extra):
    ctx.report.summary.update(
        tokens_per_block=counts, estimated_speedup=round(estimated_speedup(counts, dim, ratio), 3),
        **extra)


def _require_vit(handle: ModelHandle, ctx: PassContext, pass_name: str):
    """The model's kind; UnsupportedModelError (exit 2) naming what applies instead."""
    kind = model_kind(handle)
    where = f"passes.{ctx.index}"
    if handle.task != "image-classification" or handle.module is None:
        require(kind, pass_name, ("plain_vit",), needs_runner=True, where=where)
    return check_token_model(handle.module, pass_name, where)


# --------------------------------------------------------------------------- tome


@register_pass(TomeConfig, needs_calibration=auto_needs_data)
def tome(model: ModelHandle, config: TomeConfig, ctx: PassContext) -> None:
    _require_vit(model, ctx, "tome")
    check_auto(config.auto, model, ctx)
    module = model.module
    depth = len(module.blocks)
    n, protected = vit_token_count(module)
    dim, ratio = vit_dims(module)
    if isinstance(config.r, list) and len(config.r) != depth:
        raise RecipeError("r does not fit the model", [
            (f"passes.{ctx.index}.r", f"{len(config.r)} entries for {depth} blocks")])

    def plan_for(r) -> list:
        rs = parse_r(depth, r, config.schedule)
        plan = [Merge(v) if v > 0 else None for v in rs]
        return with_prefix_only(plan, module, config.final_prefix_only), rs

    def counts_for(r) -> list[int]:
        return plan_counts(n, protected, plan_for(r)[0])

    r = config.r
    trials = None
    if config.auto is not None:
        rmax = (n - protected) // 2
        speed = lambda c: estimated_speedup(counts_for(c), dim, ratio)  # noqa: E731
        patch_vit(module, [None] * depth, config.prop_attn, config.type)
        ok = fidelity_check(model, ctx, config.auto, "auto")
        check = None if ok is None else (
            lambda c: ok(lambda: patch_vit(module, plan_for(c)[0], config.prop_attn, config.type)))
        r, trials = search_strength(range(rmax + 1), speed, check, config.auto.speedup)
        ctx.progress(0.9, f"chose r={r}")
    plan, rs = plan_for(r)
    patch_vit(module, plan, config.prop_attn, config.type)
    model.info["token_reduction"] = {"method": "tome", "r": rs}
    _report_schedule(ctx, counts_for(r), dim, ratio, method="tome", r=r if isinstance(r, int)
                     else list(r), schedule=config.schedule, protected_tokens=protected,
                     prop_attn=config.prop_attn, **({"auto_trials": trials} if trials else {}))


# --------------------------------------------------------------------------- evit


@register_pass(EvitConfig, needs_calibration=auto_needs_data)
def evit(model: ModelHandle, config: EvitConfig, ctx: PassContext) -> None:
    kind = _require_vit(model, ctx, "evit")
    check_auto(config.auto, model, ctx)
    module = model.module
    depth = len(module.blocks)
    n, protected = vit_token_count(module)
    dim, ratio = vit_dims(module)
    if "class_token" not in kind.features:
        raise UnsupportedModelError(
            f"passes.{ctx.index}: evit ranks tokens by the class token's attention and "
            f"{kind.arch} has no class token ({kind.why}); use tome, which needs none")
    locs = config.locations if config.locations is not None else sorted(
        {depth // 4, depth // 2, 3 * depth // 4})
    bad = [v for v in locs if not 0 <= v < depth]
    if bad:
        raise RecipeError("locations out of range", [
            (f"passes.{ctx.index}.locations", f"{bad} not in 0..{depth - 1}")])

    def plan_for(rate: float) -> list:
        plan = [Prune(rate) if i in locs and rate < 1 else None for i in range(depth)]
        return with_prefix_only(plan, module, config.final_prefix_only)

    rate, trials = config.keep_rate, None
    if config.auto is not None:
        cands = [round(1 - 0.05 * i, 2) for i in range(19)]   # 1.0 down to 0.1
        speed = lambda c: estimated_speedup(plan_counts(n, protected, plan_for(c)), dim, ratio)  # noqa: E731
        patch_vit(module, [None] * depth, config.prop_attn, config.type)
        ok = fidelity_check(model, ctx, config.auto, "auto")
        check = None if ok is None else (
            lambda c: ok(lambda: patch_vit(module, plan_for(c), config.prop_attn, config.type)))
        rate, trials = search_strength(cands, speed, check, config.auto.speedup)
    plan = plan_for(rate)
    patch_vit(module, plan, config.prop_attn, config.type)
    model.info["token_reduction"] = {"method": "evit", "keep_rate": rate, "locations": locs}
    if config.plot_images:
        save_kept_patch_plot(model, ctx, config.plot_images)
    _report_schedule(ctx, plan_counts(n, protected, plan), dim, ratio, method="evit",
                     keep_rate=rate, locations=locs, protected_tokens=protected,
                     **({"auto_trials": trials} if trials else {}))


# --------------------------------------------------------------------------- text


class TextTokenPruneConfig(PassConfig):
    """Attention-based token pruning for BERT-family sentence encoders (pooled embeddings).

    At the chosen layers, between attention and feed-forward, tokens are ranked by the
    attention they receive from the real tokens (mean over heads and queries); the
    ``keep_rate`` share of the (padded) length is kept in order. [CLS] is never dropped, [SEP]
    ranks first, padding last. With ``fuse`` the dropped tokens become one token weighted by
    their count, so mean pooling still weighs every original token once. The keep count is
    computed from the sequence length with integer ops: one ONNX graph for every length.
    ``auto`` searches one keep rate for all chosen layers on the calibration data.

    Recipe:
        - type: text_token_prune
          layers: [2, 4]
          keep_rate: 0.6
    """

    type: Literal["text_token_prune"] = "text_token_prune"
    keep_rate: float | Annotated[list[float], Field(max_length=256)] = Field(
        0.6, description=(
        "share of tokens kept at each pruning layer (one value, or one per layer)"))
    layers: list[Annotated[int, Field(ge=0, le=255)]] | None = Field(
        None, max_length=256, description=(
        "0-based encoder layers that prune; default: depth/3 and 2*depth/3"))
    fuse: bool = Field(True, description="fuse dropped tokens into one, weighted by their count")
    prop_attn: bool = Field(True, description="add log(size) of fused tokens to attention")
    auto: AutoSchedule | None = Field(None, description="search keep_rate instead")

    @model_validator(mode="after")
    def _rates(self):
        rates = self.keep_rate if isinstance(self.keep_rate, list) else [self.keep_rate]
        if not all(0 < r <= 1 for r in rates):
            raise ValueError("keep_rate must be in (0, 1]")
        if isinstance(self.keep_rate, list) and self.layers is not None and \
                len(self.keep_rate) != len(self.layers):
            raise ValueError("keep_rate list needs one entry per layer")
        return self


def text_counts(n: int, plan: dict[int, float], depth: int, fuse: bool) -> list[int]:
    counts = [n]
    for i in range(depth):
        if i in plan:
            k = keep_count(n - 1, plan[i])
            n = 1 + k + (1 if fuse and k < n - 1 else 0)
        counts.append(n)
    return counts


@register_pass(TextTokenPruneConfig, needs_calibration=auto_needs_data)
def text_token_prune(model: ModelHandle, config: TextTokenPruneConfig, ctx: PassContext) -> None:
    from ..patch.text_tokens import _encoder_parts, patch_text

    if model.task != "text-embedding" or model.module is None:
        require(model_kind(model), "text_token_prune", ("text_encoder",),
                where=f"passes.{ctx.index}")
    check_auto(config.auto, model, ctx)
    _, layers = _encoder_parts(model.module.transformer)
    depth = len(layers)
    p = f"passes.{ctx.index}"
    locs = config.layers if config.layers is not None else sorted({depth // 3, 2 * depth // 3})
    bad = [v for v in locs if not 0 <= v < depth]
    if bad:
        raise RecipeError("layers out of range", [(f"{p}.layers", f"{bad} not in 0..{depth - 1}")])
    if isinstance(config.keep_rate, list) and len(config.keep_rate) != len(locs):
        raise RecipeError("keep_rate does not fit layers", [
            (f"{p}.keep_rate", f"{len(config.keep_rate)} rates for {len(locs)} layers")])
    sep = getattr(model.tokenizer, "sep_token_id", None)
    sep = -1 if sep is None else sep
    cfg = model.module.transformer.config
    dim, ratio = cfg.hidden_size, cfg.intermediate_size / cfg.hidden_size
    seq = 128

    def plan_for(rate) -> dict[int, float]:
        rates = rate if isinstance(rate, list) else [rate] * len(locs)
        return {i: r for i, r in zip(locs, rates, strict=False) if r < 1}

    def apply(rate) -> None:
        patch_text(model.module, plan_for(rate), sep, config.fuse, config.prop_attn)

    rate, trials = config.keep_rate, None
    if config.auto is not None:
        cands = [round(1 - 0.05 * i, 2) for i in range(19)]
        speed = lambda c: estimated_speedup(text_counts(seq, plan_for(c), depth, config.fuse),  # noqa: E731
                                            dim, ratio)
        apply(1.0)
        ok = fidelity_check(model, ctx, config.auto, "auto")
        check = None if ok is None else (lambda c: ok(lambda: apply(c)))
        rate, trials = search_strength(cands, speed, check, config.auto.speedup)
    apply(rate)
    counts = text_counts(seq, plan_for(rate), depth, config.fuse)
    model.info["token_reduction"] = {"method": "text_token_prune", "keep_rate": rate,
                                     "layers": locs}
    _report_schedule(ctx, counts, dim, ratio, method="text_token_prune", keep_rate=rate,
                     layers=locs, fuse=config.fuse, estimate_seq_len=seq,
                     **({"auto_trials": trials} if trials else {}))
