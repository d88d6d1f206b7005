"""ToP-ViM token pruning for Vision Mamba classifiers: ``top_vim``.

The scores, the order-preserving top-k and the alignment modes are tensor functions in
``compress.tokens.top_vim``; this module validates the schedule against the model, optionally
searches it on the calibration data (``auto``), hangs a ``TopVimPruner`` on the model's
``token_pruner`` hook, optionally fine-tunes by distillation from the unpruned model, and
reports the token schedule, the calibration fidelity and the kept patches.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..context import PassContext
from ..errors import RecipeError, UnsupportedModelError
from ..models.handle import ModelHandle
from ..models.kind import model_kind, require
from ..registry import PassConfig, register_pass
from ..tokens.auto import AutoSchedule, check_auto
from ..tokens.top_vim import (
    TopVimPruner,
    estimated_speedup,
    kept_patch_masks,
    layer_token_counts,
    location_families,
    patch_scores,
)

KEEP_CANDIDATES = [round(1 - 0.05 * i, 2) for i in range(15)]   # 1.0 down to 0.3


class TopVimFinetune(BaseModel):
    """Short distillation from the unpruned model (the paper fine-tunes for up to 30 epochs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(0, ge=0, le=1_000_000, description="training steps (0: training-free)")
    lr: float = Field(1e-5, gt=0, le=1, description="AdamW learning rate (paper: 5e-6 to 1e-5)")
    batch_size: int = Field(32, ge=1, le=1024)
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup: float = Field(0.1, ge=0, le=1, description="fraction of steps of linear warm-up")
    temperature: float = Field(1.0, gt=0, description="KL temperature on the logits")
    label_weight: float = Field(0.5, ge=0, description=(
        "cross-entropy on the calibration labels, when the data has them"))
    max_seconds: float | None = Field(None, gt=0, description="stop training after this long")


class TopVimConfig(PassConfig):
    """ToP-ViM token pruning for Vision Mamba (Vim): keep the tokens the SSM scores highest.

    After each layer in ``after_layers`` (counted from 1 as in the paper: ``[10, 20]`` prunes
    after the 10th and the 20th block), every token is scored by the channel sum of that layer's
    SSM output (``direction: bwd`` is the released code's backward branch; ``clipped_sum``
    clips negative values first, as the paper says); the best ``ceil(keep * (N - 1))`` (made
    odd) tokens are kept, the patch tokens **in scan order** with the class token re-inserted
    in the middle, and hidden state and residual are gathered (``alignment: gather``, the
    released code). ``alignment: gap_decay`` is our reconstruction of the paper's unreleased
    hidden-state alignment: the scan additionally decays its state across each pruned gap by
    ``exp(A * gap * softplus(dt_bias))``, as if the pruned tokens were still there without
    input. ``alignment: mask`` zeroes the pruned tokens in place and keeps every position: an
    upper bound on alignment, without any speed-up. ``mirrored`` reproduces the released code's
    reading of the backward output in reversed token order. Training-free unless
    ``finetune.steps`` > 0 (distillation from the unpruned model on the calibration data).
    ``auto`` searches the keep ratio (and, without ``after_layers``, the locations among
    ToP-ViM's spacings) on the calibration data. Paper: "Exploring Token Pruning in Vision
    State Space Models" (NeurIPS 2024); code: https://github.com/ZLKong/ToP-ViM.

    Recipe:
        - type: top_vim
          after_layers: [10, 20]
          keep: 0.8
          score: sum
          alignment: gather
    """

    type: Literal["top_vim"] = "top_vim"
    after_layers: list[Annotated[int, Field(ge=1, le=255)]] | None = Field(
        None, max_length=64, description=(
        "1-based layers after which to prune (as in the paper); default: 5/12 and 5/6 of the "
        "depth (ToP-ViM's Vim-T schedule: 10 and 20 of 24)"))
    keep: float | Annotated[list[float], Field(max_length=64)] = Field(0.8, description=(
        "share of the patch tokens kept at each pruning step (one value, or one per location)"))
    score: Literal["sum", "clipped_sum"] = Field("sum", description=(
        "channel sum of the SSM output (released code) or of its positive part (paper)"))
    direction: Literal["bwd", "fwd", "both"] = Field("bwd", description=(
        "which SSM branch scores the tokens (released code: bwd)"))
    mirrored: bool = Field(False, description=(
        "read the backward output in reversed token order, as the released code does"))
    alignment: Literal["gather", "mask", "gap_decay"] = Field("gather", description=(
        "gather: released code; gap_decay: ours (state decays across pruned gaps); mask: "
        "pruned tokens zeroed in place (upper bound, no speed-up)"))
    auto: AutoSchedule | None = Field(None, description=(
        "search keep (and locations when after_layers is not given) instead"))
    finetune: TopVimFinetune = Field(default_factory=TopVimFinetune)
    plot_images: int = Field(4, ge=0, le=32, description=(
        "calibration images pictured in the report with the patches each step kept"))

    @model_validator(mode="after")
    def _check(self):
        keeps = self.keep if isinstance(self.keep, list) else [self.keep]
        if not all(0 < r <= 1 for r in keeps):
            raise ValueError("keep must be in (0, 1]")
        if self.after_layers is not None:
            if not self.after_layers:
                raise ValueError("after_layers must name at least one layer")
            if len(set(self.after_layers)) != len(self.after_layers):
                raise ValueError("after_layers must not repeat a layer")
        if isinstance(self.keep, list) and (self.after_layers is None or
                                            len(self.keep) != len(self.after_layers)):
            raise ValueError("a keep list needs after_layers with one entry per keep ratio")
        if self.mirrored and self.direction == "fwd":
            raise ValueError("mirrored reads the backward branch: use direction bwd or both")
        return self


def _needs_calibration(config: TopVimConfig) -> bool:
    auto = config.auto
    return config.finetune.steps > 0 or (auto is not None and auto.max_accuracy_drop is not None)


def _require_vim(model: ModelHandle, ctx: PassContext):
    from ..models.vim import VisionMamba

    kind = model_kind(model)
    where = f"passes.{ctx.index}"
    if kind.kind != "vim" or model.task != "image-classification":
        require(kind, "top_vim", ("vim",), where=where)
    if not isinstance(model.module, VisionMamba):
        raise UnsupportedModelError(
            f"{where}: top_vim drives compress.models.vim.VisionMamba (the ``vim`` model "
            f"source); this model is {type(model.module).__name__}")
    return model.module


def _pruner(config: TopVimConfig, locs: list[int], keep) -> TopVimPruner | None:
    keeps = keep if isinstance(keep, list) else [keep] * len(locs)
    if all(r >= 1 for r in keeps):
        return None
    return TopVimPruner(locs, keeps, score=config.score, direction=config.direction,
                        mirrored=config.mirrored, alignment=config.alignment)


def _predictions(model: ModelHandle, ctx: PassContext, max_samples: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.forward(b).float().cpu() for b in ctx.calib_batches(max_samples)])


