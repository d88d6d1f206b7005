"""Token reduction inside timm plain-token ViT forwards (ToMe merging, EViT pruning).

``patch_vit(model, plan, prop_attn)`` swaps the model's class (weights never move) for one whose
``forward_features`` runs the blocks one by one and reduces tokens between each block's attention
and its MLP, as ToMe does. ``plan[i]`` is a step object from ``compress.tokens.plan`` (``Keep``,
``Merge(r)``, ``Prune(keep_rate)``, ``PrefixOnly`` for the last block of a class-token-pooled
model) or None. Class, distillation and register tokens (``num_prefix_tokens``) are set aside and
never merged or dropped. Two runners drive the blocks:

    timm_vit   timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, DeiT3, ViT with registers):
               LayerScale (``ls1``/``ls2``), qk-norm and drop-path as timm has them; attention
               through ``patch.attention``'s explicit module, which carries ToMe's proportional
               attention (``attn_bias`` = log size) and exposes keys and probabilities
    timm_eva   timm ``Eva`` (EVA-02, RoPE ViTs): SwiGLU, ``gamma_1``/``gamma_2`` LayerScale, and
               rotary position embeddings that follow the tokens: a merged token keeps the
               position of the token it merged into, a kept token its own, the fused token of
               pruned ones the identity rotation
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..models.kind import model_kind, require
from ..tokens.merge import weighted_token_mean
from ..tokens.plan import BlockState, PrefixOnly, as_step
from .attention import make_attention_explicit
from .mixin import mix_into


def check_token_model(model: nn.Module, pass_name: str = "token reduction", where: str = ""):
    """The model's kind, after checking token reduction can run on it (UnsupportedModelError)."""
    kind = model_kind(model)
    require(kind, pass_name, ("plain_vit",), needs_runner=True, where=where)
    pool = getattr(model, "global_pool", None)
    if pool not in ("token", "avg"):
        lead = f"{where}: " if where else ""
        raise UnsupportedModelError(
            f"{lead}{pass_name} needs global_pool 'token' or 'avg', not {pool!r} (token maps "
            "change length; use expedit for dense outputs)")
    return kind


def reduce_block(blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None, step,
                 protected: int, prop_attn: bool, record: list | None = None):
    """One timm ``Block`` with token reduction between attention and MLP -> (x, size)."""
    step = as_step(step)
    attn = blk.attn
    attn.attn_bias = (size.log()[:, None, None, :, 0]
                      if prop_attn and size is not None else None)
    attn.probe.keep = step.needs_probs or record is not None
    x = x + blk.drop_path1(blk.ls1(attn(blk.norm1(x))))
    attn.attn_bias = None
    state = BlockState(keys=attn._last_keys, probs=attn.probe.last, record=record)
    x, size, _ = step.reduce(x, size, None, state, protected)
    attn.probe.last = None
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


def eva_attention(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                  bias: torch.Tensor | None, want_probs: bool):
    """timm ``EvaAttention`` forward that also returns the keys and (when asked) the
    probabilities -> (out, keys [B, h, N, d], probs [B, h, N, N] or None).

    Note: follows timm.models.eva.EvaAttention.forward (timm 1.0.x) with modifications: keys
    are returned before RoPE (ToMe's similarity is on content), ``bias`` [B, 1, 1, N] is added
    to the scores (proportional attention), and the softmax is explicit when probabilities are
    needed. ``rope`` may be per sample ([B, 1, N - prefix, 2d]) once tokens were reduced.
    """
    from timm.layers import apply_rot_embed_cat

    B, N, C = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = k
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)],
                      dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)],
                      dim=2).type_as(v)
    probs = None
    if want_probs:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, C))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), keys, probs


def reduce_eva_block(blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None, step,
                     protected: int, prop_attn: bool, rope, pos, fused: int,
                     record: list | None = None):
    """One timm ``EvaBlock`` with token reduction between attention and MLP -> (x, size, pos)."""
    step = as_step(step)
    bias = size.log()[:, None, None, :, 0] if prop_attn and size is not None else None
    a, keys, probs = eva_attention(blk.attn, blk.norm1(x), rope, bias,
                                   step.needs_probs or record is not None)
    if blk.gamma_1 is not None:
        a = blk.gamma_1 * a
    x = x + blk.drop_path1(a)
    state = BlockState(keys=keys, probs=probs, record=record)
    x, size, pos = step.reduce(x, size, pos, state, protected, fused)
    m = blk.mlp(blk.norm2(x))
    if blk.gamma_2 is not None:
        m = blk.gamma_2 * m
    return x + blk.drop_path2(m), size, pos


