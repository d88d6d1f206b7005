"""Token merging and pruning passes for timm ViT/DeiT: ``tome`` and ``evit``.

Both reduce the tokens between each block's attention and its MLP (``patch.vit_tokens``), keep
class/distillation/register tokens, and export with token counts fixed per input resolution
(any batch size). ``auto`` searches the strength on the calibration data.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..context import PassContext
from ..errors import RecipeError, UnsupportedModelError
from ..models.handle import ModelHandle
from ..patch.vit_tokens import final_prunable, patch_vit, vit_token_count
from ..registry import PassConfig, register_pass
from ..tokens.merge import parse_r
from ..tokens.prune import keep_count
from ..tokens.schedule import estimated_speedup, search_strength


class AutoSchedule(BaseModel):
    """Search the strength on calibration data instead of fixing it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    speedup: float | None = Field(None, gt=1, description=(
        "estimated speed-up of the transformer blocks (from token counts) to reach"))
    max_accuracy_drop: float | None = Field(None, ge=0, description=(
        "classification: largest top-1 drop in points on the calibration set (against labels "
        "when it has them, else 100 - top-1 agreement with the original)"))
    min_cosine: float | None = Field(None, gt=0, le=1, description=(
        "text encoders and token-map models: smallest mean cosine (per embedding or per token) "
        "to the original on the calibration set"))
    max_samples: int = Field(256, ge=1, description="calibration samples per trial")

    @model_validator(mode="after")
    def _something(self):
        if self.speedup is None and self.max_accuracy_drop is None and self.min_cosine is None:
            raise ValueError("give speedup, max_accuracy_drop or min_cosine")
        return self


class TomeConfig(PassConfig):
    """ToMe token merging (bipartite soft matching, size-weighted, proportional attention).

    In every block, between attention and MLP, the ``r`` most similar token pairs (cosine of
    the keys averaged over heads) merge into their size-weighted average; attention adds
    log(size) so a merged token counts as the tokens it stands for. Class, distillation and
    register tokens are never merged. ``schedule: decreasing`` merges 2r in the first block
    down to 0 in the last (same total). ``auto`` picks r on the calibration data. Training-
    free; timm ViT/DeiT (Block, global_pool token or avg).

    Recipe:
        - type: tome
          r: 16
          schedule: constant
          prop_attn: true
    """

    type: Literal["tome"] = "tome"
    r: int | list[int] = Field(8, description="tokens merged per block, or one count per block")
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
    here (the paper fine-tunes); timm ViT/DeiT with a class token.

    Recipe:
        - type: evit
          keep_rate: 0.7
          locations: [3, 6, 9]
    """

    type: Literal["evit"] = "evit"
    keep_rate: float = Field(0.7, gt=0, le=1, description="share of patch tokens kept per stage")
    locations: list[int] | None = Field(None, description=(
        "0-based blocks that prune; default: depth/4, depth/2, 3*depth/4"))
    prop_attn: bool = Field(True, description="add log(size) to attention scores")
    auto: AutoSchedule | None = Field(None, description="search keep_rate instead")
    plot_images: int = Field(4, ge=0, description=(
        "calibration images pictured in the report with the patches each stage kept"))
    final_prefix_only: bool = Field(True, description=(
        "class-token-pooled models: run the last MLP on the prefix tokens only (exact)"))


# --------------------------------------------------------------------------- shared plumbing


def _vit_dims(module) -> tuple[int, float]:
    blk = module.blocks[0]
    return module.embed_dim, blk.mlp.fc1.out_features / module.embed_dim


def _outputs(handle: ModelHandle, ctx: PassContext, max_samples: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [handle.forward(b).float().cpu() for b in ctx.calib_batches(max_samples)]


def fidelity_check(handle: ModelHandle, ctx: PassContext, auto: AutoSchedule, field: str):
    """A function ``apply -> ok`` comparing the patched model with the original on calib."""
    if ctx.calib is None:
        return None
    if _is_classifier(handle):
        if auto.max_accuracy_drop is None:
            return None
    elif auto.min_cosine is None:
        return None
    ref = torch.cat(_outputs(handle, ctx, auto.max_samples)).numpy()
    labels = None if ctx.calib.labels is None else ctx.calib.labels[:len(ref)].numpy()

    def ok(apply) -> bool:
        apply()
        out = torch.cat(_outputs(handle, ctx, auto.max_samples)).numpy()
        if _is_classifier(handle):
            if labels is not None:
                drop = 100 * ((ref.argmax(-1) == labels).mean() - (out.argmax(-1) == labels).mean())
            else:
                drop = 100 * (1 - (ref.argmax(-1) == out.argmax(-1)).mean())
            return bool(drop <= auto.max_accuracy_drop)
        # Embeddings [S, C] or token maps [S, N, C]: the mean cosine over every vector.
        a = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        b = out / np.linalg.norm(out, axis=-1, keepdims=True)
        return bool((a * b).sum(-1).mean() >= auto.min_cosine)

    return ok


def _is_classifier(handle: ModelHandle) -> bool:
    return handle.task == "image-classification" and not handle.token_map


def check_auto(auto: AutoSchedule | None, handle: ModelHandle, ctx: PassContext) -> None:
    if auto is None:
        return
    p = f"passes.{ctx.index}.auto"
    if _is_classifier(handle) and auto.min_cosine is not None:
        raise RecipeError("min_cosine is for text encoders and token maps", [
            (f"{p}.min_cosine", "use max_accuracy_drop for classifiers")])
    if not _is_classifier(handle) and auto.max_accuracy_drop is not None:
        raise RecipeError("max_accuracy_drop is for classifiers", [
            (f"{p}.max_accuracy_drop", "use min_cosine for text encoders and token maps")])
    if (auto.max_accuracy_drop is not None or auto.min_cosine is not None) and ctx.calib is None:
        raise RecipeError("auto with a fidelity bound needs calibration data",
                          [("calibration", "required by " + p)])


def with_final(plan: list, module, enabled: bool) -> list:
    """Replace the last block's step by ("final",) where the output reads prefix tokens only."""
    if enabled and final_prunable(module):
        return [*plan[:-1], ("final",)]
    return plan


