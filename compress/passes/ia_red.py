"""IA-RED² interpretable token pruning for timm ViT/DeiT classifiers: ``ia_red``.

The interpreters and the REINFORCE pieces are tensor functions in ``tokens.interpret``; the
forward with interpreters is ``patch.ia_red``. This module picks the groups, trains the
interpreters on the calibration data with the backbone frozen, and reports the kept patches.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from ..context import PassContext
from ..errors import RecipeError
from ..models.handle import ModelHandle
from ..models.kind import model_kind, require
from ..patch.ia_red import check_ia_red_model, kept_patches, patch_ia_red
from ..registry import PassConfig, register_pass
from ..tokens.interpret import (
    group_benefits,
    group_rewards,
    keep_log_prob,
    leave_one_out_baseline,
    reinforce_loss,
)
from ..tokens.schedule import block_macs


class IaRedConfig(PassConfig):
    """IA-RED² interpretable token pruning: learned interpreters drop uninformative patches.

    The blocks are split into groups; before each group's first block an interpreter scores
    every token with the class token's query against its key (``p = mean over heads of
    sigmoid(q_CLS · k / sqrt(d))``, a heat map that can be shown) and keeps the tokens with
    ``p > threshold``. A token dropped by one group stays dropped; class/prefix tokens are
    always kept. The interpreters are trained by REINFORCE on the calibration data with the
    backbone frozen: a sampled keep mask earns ``1 - (kept/N)²`` (weighted by the share of
    blocks after the group) when the pruned model's top-1 matches the label (or, without
    labels, the original model's top-1) and ``error_penalty`` when it does not; each image is
    sampled ``samples`` times and the other draws' mean is the baseline. The backbone is not
    fine-tuned (the paper does so afterwards). Exported with the keep count computed from the
    data (ReduceMax of the per-image counts, TopK, gather in order): later blocks really run on
    fewer tokens; in a batch, images keeping fewer tokens than the batch maximum carry a few
    masked ones, so every image gets the output it gets alone. That batch maximum is close
    to the full count on large batches, and the masked attention costs extra, so the export can
    be slower than the original; ``inference: fixed_rate`` keeps instead the same share of
    tokens in every image (the threshold policy's calibration mean per group, best p first):
    a batch then runs on exactly that many tokens, without masks. Paper:
    https://arxiv.org/abs/2106.12620. Needs calibration data when ``steps`` > 0 or with
    ``fixed_rate``.

    Recipe:
        - type: ia_red
          locations: [0, 1, 2]
          heads: 2
          steps: 300
          lr: 0.001
          threshold: 0.5
          inference: fixed_rate
    """

    type: Literal["ia_red"] = "ia_red"
    locations: list[Annotated[int, Field(ge=0, le=255)]] | None = Field(
        None, max_length=64, description=(
        "0-based blocks with an interpreter in front (one per group); default: ``groups`` "
        "equal groups, the g-th starting at block g*depth//groups"))
    groups: int = Field(3, ge=1, le=64, description="groups when locations is not given")
    heads: int = Field(2, ge=1, le=64, description="interpreter heads")
    head_dim: int = Field(16, ge=1, le=512, description="interpreter query/key size per head")
    threshold: float = Field(0.5, gt=0, lt=1, description="keep tokens with p > threshold")
    steps: int = Field(300, ge=0, le=1_000_000, description="REINFORCE steps (0: untrained)")
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate of the interpreters")
    batch_size: int = Field(64, ge=1, le=1024, description="calibration images per step")
    samples: int = Field(4, ge=1, le=64, description=(
        "keep masks drawn per image per step (the others' mean reward is the baseline)"))
    error_penalty: float = Field(-1.0, le=0, description="reward when the top-1 is wrong")
    target_keep: float | None = Field(None, gt=0, lt=1, description=(
        "share of patch tokens below which dropping more earns nothing (default: no floor)"))
    init_keep: float = Field(0.9, gt=0.5, lt=1, description=(
        "keep probability the interpreters start from (near the unpruned model)"))
    device: Literal["auto", "cpu", "cuda"] | None = Field(None, description=(
        "where to train; default: the recipe's device"))
    max_seconds: float | None = Field(None, gt=0, description="stop training after this long")
    seed: int = Field(0, ge=0, le=2**32 - 1, description=(
        "seed of the interpreters' initialization, the batch order and the keep-mask draws"))
    inference: Literal["threshold", "fixed_rate"] = Field("threshold", description=(
        "how the trained interpreters prune at inference: 'threshold' keeps each image's "
        "tokens with p > threshold (the paper; a batch runs at its largest per-image count, "
        "the rest masked); 'fixed_rate' keeps in every image the same share of tokens per group "
        "(the calibration mean of the threshold policy), ranked by p: no mask, and a batch runs "
        "at exactly that count"))
    plot_images: int = Field(4, ge=0, le=32, description=(
        "calibration images pictured in the report with each group's importance and kept "
        "patches"))

    @model_validator(mode="after")
    def _locations(self):
        if self.locations is not None:
            if not self.locations:
                raise ValueError("locations must name at least one block")
            if len(set(self.locations)) != len(self.locations):
                raise ValueError("locations must not repeat a block")
        return self


def _needs_calibration(config: IaRedConfig) -> bool:
    # fixed_rate takes its shares from the threshold policy on the calibration images
    return config.steps > 0 or config.inference == "fixed_rate"


def _device(config: IaRedConfig, ctx: PassContext) -> torch.device:
    if config.device is None:
        return ctx.device
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("no CUDA device", [(f"passes.{ctx.index}.device",
                                              "cuda requested but not available; use auto/cpu")])
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _locations(config: IaRedConfig, depth: int, index: int) -> list[int]:
    p = f"passes.{index}"
    if config.locations is None:
        if config.groups > depth:
            raise RecipeError("more groups than blocks", [
                (f"{p}.groups", f"{config.groups} groups for {depth} blocks")])
        return [g * depth // config.groups for g in range(config.groups)]
    bad = [v for v in config.locations if not 0 <= v < depth]
    if bad:
        raise RecipeError("locations out of range", [(f"{p}.locations",
                                                      f"{bad} not in 0..{depth - 1}")])
    return sorted(config.locations)


def _predict(module, x: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch].to(device)).argmax(-1).cpu()
                          for i in range(0, len(x), batch)])


def _train(module, x: torch.Tensor, targets: torch.Tensor, locs: list[int],
           config: IaRedConfig, device: torch.device, ctx: PassContext) -> dict:
    """REINFORCE on the interpreters, backbone frozen; returns the training summary."""
    protected = module.num_prefix_tokens
    depth = len(module.blocks)
    benefits = group_benefits(locs, depth).to(device)
    agents = module.ia_red_agents
    for prm in agents.parameters():
        prm.requires_grad_(True)
    opt = torch.optim.Adam(agents.parameters(), lr=config.lr)
    info = module._ia_red
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)   # Bernoulli draws (torch.bernoulli uses the global RNG)
    history, t0, stopped = [], time.perf_counter(), False
    bs = min(config.batch_size, len(x))
    step = 0
    try:
        info["sample"] = True
        for step in range(config.steps):
            idx = torch.randperm(len(x), generator=gen)[:bs]
            xb = x[idx].to(device).repeat(config.samples, 1, 1, 1)
            yb = targets[idx].to(device).repeat(config.samples)
            rec: list = []
            info["record"] = rec
            logits = module(xb)
            info.pop("record", None)
            n = rec[0]["p"].shape[1] - protected     # patch tokens before any pruning
            kept = torch.stack([r["u"][:, protected:].sum(1) for r in rec], 1) / n
            logp = torch.stack([keep_log_prob(r["p"], r["u"], r["alive"], protected)
                                for r in rec], 1)
            correct = logits.argmax(-1) == yb
            rewards = group_rewards(kept, correct, benefits, config.error_penalty,
                                    config.target_keep)
            loss = reinforce_loss(logp, rewards, leave_one_out_baseline(rewards,
                                                                         config.samples))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "reward": rewards.sum(1).mean().item(),
                            "kept": kept.mean(0).tolist(),
                            "agreement": correct.float().mean().item()})
            if step % max(1, config.steps // 50) == 0:
                ctx.progress(0.85 * step / config.steps,
                             f"step {step}: reward {history[-1]['reward']:.3f}")
            if config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds:
                stopped = True
                break
    finally:
        info["sample"] = False
        info.pop("record", None)
        for prm in agents.parameters():
            prm.requires_grad_(False)
    return {"steps": len(history), "seconds": round(time.perf_counter() - t0, 2),
            "device": str(device), "stopped_early": stopped, "history": history}


def _mean(rows: list[dict], key: str, tail: int = 10):
    last = rows[-tail:]
    vals = [r[key] for r in last]
    if isinstance(vals[0], list):
        return [round(sum(v[g] for v in vals) / len(vals), 4) for g in range(len(vals[0]))]
    return round(sum(vals) / len(vals), 4)


def _training_plot(ctx: PassContext, history: list[dict], locs: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.plot(steps, [h["reward"] for h in history], label="reward (sum over groups)")
    a.plot(steps, [h["agreement"] for h in history], label="top-1 right (sampled masks)")
    a.set_xlabel("step")
    a.legend(fontsize=7)
    for g, loc in enumerate(locs):
        b.plot(steps, [h["kept"][g] for h in history], label=f"group {g + 1} (block {loc})")
    b.set_xlabel("step")
    b.set_ylabel("kept fraction (sampled)")
    b.legend(fontsize=7)
    ctx.save_plot(fig, "ia_red_training", "IA-RED² interpreter training (REINFORCE)")


@register_pass(IaRedConfig, needs_calibration=_needs_calibration)
def ia_red(model: ModelHandle, config: IaRedConfig, ctx: PassContext) -> None:
    if model.task != "image-classification" or model.module is None:
        require(model_kind(model), "ia_red", ("plain_vit",), needs_runner=True,
                runners=("timm_vit",), where=f"passes.{ctx.index}")
    module = model.module
    check_ia_red_model(module, where=f"passes.{ctx.index}")
    depth = len(module.blocks)
    locs = _locations(config, depth, ctx.index)
    device = _device(config, ctx)
    module.to(device).eval()
    for prm in module.parameters():
        prm.requires_grad_(False)

    summary = ctx.report.summary
    calib = ctx.calib
    x = targets = original = None
    if calib is not None and "pixel_values" in calib.inputs:
        x = calib.inputs["pixel_values"]
        original = _predict(module, x, ctx.batch_size, device)
        targets = calib.labels.long() if calib.labels is not None else original
    torch.manual_seed(config.seed)   # interpreter init: same recipe, same result
    patch_ia_red(module, locs, config.heads, config.head_dim, config.threshold,
                 config.init_keep)
    training = None
    if config.steps > 0 and x is not None:
        training = _train(module, x, targets, locs, config, device, ctx)
        _training_plot(ctx, training["history"], locs)
    module.eval()

    summary.update(method="ia_red", locations=locs, threshold=config.threshold,
                   inference=config.inference,
                   heads=config.heads, head_dim=config.head_dim,
                   protected_tokens=module.num_prefix_tokens,
                   interpreter_params=sum(p.numel() for p in module.ia_red_agents.parameters()))
    if training is not None:
        h = training.pop("history")
        summary["training"] = {**training, "samples": len(x), "labels_used": calib.labels
                               is not None, "first": {k: h[0][k] for k in ("reward", "kept",
                                                                           "agreement")},
                               "last10": {k: _mean(h, k) for k in ("reward", "kept",
                                                                   "agreement")}}
    model.info["token_reduction"] = {"method": "ia_red", "locations": locs,
                                     "threshold": config.threshold,
                                     "inference": config.inference}
    if x is None:
        return

    # Kept tokens, fidelity and a speed estimate on the calibration set (per image, as batch 1).
    keep = _calibration_keep(module, x, ctx.batch_size, device, len(locs))
    n = keep[0].shape[1]
    if config.inference == "fixed_rate":
        rates = fixed_keep_rates(keep)
        module._ia_red["keep_rates"] = dict(zip(map(str, locs), rates, strict=False))
        model.info["token_reduction"]["keep_rates"] = rates
        summary["fixed_keep_rates"] = dict(zip([f"block_{v}" for v in locs], rates, strict=False))
        keep = _calibration_keep(module, x, ctx.batch_size, device, len(locs))
    pruned = _predict(module, x, ctx.batch_size, device)
    kept_frac = [round(k.float().mean().item(), 4) for k in keep]
    summary["kept_fraction"] = dict(zip([f"block_{v}" for v in locs], kept_frac, strict=False))
    summary["calibration_top1_agreement"] = round((pruned == original).float().mean().item(), 4)
    if calib.labels is not None:
        y = calib.labels.long()
        summary["calibration_top1"] = {
            "original": round((original == y).float().mean().item(), 4),
            "pruned": round((pruned == y).float().mean().item(), 4)}
    # Tokens entering each block, averaged over images; MACs as the ToMe/EViT estimate.
    protected = module.num_prefix_tokens
    counts, cur = [], float(n + protected)
    for b in range(depth):
        if b in locs:
            cur = protected + kept_frac[locs.index(b)] * n
        counts.append(round(cur, 2))
    dim, ratio = module.embed_dim, module.blocks[0].mlp.fc1.out_features / module.embed_dim
    base = depth * block_macs(n + protected, n + protected, dim, ratio)
    ours = sum(block_macs(c, c, dim, ratio) for c in counts)
    summary["mean_tokens_per_block"] = counts
    summary["estimated_speedup"] = round(base / ours, 3)
    for j, loc in enumerate(locs):
        ctx.report.add_layer(f"ia_red_agents.{loc}", kind="PerBlockAgent",
                             params=sum(p.numel() for p in module.ia_red_agents[str(loc)]
                                        .parameters()),
                             kept_fraction=kept_frac[j])
    if config.plot_images:
        _kept_plot(model, ctx, x[:config.plot_images].to(device), locs)


def _calibration_keep(module, x: torch.Tensor, batch: int, device: torch.device,
                      groups: int) -> list[torch.Tensor]:
    """Per group, [images, patches] bool: which original patches are still kept after it."""
    parts = [kept_patches(module, x[i:i + batch].to(device)) for i in range(0, len(x), batch)]
    return [torch.cat([part[j]["keep"] for part in parts]) for j in range(groups)]


def fixed_keep_rates(keep: list[torch.Tensor]) -> list[float]:
    """Share of the tokens entering each group that the group keeps, over all images (the
    threshold policy's average), for ``inference: fixed_rate``; at least one token."""
    n = keep[0].shape[1]
    rates, before = [], float(keep[0].shape[0] * n)
    for k in keep:
        after = float(k.sum())
        rates.append(round(max(after / before, 1.0 / n), 4))
        before = max(after, 1.0)
    return rates


def _kept_plot(model: ModelHandle, ctx: PassContext, x: torch.Tensor, locs: list[int]) -> None:
    from ..tokens.pictures import plot_kept_patches

    rec = kept_patches(model.module, x)
    names = [f"group {j + 1} (block {loc})" for j, loc in enumerate(locs)]
    plot_kept_patches(model, ctx, x, [r["keep"] for r in rec],
                      [(f"p, {n}", r["p"]) for n, r in zip(names, rec, strict=False)],
                      name="kept_patches",
                      title="IA-RED²: interpreter importance p and patches kept per group "
                            "(calibration images)", stage_names=names)
