"""Token reduction plans: one step object per transformer block.

A plan is a list with one step per block; the step runs between the block's attention and its
MLP (where ToMe and EViT reduce). Each step knows how many tokens it leaves (``tokens_after``,
for the cost model and the report) and how to reduce (``reduce``), so neither the patching code
nor the passes dispatch on the kind of step.

    Keep()            nothing changes
    Merge(r)          ToMe: merge the r most similar token pairs (keys averaged over heads)
    Prune(keep_rate)  EViT: keep the share of patch tokens the class token attends to most,
                      fuse the rest into one token
    PrefixOnly()      last block of a class-token-pooled model: only the prefix tokens go
                      through the MLP (the others are dead code there: exact)

Shapes: tokens [B, N, C], sizes [B, N, 1] (None: every token stands for one patch), positions
[B, N - protected] (original patch index of each non-prefix token, ``fused`` for a fused token;
None when the model needs no positions, i.e. no RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import bipartite_soft_matching, merge_wavg
from .prune import class_attention, keep_count, topk_keep


@dataclass
class BlockState:
    """What a step may read from the block's attention: keys [B, heads, N, D] (ToMe's metric)
    and probabilities [B, heads, N, N] (EViT's scores); ``record`` collects pictures' data."""

    keys: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    record: list | None = None


class Step:
    """One block's token reduction. Subclasses are frozen dataclasses (comparable, hashable)."""

    needs_probs = False   # the attention must keep its probabilities for this step
    needs_keys = False    # the attention must keep its keys for this step

    def tokens_after(self, n: int, protected: int) -> int:
        return n

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None, pos: torch.Tensor | None,
               state: BlockState, protected: int, fused: int = -1):
        """-> (x, size, pos) after this step."""
        return x, size, pos


@dataclass(frozen=True)
class Keep(Step):
    pass


@dataclass(frozen=True)
class Merge(Step):
    r: int
    needs_keys = True

    def tokens_after(self, n: int, protected: int) -> int:
        return n - min(self.r, (n - protected) // 2)

    def reduce(self, x, size, pos, state, protected, fused=-1):
        if self.r <= 0:
            return x, size, pos
        metric = state.keys.mean(dim=1)          # keys averaged over heads, [B, N, C/h]
        merge, _ = bipartite_soft_matching(metric, self.r, protected)
        x, size = merge_wavg(merge, x, size)
        if pos is not None:
            # A merged token keeps the position of the token it merged into (ToMe's dst).
            head = pos.new_zeros(pos.shape[0], protected)
            pos = merge.select(torch.cat([head, pos], dim=1)[..., None])[:, protected:, 0]
        return x, size, pos


@dataclass(frozen=True)
class Prune(Step):
    keep_rate: float
    needs_probs = True

    def tokens_after(self, n: int, protected: int) -> int:
        rest = n - protected
        k = keep_count(rest, self.keep_rate)
        return protected + k + (1 if k < rest else 0)

    def reduce(self, x, size, pos, state, protected, fused=-1):
        scores = class_attention(state.probs, protected)
        k = keep_count(x.shape[1] - protected, self.keep_rate)
        x, size, idx = topk_keep(x, scores, k, protected, size, fuse=True)
        if state.record is not None:
            state.record.append((scores.detach(), idx.detach()))
        if pos is not None:
            # The fused token has no position of its own: it gets the ``fused`` index.
            pos = torch.cat([pos.gather(1, idx), torch.full_like(pos[:, :1], fused)], dim=1)
        return x, size, pos


@dataclass(frozen=True)
class PrefixOnly(Step):
    def tokens_after(self, n: int, protected: int) -> int:
        return protected

    def reduce(self, x, size, pos, state, protected, fused=-1):
        # Class-token pooling reads only the prefix tokens after the last block: the last MLP
        # on the other tokens is dead code, so they are dropped exactly (no fidelity cost).
        size = None if size is None else size[:, :protected]
        pos = None if pos is None else pos[:, :0]
        return x[:, :protected], size, pos


def as_step(step) -> Step:
    """A Step from a Step or None (Keep)."""
    if step is None:
        return Keep()
    if isinstance(step, Step):
        return step
    raise TypeError(f"plan entries are Step objects (Keep, Merge, Prune, PrefixOnly) or None, "
                    f"got {step!r}")


def plan_counts(n: int, protected: int, plan: list) -> list[int]:
    """Tokens entering each block (and leaving the last) under ``plan``."""
    counts = [n]
    for step in plan:
        n = as_step(step).tokens_after(n, protected)
        counts.append(n)
    return counts