def plan_counts(n: int, protected: int, plan: list) -> list[int]:
    """Tokens entering each block (and leaving the last) under ``plan``."""
    counts = [n]
    for step in plan:
        if step is None:
            pass
        elif step[0] == "tome":
            n = n - min(step[1], (n - protected) // 2)
        elif step[0] == "final":
            n = protected
        else:
            rest = n - protected
            k = keep_count(rest, step[1])
            n = protected + k + (1 if k < rest else 0)
        counts.append(n)
    return counts


def _report_schedule(ctx: PassContext, counts: list[int], dim: int, ratio: float, **extra):
    ctx.report.summary.update(
        tokens_per_block=counts, estimated_speedup=round(estimated_speedup(counts, dim, ratio), 3),
        **extra)


def _require_vit(handle: ModelHandle, ctx: PassContext):
    if handle.task != "image-classification" or handle.module is None:
        raise UnsupportedModelError(
            f"passes.{ctx.index}: tome/evit work on timm ViT/DeiT classifiers; use "
            "text_token_prune for text encoders")


def _auto_needs_data(config) -> bool:
    """An automatic schedule with a fidelity target measures it on calibration data."""
    auto = config.auto
    return auto is not None and (auto.max_accuracy_drop is not None
                                 or auto.min_cosine is not None)


# --------------------------------------------------------------------------- tome


@register_pass(TomeConfig, needs_calibration=_auto_needs_data)
def tome(model: ModelHandle, config: TomeConfig, ctx: PassContext) -> None:
    _require_vit(model, ctx)
    check_auto(config.auto, model, ctx)
    module = model.module
    depth = len(module.blocks)
    n, protected = vit_token_count(module)
    dim, ratio = _vit_dims(module)
    if isinstance(config.r, list) and len(config.r) != depth:
        raise RecipeError("r does not fit the model", [
            (f"passes.{ctx.index}.r", f"{len(config.r)} entries for {depth} blocks")])

    def plan_for(r) -> list:
        rs = parse_r(depth, r, config.schedule)
        plan = [("tome", v) if v > 0 else None for v in rs]
        return with_final(plan, module, config.final_prefix_only), rs

    def counts_for(r) -> list[int]:
        return plan_counts(n, protected, plan_for(r)[0])

    r = config.r
    trials = None
    if config.auto is not None:
        rmax = (n - protected) // 2
        speed = lambda c: estimated_speedup(counts_for(c), dim, ratio)  # noqa: E731
        patch_vit(module, [None] * depth, config.prop_attn)
        ok = fidelity_check(model, ctx, config.auto, "auto")
        check = None if ok is None else (
            lambda c: ok(lambda: patch_vit(module, plan_for(c)[0], config.prop_attn)))
        r, trials = search_strength(range(rmax + 1), speed, check, config.auto.speedup)
        ctx.progress(0.9, f"chose r={r}")
    plan, rs = plan_for(r)
    patch_vit(module, plan, config.prop_attn)
    model.info["token_reduction"] = {"method": "tome", "r": rs}
    _report_schedule(ctx, counts_for(r), dim, ratio, method="tome", r=r if isinstance(r, int)
                     else list(r), schedule=config.schedule, protected_tokens=protected,
                     prop_attn=config.prop_attn, **({"auto_trials": trials} if trials else {}))


# --------------------------------------------------------------------------- evit


@register_pass(EvitConfig, needs_calibration=_auto_needs_data)
def evit(model: ModelHandle, config: EvitConfig, ctx: PassContext) -> None:
    _require_vit(model, ctx)
    check_auto(config.auto, model, ctx)
    module = model.module
    depth = len(module.blocks)
    n, protected = vit_token_count(module)
    dim, ratio = _vit_dims(module)
    if protected < 1:
        raise UnsupportedModelError(f"passes.{ctx.index}: evit needs a class token")
    locs = config.locations if config.locations is not None else sorted(
        {depth // 4, depth // 2, 3 * depth // 4})
    bad = [v for v in locs if not 0 <= v < depth]
    if bad:
        raise RecipeError("locations out of range", [
            (f"passes.{ctx.index}.locations", f"{bad} not in 0..{depth - 1}")])

    def plan_for(rate: float) -> list:
        plan = [("evit", rate) if i in locs and rate < 1 else None for i in range(depth)]
        return with_final(plan, module, config.final_prefix_only)

    rate, trials = config.keep_rate, None
    if config.auto is not None:
        cands = [round(1 - 0.05 * i, 2) for i in range(19)]   # 1.0 down to 0.1
        speed = lambda c: estimated_speedup(plan_counts(n, protected, plan_for(c)), dim, ratio)  # noqa: E731
        patch_vit(module, [None] * depth, config.prop_attn)
        ok = fidelity_check(model, ctx, config.auto, "auto")
        check = None if ok is None else (
            lambda c: ok(lambda: patch_vit(module, plan_for(c), config.prop_attn)))
        rate, trials = search_strength(cands, speed, check, config.auto.speedup)
    plan = plan_for(rate)
    patch_vit(module, plan, config.prop_attn)
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
    keep_rate: float | list[float] = Field(0.6, description=(
        "share of tokens kept at each pruning layer (one value, or one per layer)"))
    layers: list[int] | None = Field(None, description=(
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


@register_pass(TextTokenPruneConfig, needs_calibration=_auto_needs_data)
def text_token_prune(model: ModelHandle, config: TextTokenPruneConfig, ctx: PassContext) -> None:
    from ..patch.text_tokens import _encoder_parts, patch_text

    if model.task != "text-embedding" or model.module is None:
        raise UnsupportedModelError(
            f"passes.{ctx.index}: text_token_prune works on text encoders; use tome or evit "
            "for ViTs")
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
        return {i: r for i, r in zip(locs, rates) if r < 1}

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


# --------------------------------------------------------------------------- pictures


def kept_patch_masks(module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run ``x`` through a pruning ViT; per pruning stage a [B, H*W] bool mask of the original
    patches still present as tokens of their own, and the first stage's class-attention scores.
    """
    rec: list = []
    module._token_reduction["record"] = rec
    try:
        with torch.no_grad():
            module(x)
    finally:
        module._token_reduction.pop("record", None)
    grid = module.patch_embed.grid_size
    n = grid[0] * grid[1]
    pos = torch.arange(n).expand(x.shape[0], n)
    masks, first = [], None
    for scores, idx in rec:
        if first is None:
            first = scores
        cur = torch.cat([pos, torch.full_like(pos[:, :1], -1)], dim=1)  # -1: a fused token
        pos = cur.gather(1, idx)
        m = torch.zeros(x.shape[0], n + 1, dtype=torch.bool)
        m.scatter_(1, torch.where(pos < 0, n, pos), True)
        masks.append(m[:, :n])
        pos = torch.cat([pos, torch.full_like(pos[:, :1], -1)], dim=1)
    return masks, first


def save_kept_patch_plot(model: ModelHandle, ctx: PassContext, images: int = 4) -> None:
    """IA-RED²-style picture: per image, the importance map and the patches each stage kept."""
    if ctx.calib is None or "pixel_values" not in ctx.calib.inputs:
        return
    x = ctx.calib.inputs["pixel_values"][:images].to(ctx.device)
    masks, scores = kept_patch_masks(model.module, x)
    if masks:
        plot_kept_patches(model, ctx, x, masks, [("importance (CLS attn)", scores)])


def plot_kept_patches(model: ModelHandle, ctx: PassContext, x: torch.Tensor,
                      masks: list[torch.Tensor], maps: list[tuple[str, torch.Tensor]],
                      name: str = "kept_patches",
                      title: str = "Patches kept at each pruning stage (calibration images)",
                      stage_names: list[str] | None = None) -> None:
    """Per image (row): the input, each importance map ``maps`` [(title, [B, >= H*W])], and per
    stage the input with the dropped patches dimmed (``masks`` [B, H*W] bool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    module = model.module
    gh, gw = module.patch_embed.grid_size
    dc = model.data_config or {}
    mean = torch.tensor(dc.get("mean", [0.0] * x.shape[1]))[:, None, None]
    std = torch.tensor(dc.get("std", [1.0] * x.shape[1]))[:, None, None]
    names = stage_names or [f"stage {j + 1}" for j in range(len(masks))]
    first = 1 + len(maps)
    cols = first + len(masks)
    fig, axes = plt.subplots(len(x), cols, figsize=(2 * cols, 2 * len(x)), squeeze=False)
    for i in range(len(x)):
        img = (x[i].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        cmap = "gray" if img.ndim == 2 else None
        axes[i, 0].imshow(img, cmap=cmap)
        for j, (map_title, scores) in enumerate(maps):
            axes[i, 1 + j].imshow(scores[i, :gh * gw].reshape(gh, gw).cpu().numpy(),
                                  cmap="viridis")
            if i == 0:
                axes[i, 1 + j].set_title(map_title, fontsize=8)
        for j, m in enumerate(masks):
            keep = m[i].reshape(gh, gw).float().numpy()
            up = np.kron(keep, np.ones((img.shape[0] // gh, img.shape[1] // gw)))
            shown = img * (0.25 + 0.75 * (up if img.ndim == 2 else up[..., None]))
            axes[i, first + j].imshow(shown, cmap=cmap, vmin=0, vmax=1)
            axes[i, first + j].set_title(f"{names[j] + ': ' if i == 0 else ''}"
                                         f"{int(m[i].sum())} kept", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("input", fontsize=8)
    for a in axes.ravel():
        a.axis("off")
    ctx.save_plot(fig, name, title)
