"""IA-RED² interpreters inside a timm ViT/DeiT forward (``tokens.interpret`` does the math).

``patch_ia_red(model, locations)`` adds one ``PerBlockAgent`` per location (``ia_red_agents``,
keyed by block index) and swaps the model's class (``mix_into``; backbone weights never move)
for one whose ``forward_features`` runs the blocks one by one. Before each chosen block the
interpreter scores the tokens, decides which to keep (hierarchically), and the batch is
gathered down to the largest per-sample keep count (in original order), so later blocks run on
fewer tokens. A sample keeping fewer than that carries a few dropped tokens along, masked out
of attention (and of average pooling): every sample's output is the one it gets alone, at any
batch size. Class, distillation and register tokens (``num_prefix_tokens``) are always kept.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.kind import model_kind, require
from ..tokens.interpret import (
    PerBlockAgent,
    attention_mask,
    gather_kept,
    keep_decisions,
    keep_prefix,
)
from ..tokens.prune import keep_count, topk_keep
from .mixin import mix_into
from .vit_tokens import TokenWeightedPool


def check_ia_red_model(model: nn.Module, where: str = "") -> None:
    """UnsupportedModelError unless ``model`` is a timm VisionTransformer ia_red can drive."""
    kind = model_kind(model)
    require(kind, "ia_red", ("plain_vit",), needs_runner=True, runners=("timm_vit",),
            where=where)
    lead = f"{where}: " if where else ""
    if "class_token" not in kind.features:
        raise UnsupportedModelError(f"{lead}ia_red needs a class token (the interpreters' "
                                    f"query); {kind.arch} has none. Use tome, which needs none")
    if model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(
            f"{lead}ia_red needs global_pool 'token' or 'avg', not {model.global_pool!r}")


class InterpretedViT(TokenWeightedPool):
    """Mixin for timm VisionTransformer: interpreters prune tokens before chosen blocks."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        info = self._ia_red
        protected = self.num_prefix_tokens
        record = info.get("record")
        u = mask = None
        # Original patch positions of the current tokens, only for the pictures.
        pos = None if record is None else torch.arange(x.shape[1] - protected,
                                                       device=x.device).expand(x.shape[0], -1)
        for i, blk in enumerate(self.blocks):
            if str(i) in self.ia_red_agents:
                p = self.ia_red_agents[str(i)](x, u, protected)
                alive = u
                rate = None if info["sample"] else info.get("keep_rates", {}).get(str(i))
                if rate is None:
                    u_new = keep_decisions(p, u, protected, info["threshold"], info["sample"])
                    x_new, u, idx = gather_kept(x, u_new, p, protected)
                else:
                    # Fixed share per group: every image keeps its k best tokens, no mask.
                    k = keep_count(x.shape[1] - protected, rate)
                    x_new, _, idx = topk_keep(x, p[:, protected:], k, protected, fuse=False)
                    if record is not None:   # the keep mask, for the pictures only
                        u_new = keep_prefix(torch.zeros_like(p).scatter(
                            1, idx + protected, torch.ones_like(idx, dtype=p.dtype)), protected)
                if record is not None:
                    record.append({"block": i, "p": p, "u": u_new, "alive": alive, "pos": pos})
                x = x_new
                if pos is not None:
                    pos = pos.gather(1, idx)
                mask = None if u is None else attention_mask(u, x.dtype)
            x = blk(x, attn_mask=mask)
        if self.global_pool == "avg":
            # average over the kept tokens only (carried dropped ones have u = 0); token
            # pooling needs no mask
            self._pool_weights = None if u is None else u[..., None]
        return self.norm(x)


def patch_ia_red(model: nn.Module, locations: list[int], heads: int = 2, head_dim: int = 16,
                 threshold: float = 0.5, init_keep: float = 0.9) -> nn.ModuleDict:
    """Add interpreters before blocks ``locations`` of a timm ViT, in place; returns them."""
    check_ia_red_model(model)
    bad = [v for v in locations if not 0 <= v < len(model.blocks)]
    if bad:
        raise ValueError(f"locations {bad} not in 0..{len(model.blocks) - 1}")
    param = next(model.parameters())
    model.ia_red_agents = nn.ModuleDict({
        str(i): PerBlockAgent(model.embed_dim, heads, head_dim, init_keep)
        for i in sorted(locations)}).to(device=param.device, dtype=param.dtype)
    mix_into(model, InterpretedViT, "Interpreted")
    model._ia_red = {"threshold": threshold, "sample": False}
    return model.ia_red_agents


def kept_patches(model: nn.Module, x: torch.Tensor, sample: bool = False) -> list[dict]:
    """Run ``x`` through an interpreted ViT; per group, over the original patch grid: ``p``
    [B, H*W] importance (0 where dropped earlier), ``keep`` [B, H*W] bool, and ``block``."""
    info = model._ia_red
    rec: list = []
    info["record"], info["sample"] = rec, sample
    try:
        with torch.no_grad():
            model(x)
    finally:
        info.pop("record", None)
        info["sample"] = False
    protected = model.num_prefix_tokens
    out = []
    total = rec[0]["pos"].shape[1] if rec else 0   # patch tokens before any pruning
    for r in rec:
        pos = r["pos"]
        p_full = torch.zeros(x.shape[0], total, device=pos.device)
        keep = torch.zeros(x.shape[0], total, dtype=torch.bool, device=pos.device)
        p_full.scatter_(1, pos, r["p"][:, protected:].float())
        keep.scatter_(1, pos, r["u"][:, protected:] > 0)
        out.append({"block": r["block"], "p": p_full.cpu(), "keep": keep.cpu()})
    return out