class TokenWeightedPool(nn.Module):
    """Mixin for timm ViTs whose forward_features leaves ``_pool_weights`` (B, N, 1): average
    pooling then counts each token that many times (a merged token as the patches it stands
    for, a dropped-but-carried one as zero); class-token pooling is as is."""

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        weights = getattr(self, "_pool_weights", None)
        if pool_type != "avg" or weights is None:
            return super().pool(x, pool_type)
        return weighted_token_mean(x, weights, 0 if getattr(self, "pool_include_prefix", False)
                                   else self.num_prefix_tokens)


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
        for blk, step in zip(self.blocks, info["plan"], strict=False):
            x, size = reduce_block(blk, x, size, step, self.num_prefix_tokens, info["prop_attn"],
                                   record)
        self._pool_weights = size  # average over patches, not over merged tokens
        return self.norm(x)


class TokenReducedEva(TokenWeightedPool):
    """Mixin for timm Eva: blocks with token reduction, RoPE following the tokens."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        x = self.patch_embed(x)
        x, rope = self._pos_embed(x)
        x = self.norm_pre(x)
        info = self._token_reduction
        size = pos = table = None
        fused = -1
        if rope is not None:
            # One extra row, the identity rotation (sin 0, cos 1), for fused tokens.
            half = rope.shape[-1] // 2
            ident = torch.cat([rope.new_zeros(half), rope.new_ones(half)])
            table = torch.cat([rope, ident[None]], dim=0)
            fused = rope.shape[0]
            pos = torch.arange(rope.shape[0], device=x.device).expand(x.shape[0], -1)
        record = info.get("record")
        for blk, step in zip(self.blocks, info["plan"], strict=False):
            x, size, new_pos = reduce_eva_block(blk, x, size, step, self.num_prefix_tokens,
                                                info["prop_attn"], rope, pos, fused, record)
            if new_pos is not pos:
                pos, rope = new_pos, table[new_pos].unsqueeze(1)
        self._pool_weights = size
        return self.norm(x)


RUNNER_MIXINS = {"timm_vit": (TokenReducedViT, "TokenReduced"),
                 "timm_eva": (TokenReducedEva, "TokenReduced")}


def patch_vit(model: nn.Module, plan: list, prop_attn: bool = True,
              pass_name: str = "token reduction") -> None:
    """Apply token reduction ``plan`` (one step per block) to a timm plain-token ViT in place."""
    kind = check_token_model(model, pass_name)
    if len(plan) != len(model.blocks):
        raise ValueError(f"plan has {len(plan)} entries for {len(model.blocks)} blocks")
    plan = [as_step(s) for s in plan]
    if kind.token_runner == "timm_vit":
        make_attention_explicit(model)
    if kind.token_runner == "timm_eva" and getattr(model, "patch_drop", None) is not None \
            and model.training:
        raise UnsupportedModelError("token reduction on Eva runs in eval mode (patch dropout)")
    mixin, prefix = RUNNER_MIXINS[kind.token_runner]
    mix_into(model, mixin, prefix)
    model._token_reduction = {"plan": plan, "prop_attn": prop_attn}


def final_prunable(model: nn.Module) -> bool:
    """True when the model's output reads only the prefix tokens after the last block."""
    return model.global_pool == "token" and model.num_prefix_tokens > 0


def with_prefix_only(plan: list, model: nn.Module, enabled: bool) -> list:
    """Replace the last block's step by PrefixOnly where the output reads prefix tokens only."""
    if enabled and final_prunable(model):
        return [*plan[:-1], PrefixOnly()]
    return plan


def vit_token_count(model: nn.Module) -> tuple[int, int]:
    """(tokens entering the first block, protected prefix tokens) for a timm ViT."""
    grid = model.patch_embed.grid_size
    return grid[0] * grid[1] + model.num_prefix_tokens, model.num_prefix_tokens


def vit_dims(model: nn.Module) -> tuple[int, float]:
    """(embedding width, MLP hidden ratio) for the cost model; SwiGLU counts its two inputs."""
    mlp = model.blocks[0].mlp
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_g", None)
    hidden = fc1.out_features * (2 if hasattr(mlp, "fc1_g") else 1)
    return model.embed_dim, hidden / model.embed_dim


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
    require(model_kind(model), "expedit", ("plain_vit",), needs_runner=True,
            runners=("timm_vit",))
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("expedit does not support attention-pooled ViTs")
    if (clusters is None) == (ratio is None):
        raise ValueError("give clusters or ratio, not both")
    mix_into(model, ExpeditViT, "Expedit")
    model._expedit = {"location": location, "clusters": None if clusters is None else
                      tuple(clusters), "ratio": ratio, "iters": iters, "tau": tau,
                      "window": window, "k": k}
