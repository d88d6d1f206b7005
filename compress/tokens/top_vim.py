"""ToP-ViM token pruning for Vision Mamba as plain tensor functions (and the thin pruner module).

ToP-ViM (Zhan et al., https://github.com/ZLKong/ToP-ViM) prunes the patch tokens of a Vim
after a few layers: each token is scored from the layer's SSM outputs, the best ``k - 1`` patch
tokens are kept **in scan order** (sorted indices), the class token is re-inserted in the middle
of the kept list, and hidden state and residual are gathered. Shapes: hidden and residual
[B, L, C]; SSM branch outputs ``y_fwd`` / ``y_bwd`` [B, L, D_inner] in forward token order;
``positions`` [B, L] (original index of each token, class token included); scores [B, L].

What is the released code and what is ours:

- ``importance``: the released code sums the backward branch output over channels
  (``score: sum``); the paper speaks of clipped values (``score: clipped_sum``, the commented
  variant). The released code indexes the forward-order sequence with the backward output in
  *reversed* token order (``mirrored=True`` reproduces that; the default flips it back).
- ``keep_total``: ``ceil(keep * (N - 1))`` made odd, as in the released code: the class token
  plus an even number of patch tokens, so the class token sits exactly in the middle.
- The released code masks the class token's score for batch element 0 only; here every batch
  element's class token is excluded.
- Alignment ``gather`` is the released code. ``mask`` zeroes the pruned tokens in place and
  keeps every position (the released code's commented variant): an upper bound on what
  alignment can recover, no speed-up. ``gap_decay`` is **our reconstruction** of the unreleased
  "pruning-aware hidden state alignment": the scan decays its state across each pruned gap as
  if the (zero-input) pruned tokens were still there, via ``token_gaps`` below and the model's
  ``gap_delta`` (``exp((Δ_t + g_t·softplus(b_dt))·A)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .prune import keep_count

SCORES = ("sum", "clipped_sum")
DIRECTIONS = ("bwd", "fwd", "both")
ALIGNMENTS = ("gather", "mask", "gap_decay")


# --------------------------------------------------------------------------- scores


def importance(y_fwd: torch.Tensor | None, y_bwd: torch.Tensor | None, score: str = "sum",
               direction: str = "bwd", mirrored: bool = False) -> torch.Tensor:
    """Token importance [B, L] from the SSM branch outputs [B, L, D_inner] (forward order).

    ``score``: ``sum`` of the channels (released code) or ``clipped_sum`` (negative values
    clipped to 0 first, the paper). ``direction``: which branch (``both``: the two sums added).
    ``mirrored``: read the backward branch in reversed token order, as the released code does
    (its ``xai_b`` is never flipped back); only meaningful with the backward branch.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def channel_sum(y: torch.Tensor) -> torch.Tensor:
        y = y.float()
        return (y.clamp_min(0) if score == "clipped_sum" else y).sum(-1)

    total = None
    if direction in ("fwd", "both"):
        total = channel_sum(y_fwd)
    if direction in ("bwd", "both"):
        s = channel_sum(y_bwd)
        if mirrored:
            s = s.flip(-1)
        total = s if total is None else total + s
    return total


# --------------------------------------------------------------------------- selection


def keep_total(n: int, keep: float) -> int:
    """Tokens left (class token included) when ``n`` tokens enter a pruning step.

    ``ceil(keep * (n - 1))`` patch-token slots made odd, as in the released code: the class
    token and an even number of patch tokens. Integer ops only (``prune.keep_count``).
    """
    k = keep_count(n - 1, keep)
    return k + 1 - k % 2