def _drop(ref: torch.Tensor, out: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Top-1 drop in points: against the labels when given, else 100 - agreement."""
    if labels is not None:
        return 100 * ((ref.argmax(-1) == labels).float().mean()
                      - (out.argmax(-1) == labels).float().mean()).item()
    return 100 * (1 - (ref.argmax(-1) == out.argmax(-1)).float().mean().item())


def _search(model: ModelHandle, config: TopVimConfig, ctx: PassContext, families: list[list[int]],
            n: int, depth: int) -> tuple[list[int], float, list[dict]]:
    """(locations, keep, trials): ``auto`` over the keep ratio and the location families."""
    module = model.module
    auto = config.auto
    measure = ctx.calib is not None
    ref = labels = None
    if measure:
        module.token_pruner = None
        ref = _predictions(model, ctx, auto.max_samples)
        labels = None if ctx.calib.labels is None else ctx.calib.labels[:len(ref)].long()
    trials: list[dict] = []
    drops: dict[tuple, float] = {}

    def speed(locs, keep) -> float:
        return estimated_speedup(layer_token_counts(n, depth, locs, [keep] * len(locs)))

    def drop(locs, keep) -> float:
        key = (tuple(locs), keep)
        if key not in drops:
            module.token_pruner = _pruner(config, locs, keep)
            drops[key] = round(_drop(ref, _predictions(model, ctx, auto.max_samples), labels), 3)
            trials.append({"after_layers": locs, "keep": keep,
                           "estimated_speedup": round(speed(locs, keep), 3),
                           "top1_drop": drops[key]})
        return drops[key]

    bound = auto.max_accuracy_drop
    picks = []
    for locs in families:
        cands = KEEP_CANDIDATES
        hi = len(cands) - 1
        if auto.speedup is not None:
            reach = [i for i, c in enumerate(cands) if speed(locs, c) >= auto.speedup]
            hi = reach[0] if reach else hi
        if bound is None:
            picks.append((locs, cands[hi]))
            continue
        lo, best = 0, 0
        # Binary search for the strongest passing keep (the top-1 drop grows as keep falls).
        while lo <= hi:
            mid = (lo + hi) // 2
            if drop(locs, cands[mid]) <= bound:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        picks.append((locs, cands[best]))
    ctx.progress(0.6, "auto: comparing location schedules")
    if bound is not None:
        # The fastest schedule that keeps the bound; ties go to the smaller drop.
        locs, keep = max(picks, key=lambda p: (round(speed(*p), 3), -drops.get(
            (tuple(p[0]), p[1]), 0.0)))
    elif measure and len(picks) > 1:
        # Each schedule just reaches the speed target: take the one that costs the least.
        locs, keep = min(picks, key=lambda p: (drop(*p), -speed(*p)))
    else:
        locs, keep = picks[0]
        if not trials:
            trials.append({"after_layers": locs, "keep": keep,
                           "estimated_speedup": round(speed(locs, keep), 3)})
    module.token_pruner = None
    return locs, keep, trials


def _finetune(model: ModelHandle, config: TopVimConfig, ctx: PassContext) -> dict:
    from ..distill import DistillSettings, distill

    ft = config.finetune
    module = model.module
    teacher = copy.deepcopy(module)
    teacher.token_pruner = None
    settings = DistillSettings(
        method="output", steps=ft.steps, lr=ft.lr, batch_size=ft.batch_size,
        weight_decay=ft.weight_decay, warmup=ft.warmup, max_seconds=ft.max_seconds,
        label_weight=ft.label_weight, temperature=ft.temperature,
        log_every=max(1, ft.steps // 50))
    for p in module.parameters():
        p.requires_grad_(True)
    try:
        result = distill(module, teacher, ctx.calib.inputs, ctx.calib.labels,
                         lambda m, b: m(b["pixel_values"]), model.task, settings, ctx.device,
                         progress=lambda f, m: ctx.progress(0.65 + 0.25 * f, m))
    finally:
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
    return {"method": "output (KL to the unpruned model"
            + (" + labels)" if ctx.calib.labels is not None and ft.label_weight > 0 else ")"),
            "steps": result.steps, "seconds": result.seconds, "device": result.device,
            "stopped_early": result.stopped_early, "samples": len(ctx.calib),
            "first": result.first, "last": result.last}


def _plot(model: ModelHandle, ctx: PassContext, pruner: TopVimPruner, images: int) -> None:
    from ..tokens.pictures import plot_kept_patches

    if ctx.calib is None or "pixel_values" not in ctx.calib.inputs:
        return
    module = model.module
    x = ctx.calib.inputs["pixel_values"][:images].to(ctx.device)
    pruner.record = []
    try:
        with torch.no_grad():
            module(x)
        rec = pruner.record
    finally:
        pruner.record = None
    cls_pos = module.cls_position
    patches = module.patch_embed.num_patches
    masks = kept_patch_masks([pos for _, _, pos in rec], cls_pos, patches)
    first_layer, first_scores, _ = rec[0]
    names = [f"after layer {i + 1}" for i, _, _ in rec]
    plot_kept_patches(model, ctx, x, masks,
                      [(f"score, layer {first_layer + 1}", patch_scores(first_scores, cls_pos))],
                      name="kept_patches",
                      title="ToP-ViM: SSM importance and the patches kept after each pruning "
                            "step (calibration images)", stage_names=names)


@register_pass(TopVimConfig, needs_calibration=_needs_calibration)
def top_vim(model: ModelHandle, config: TopVimConfig, ctx: PassContext) -> None:
    module = _require_vim(model, ctx)
    check_auto(config.auto, model, ctx)
    p = f"passes.{ctx.index}"
    depth = len(module.layers)
    n = module.patch_embed.num_patches + 1
    if config.after_layers is not None:
        bad = [v for v in config.after_layers if not 1 <= v < depth]
        if bad:
            raise RecipeError("after_layers out of range", [
                (f"{p}.after_layers", f"{bad} not in 1..{depth - 1} (1-based; pruning after "
                 f"the last of {depth} layers would change nothing)")])
        families = [sorted(config.after_layers)]
    else:
        families = location_families(depth)
    if not families:
        raise RecipeError("the model is too shallow to prune", [
            (p, f"{depth} layer(s): top_vim prunes between layers")])
    if config.auto is not None and config.alignment == "mask":
        raise RecipeError("auto searches a speed-up and alignment mask gives none", [
            (f"{p}.alignment", "use gather or gap_decay with auto")])
    module.eval()

    trials = None
    if config.auto is not None:
        locs, keep, trials = _search(model, config, ctx, families, n, depth)
    else:
        locs = families[0]
        order = sorted(range(len(locs)), key=lambda j: config.after_layers[j]) \
            if config.after_layers is not None else range(len(locs))
        keep = [config.keep[j] for j in order] if isinstance(config.keep, list) else config.keep
    keeps = keep if isinstance(keep, list) else [keep] * len(locs)

    summary = ctx.report.summary
    ref = None
    check_n = config.auto.max_samples if config.auto is not None else 256
    if ctx.calib is not None:
        module.token_pruner = None
        ref = _predictions(model, ctx, check_n)
    pruner = _pruner(config, locs, keep)
    module.token_pruner = pruner
    if pruner is not None and config.finetune.steps > 0:
        summary["finetune"] = _finetune(model, config, ctx)

    counts = layer_token_counts(n, depth, locs, keeps)
    speed = estimated_speedup(counts)
    summary.update(
        method="top_vim", after_layers=locs, keep=keeps, score=config.score,
        direction=config.direction, mirrored=config.mirrored, alignment=config.alignment,
        alignment_source={"gather": "released ToP-ViM code", "mask": "released code's "
                          "commented variant (upper bound, no speed-up)",
                          "gap_decay": "ours (reconstruction; not the paper's kernel)"
                          }[config.alignment],
        tokens_per_layer=counts, token_layers_kept=round(sum(counts) / (depth * n), 4),
        estimated_speedup=1.0 if config.alignment == "mask" else round(speed, 3),
        pruned=pruner is not None)
    if config.alignment == "mask":
        summary["note"] = ("mask keeps every token position (pruned ones zeroed): "
                           "no speed-up, an upper bound on what alignment can recover")
    if trials:
        summary["auto_trials"] = trials
    if ref is not None:
        out = _predictions(model, ctx, check_n)
        labels = None if ctx.calib.labels is None else ctx.calib.labels[:len(ref)].long()
        fid = {"samples": len(ref),
               "top1_agreement": round((ref.argmax(-1) == out.argmax(-1)).float().mean().item(),
                                       4)}
        if labels is not None:
            fid["top1_original"] = round((ref.argmax(-1) == labels).float().mean().item(), 4)
            fid["top1_pruned"] = round((out.argmax(-1) == labels).float().mean().item(), 4)
        summary["calibration"] = fid
    model.info["token_reduction"] = {"method": "top_vim", "after_layers": locs, "keep": keeps,
                                     "alignment": config.alignment}
    if pruner is not None and config.plot_images:
        _plot(model, ctx, pruner, config.plot_images)
    ctx.progress(1.0, f"pruning after layers {locs} at keep {keeps}")
