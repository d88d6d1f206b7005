"""ToMe: bipartite soft matching and size-weighted merging (Bolya et al., ICLR'23).

Follows facebookresearch/ToMe ``tome/merge.py`` with two changes: the first ``protected`` tokens
(class, distillation and register tokens) are set aside before matching instead of being masked
with -inf, so they can never be merged whatever their count; and merging always uses
``scatter_add`` (``scatter_reduce(mean)`` has no ONNX equivalent and the dynamo exporter
mis-exports it silently), with the mean taken as a size-weighted sum divided by summed sizes.
Shapes: tokens are [batch, tokens, channels], sizes [batch, tokens, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> tuple[Merge, int]:
    """Plan the merge of ``r`` token pairs by cosine similarity of ``metric`` [B, N, C].

    Tokens after the first ``protected`` alternate into sets A (even) and B (odd); each A token
    proposes its most similar B token and the ``r`` most similar proposals are merged. Returns
    ``(merge, r)`` where ``merge(x)`` sums merged tokens of any [B, N, C'] tensor (N -> N - r) and
    ``r`` is the clamped count actually merged; ``merge.select(x)`` keeps, for each token left,
    the token it merged into (for positions, which cannot be summed).
    """
    n = metric.shape[1] - protected
    r = min(r, n // 2)
    if r <= 0:
        def identity(x: torch.Tensor) -> torch.Tensor:
            return x

        identity.select = identity
        return identity, 0
    with torch.no_grad():
        m = metric[:, protected:]
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]       # A tokens kept as they are
        src_idx = edge_idx[:, :r]       # A tokens merged into B
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        keep, rest = x[:, :protected], x[:, protected:]
        src, dst = rest[:, ::2], rest[:, 1::2]
        c = x.shape[-1]
        unm = src.gather(dim=1, index=unm_idx.expand(-1, -1, c))
        moved = src.gather(dim=1, index=src_idx.expand(-1, -1, c))
        dst = dst.scatter_add(1, dst_idx.expand(-1, -1, c), moved)
        return torch.cat([keep, unm, dst], dim=1)

    def select(x: torch.Tensor) -> torch.Tensor:
        # The surviving representative of each token (what merge keeps, without the sums):
        # position-like tensors that cannot be averaged follow the merge this way.
        keep, rest = x[:, :protected], x[:, protected:]
        src, dst = rest[:, ::2], rest[:, 1::2]
        unm = src.gather(dim=1, index=unm_idx.expand(-1, -1, x.shape[-1]))
        return torch.cat([keep, unm, dst], dim=1)

    merge.select = select
    return merge, r


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` as size-weighted averages; returns (tokens, sizes) with sizes summed.

    ``size`` None means every token stands for one patch.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def weighted_token_mean(x: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """Mean of tokens ``start:`` of x (B, N, C), each counted ``weight`` (B, N, 1) times: a
    merged token as the patches it stands for, a dropped-but-carried one as zero."""
    w = weight[:, start:].to(x.dtype)
    return (x[:, start:] * w).sum(1) / w.sum(1).clamp_min(1.0)


def parse_r(depth: int, r: int | list[int], schedule: str = "constant") -> list[int]:
    """Per-block merge counts: a list as given, or ``r`` constant, or decreasing 2r -> 0.

    ``decreasing`` is ToMe's ``(r, -1)`` schedule: linear from 2r at the first block to 0 at the
    last, same total as constant r.
    """
    if isinstance(r, list):
        if len(r) != depth:
            raise ValueError(f"r has {len(r)} entries for {depth} blocks")
        return list(r)
    if schedule == "constant":
        return [r] * depth
    if depth == 1:
        return [r]
    return [int(round(2 * r * (1 - i / (depth - 1)))) for i in range(depth)]


def token_counts(n: int, rs: list[int], protected: int = 0) -> list[int]:
    """Tokens entering each block and, last, leaving the final one (the clamp ToMe applies)."""
    counts = [n]
    for r in rs:
        n = n - min(r, (n - protected) // 2)
        counts.append(n)
    return counts