def select_tokens(scores: torch.Tensor, k: int, cls_index: int, order: str = "sorted",
                  alive: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, k] of the tokens to keep, the class token in the middle (at ``(k - 1) // 2``).

    The best ``k - 1`` tokens other than the class token (in every batch element) are taken;
    ``order: sorted`` puts them in scan order (ToP-ViM), ``order: score`` leaves them in score
    order (the "unsorted top-k" ablation). ``alive`` [B, L] bool excludes tokens already masked.
    """
    if order not in ("sorted", "score"):
        raise ValueError(f"order must be sorted or score, got {order!r}")
    s = scores.float().clone()
    s[:, cls_index] = float("-inf")
    if alive is not None:
        s = s.masked_fill(~alive, float("-inf"))
    idx = s.topk(k - 1, dim=-1).indices
    if order == "sorted":
        idx = idx.sort(dim=-1).values
    half = (k - 1) // 2
    cls = idx.new_full((idx.shape[0], 1), cls_index)
    return torch.cat([idx[:, :half], cls, idx[:, half:]], dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, ...] at ``index`` [B, k] along the token axis -> [B, k, ...]."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(
        -1, -1, *x.shape[2:]))


def keep_mask(index: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, length]: True at the kept ``index`` [B, k]."""
    mask = torch.zeros(index.shape[0], length, dtype=torch.bool, device=index.device)
    return mask.scatter(1, index, torch.ones_like(index, dtype=torch.bool))


def token_gaps(positions: torch.Tensor, cls_index: int) -> torch.Tensor:
    """Pruned tokens immediately before each kept token in scan order -> float [B, k].

    ``positions`` [B, k] are the kept tokens' original indices, the class token at
    ``cls_index``. Only patch tokens are ever pruned, and the class token is re-inserted in the
    middle of the kept list (not necessarily at its original place), so gaps are counted on the
    patch tokens alone: a patch token's gap is the number of pruned patch tokens since the
    previous kept patch token (the first one: since the start); the class token counts as
    inserted and carries gap 0. The gaps therefore sum to the number of pruned patch tokens
    before the last kept one. Negative differences (unsorted orders) are clipped to 0.
    """
    cls_pos = positions[:, cls_index:cls_index + 1]
    patches = torch.cat([positions[:, :cls_index], positions[:, cls_index + 1:]], dim=1)
    # Index among the patch tokens: the original class token no longer counts as a slot.
    q = patches - (patches > cls_pos).to(patches.dtype)
    prev = torch.cat([torch.full_like(q[:, :1], -1), q[:, :-1]], dim=1)
    gap = (q - prev - 1).clamp_min(0).to(torch.float32)
    zero = gap.new_zeros(gap.shape[0], 1)
    return torch.cat([gap[:, :cls_index], zero, gap[:, cls_index:]], dim=1)


# --------------------------------------------------------------------------- schedules


def layer_token_counts(n: int, depth: int, after_layers: Sequence[int],
                       keeps: Sequence[float]) -> list[int]:
    """Tokens entering each layer (``depth`` entries) when pruning after the 1-based layers
    ``after_layers`` with keep ratios ``keeps`` (``mask`` alignment: the live tokens)."""
    plan = dict(zip(after_layers, keeps, strict=True))
    counts = []
    for layer in range(1, depth + 1):
        counts.append(n)
        if layer in plan and plan[layer] < 1:
            n = keep_total(n, plan[layer])
    return counts


def estimated_speedup(counts: Sequence[int]) -> float:
    """Speed-up of the layers from token counts: every cost of a Vim layer (projections,
    depthwise conv, both selective scans) is linear in the token count."""
    return len(counts) * counts[0] / sum(counts)


def location_families(depth: int) -> list[list[int]]:
    """Candidate 1-based pruning locations for ``auto``: ToP-ViM's Vim-T (10, 20 of 24) and
    Vim-S (5, 10, 15 of 24) spacings scaled to ``depth``, plus a gentle five-step schedule."""
    fams = [
        [round(depth * 5 / 12), round(depth * 5 / 6)],
        [round(depth * 5 / 24), round(depth * 10 / 24), round(depth * 15 / 24)],
        [round(depth * f) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6)],
    ]
    out = []
    for fam in fams:
        fam = sorted({v for v in fam if 1 <= v < depth})
        if fam and fam not in out:
            out.append(fam)
    return out


# --------------------------------------------------------------------------- the pruner


