"""Pictures of token pruning for the report: which patches each stage kept, per image."""

from __future__ import annotations

import numpy as np
import torch

from ..context import PassContext
from ..models.handle import ModelHandle


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
