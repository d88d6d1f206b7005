"""Token reduction inside timm ViT/DeiT forwards (ToMe merging, EViT pruning).

``patch_vit(model, plan, prop_attn)`` swaps the model's class (weights never move) for one whose
``forward_features`` runs the blocks one by one and reduces tokens between each block's attention
and its MLP, as ToMe does. ``plan[i]`` is ``None``, ``("tome", r)``, ``("evit", keep_rate)`` or, for the last block of a
class-token-pooled model, ``("final",)`` (only the prefix tokens go through its MLP: exact).
Class, distillation and register tokens (``num_prefix_tokens``) are set aside and never merged
or dropped. LayerScale (``ls1``/``ls2``), qk-norm and drop-path are kept as timm has them: the
attention runs through ``patch.attention``'s explicit module, which also carries ToMe's
proportional attention (``attn_bias`` = log size) and exposes the keys and probabilities.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..tokens.merge import bipartite_soft_matching, merge_wavg, weighted_token_mean
from ..tokens.prune import class_attention, keep_count, topk_keep
from .attention import make_attention_explicit
from .mixin import mix_into


def _check(model: nn.Module) -> None:
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"token reduction supports timm VisionTransformer (ViT/DeiT), not "
            f"{type(model).__name__}")
    bad = [type(b).__name__ for b in model.blocks if not isinstance(b, Block)]
    if bad:
        raise UnsupportedModelError(f"token reduction supports timm Block, not {bad[0]}")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(
            f"token reduction needs global_pool 'token' or 'avg', not {model.global_pool!r} "
            "(token maps change length; use expedit for dense outputs)")


def reduce_block(blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None, step,
                 protected: int, prop_attn: bool, record: list | None = None):
    """One timm ``Block`` with token reduction between attention and MLP -> (x, size)."""
    attn = blk.attn
    attn.attn_bias = (size.log()[:, None, None, :, 0]
                      if prop_attn and size is not None else None)
    method = step[0] if step else None
    attn.probe.keep = method == "evit" or record is not None
    x = x + blk.drop_path1(blk.ls1(attn(blk.norm1(x))))
    attn.attn_bias = None
    if method == "tome" and step[1] > 0:
        metric = attn._last_keys.mean(dim=1)          # keys averaged over heads, [B, N, C/h]
        merge, _ = bipartite_soft_matching(metric, step[1], protected)
        x, size = merge_wavg(merge, x, size)
    elif method == "final":
        # Class-token pooling reads only the prefix tokens after the last block: the last MLP
        # on the other tokens is dead code, so they are dropped exactly (no fidelity cost).
        x = x[:, :protected]
        size = None if size is None else size[:, :protected]
    elif method == "evit":
        scores = class_attention(attn.probe.last, protected)
        k = keep_count(x.shape[1] - protected, step[1])
        x, size, idx = topk_keep(x, scores, k, protected, size, fuse=True)
        if record is not None:
            record.append((scores.detach(), idx.detach()))
    attn.probe.last = None
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


class TokenWeightedPool(nn.Module):
    """Mixin for timm VisionTransformer whose forward_features leaves ``_pool_weights``
    (B, N, 1): average pooling then counts each token that many times (a merged token as the
    patches it stands for, a dropped-but-carried one as zero); class-token pooling is as is."""

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        weights = getattr(self, "_pool_weights", None)
        if pool_type != "avg" or weights is None:
            return super().pool(x, pool_type)
        return weighted_token_mean(x, weights, 0 if self.pool_include_prefix else
                                   self.num_prefix_tokens)


class TokenReducedViT(TokenWeightedPool):
    """Mixin for timm VisionTransformer: blocks with token reduction, size-weighted pooling."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        info = self._token_reduction
        size = None
        record = info.get("record")
        for blk, step in zip(self.blocks, info["plan"]):
            x, size = reduce_block(blk, x, size, step, self.num_prefix_tokens, info["prop_attn"],
                                   record)
        self._pool_weights = size  # average over patches, not over merged tokens
        return self.norm(x)


def patch_vit(model: nn.Module, plan: list, prop_attn: bool = True) -> None:
    """Apply token reduction ``plan`` (one entry per block) to a timm ViT in place."""
    _check(model)
    if len(plan) != len(model.blocks):
        raise ValueError(f"plan has {len(plan)} entries for {len(model.blocks)} blocks")
    make_attention_explicit(model)
    mix_into(model, TokenReducedViT, "TokenReduced")
    model._token_reduction = {"plan": list(plan), "prop_attn": prop_attn}


def final_prunable(model: nn.Module) -> bool:
    """True when the model's output reads only the prefix tokens after the last block."""
    return model.global_pool == "token" and model.num_prefix_tokens > 0


def vit_token_count(model: nn.Module) -> tuple[int, int]:
    """(tokens entering the first block, protected prefix tokens) for a timm ViT."""
    grid = model.patch_embed.grid_size
    return grid[0] * grid[1] + model.num_prefix_tokens, model.num_prefix_tokens


class ExpeditViT(nn.Module):
    """Mixin for timm VisionTransformer: cluster patch tokens after one block, reconstruct the
    full token map before the final norm (Expedit); prefix tokens are carried unchanged.

    The token grid is read from the patch embedding's output (any resolution the model accepts,
    ``dynamic_img_size`` included); the cluster grid follows from it with integer arithmetic.
    """

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        from ..tokens.cluster import cluster_grid, cluster_tokens, reconstruct_tokens

        cfg = self._expedit
        p = self.num_prefix_tokens
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        clusters = cluster_grid(grid, cfg["clusters"], cfg["ratio"])
        before = cents = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == cfg["location"]:
                before = x[:, p:]
                cents, _ = cluster_tokens(before, grid, clusters, cfg["iters"], cfg["tau"],
                                          cfg["window"])
                x = torch.cat([x[:, :p], cents], dim=1)
        if before is not None:
            x = torch.cat([x[:, :p], reconstruct_tokens(before, cents, x[:, p:], cfg["k"],
                                                        cfg["tau"])], dim=1)
        return self.norm(x)


def patch_expedit(model: nn.Module, location: int, clusters: tuple[int, int] | None = None,
                  ratio: float | None = None, iters: int = 5, tau: float = 0.01,
                  window: int = 5, k: int = 20) -> None:
    """Expedit clustering after ``blocks[location]`` and reconstruction at the end, in place.

    Give ``clusters`` (h, w) or ``ratio`` (share of patch tokens kept); validation of the values
    against the model is the pass's job (it names the recipe fields).
    """
    _check_vit_blocks(model)
    if (clusters is None) == (ratio is None):
        raise ValueError("give clusters or ratio, not both")
    mix_into(model, ExpeditViT, "Expedit")
    model._expedit = {"location": location, "clusters": None if clusters is None else
                      tuple(clusters), "ratio": ratio, "iters": iters, "tau": tau,
                      "window": window, "k": k}


def _check_vit_blocks(model: nn.Module) -> None:
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer) or not all(
            isinstance(b, Block) for b in model.blocks):
        raise UnsupportedModelError(
            f"expedit supports timm VisionTransformer with Block layers, not "
            f"{type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("expedit does not support attention-pooled ViTs")