class TopVimPruner(nn.Module):
    """The ``token_pruner`` a ``compress.models.vim.VisionMamba`` calls after its layers.

    Protocol (the Vim model's contract): ``wants(i)`` (a plain bool, static for export) says
    whether to prune after 0-based layer ``i``; ``gap_mode`` is handed to every layer;
    ``__call__(i, hidden, residual, (y_fwd, y_bwd), tokens) -> (hidden, residual, tokens)``.

    ``after_layers`` are 1-based (ToP-ViM's "after layers 10 and 20" is ``[10, 20]``), ``keep``
    one ratio per location. ``score`` may also be ``random`` and ``order`` ``score`` (unsorted
    top-k): ablation baselines, not offered in recipes. Set ``record`` to a list to collect
    ``(layer, scores [B, L], kept positions [B, k])`` per step (pictures, tests).
    """

    def __init__(self, after_layers: Sequence[int], keep: Sequence[float], score: str = "sum",
                 direction: str = "bwd", mirrored: bool = False, alignment: str = "gather",
                 order: str = "sorted", seed: int = 0):
        super().__init__()
        if len(after_layers) != len(keep):
            raise ValueError("one keep ratio per pruning location")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if score not in (*SCORES, "random"):
            raise ValueError(f"score must be one of {SCORES} or random, got {score!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if order not in ("sorted", "score"):
            raise ValueError(f"order must be sorted or score, got {order!r}")
        self.after_layers = [int(v) for v in after_layers]
        self.keep = [float(v) for v in keep]
        self.score, self.direction, self.mirrored = score, direction, mirrored
        self.alignment, self.order = alignment, order
        self._plan = {layer - 1: r for layer, r in zip(self.after_layers, self.keep,
                                                       strict=True) if r < 1}
        self._generator = torch.Generator().manual_seed(seed) if score == "random" else None
        self.record: list | None = None

    @property
    def gap_mode(self) -> str | None:
        return "gap_decay" if self.alignment == "gap_decay" else None

    def wants(self, i: int) -> bool:
        return i in self._plan

    def extra_repr(self) -> str:
        return (f"after_layers={self.after_layers}, keep={self.keep}, score={self.score}, "
                f"direction={self.direction}, mirrored={self.mirrored}, "
                f"alignment={self.alignment}")

    def _scores(self, ssm, hidden: torch.Tensor) -> torch.Tensor:
        if self.score == "random":
            return torch.rand(hidden.shape[:2], generator=self._generator).to(hidden.device)
        return importance(ssm[0], ssm[1], self.score, self.direction, self.mirrored)

    def forward(self, i: int, hidden: torch.Tensor, residual: torch.Tensor, ssm, tokens):
        keep = self._plan[i]
        n = hidden.shape[1]
        scores = self._scores(ssm, hidden)
        ci = tokens.cls_index
        if self.alignment == "mask":
            # Every position stays; masked tokens carry position -1 so a later step skips them.
            alive = tokens.positions >= 0
            k = keep_total(self._live(i, n), keep)
            index = select_tokens(scores, k, ci, self.order, alive)
            kept = keep_mask(index, n)
            hidden = hidden * kept[..., None].to(hidden.dtype)
            residual = residual * kept[..., None].to(residual.dtype)
            positions = tokens.positions.masked_fill(~kept, -1)
            if self.record is not None:
                self.record.append((i, scores.detach(), gather_tokens(positions, index)))
            return hidden, residual, dataclasses.replace(tokens, positions=positions)
        k = keep_total(n, keep)
        index = select_tokens(scores, k, ci, self.order)
        hidden = gather_tokens(hidden, index)
        residual = gather_tokens(residual, index)
        positions = gather_tokens(tokens.positions, index)
        new_ci = (k - 1) // 2
        gap = token_gaps(positions, new_ci).to(hidden.dtype) \
            if self.alignment == "gap_decay" else None
        if self.record is not None:
            self.record.append((i, scores.detach(), positions.detach()))
        return hidden, residual, dataclasses.replace(tokens, cls_index=new_ci,
                                                     positions=positions, gap=gap)

    def _live(self, i: int, n: int) -> int:
        """Live tokens entering step ``i`` under ``mask`` (the length never shrinks there)."""
        for j in sorted(self._plan):
            if j >= i:
                break
            n = keep_total(n, self._plan[j])
        return n


def kept_patch_masks(positions: Sequence[torch.Tensor], cls_position: int, patches: int
                     ) -> list[torch.Tensor]:
    """Per pruning step a bool [B, patches] mask of the original patches still kept, from the
    kept positions [B, k] (original token indices; the class token at ``cls_position``; -1 for
    a masked token)."""
    out = []
    for pos in positions:
        q = pos - (pos > cls_position).to(pos.dtype)
        q = torch.where((pos < 0) | (pos == cls_position), torch.full_like(q, patches), q)
        m = torch.zeros(pos.shape[0], patches + 1, dtype=torch.bool, device=pos.device)
        out.append(m.scatter(1, q, True)[:, :patches])
    return out


def patch_scores(scores: torch.Tensor, cls_position: int) -> torch.Tensor:
    """First step's scores [B, L] (every token present) as patch order [B, L - 1]."""
    return torch.cat([scores[:, :cls_position], scores[:, cls_position + 1:]], dim=1)


def schedule_summary(n: int, depth: int, after_layers: Sequence[int], keeps: Sequence[float]
                     ) -> dict:
    counts = layer_token_counts(n, depth, after_layers, keeps)
    return {"tokens_per_layer": counts,
            "estimated_speedup": round(estimated_speedup(counts), 3),
            "token_layers_kept": round(sum(counts) / (len(counts) * counts[0]), 4)}


__all__ = ["ALIGNMENTS", "DIRECTIONS", "SCORES", "TopVimPruner", "estimated_speedup",
           "gather_tokens", "importance", "keep_mask", "keep_total", "kept_patch_masks",
           "layer_token_counts", "location_families", "patch_scores", "schedule_summary",
           "select_tokens", "token_gaps"]
