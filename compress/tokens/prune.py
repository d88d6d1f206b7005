"""Attentive token pruning (EViT, IA-RED²-style scores) as plain tensor functions.

Keep counts are integers computed from the token count with integer arithmetic
(``keep_count``), so they stay symbolic under the dynamo exporter when the sequence length is a
dynamic dimension. Shapes: tokens [batch, tokens, channels], sizes [batch, tokens, 1], scores
[batch, tokens].
"""

from __future__ import annotations

import torch

RATE_DENOM = 1000  # keep rates are applied as integer fractions of 1000 (export-safe)


def keep_count(n, keep_rate: float):
    """ceil(keep_rate * n) with integer ops only (``n`` may be a symbolic shape)."""
    num = int(round(keep_rate * RATE_DENOM))
    k = (n * num + RATE_DENOM - 1) // RATE_DENOM
    # k <= n always; saying so spares torch.export's shape solver an inequality it can fail on.
    return torch.sym_min(k, n) if isinstance(n, torch.SymInt) else min(k, n)


def class_attention(probs: torch.Tensor, protected: int) -> torch.Tensor:
    """EViT's score: attention from the class token (query 0) to each non-protected token,
    averaged over heads. ``probs`` [B, heads, N, N] -> [B, N - protected]."""
    return probs[:, :, 0, protected:].mean(dim=1)


def received_attention(probs: torch.Tensor, query_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Attention each token receives, averaged over heads and (valid) queries -> [B, N].

    The importance score of LTP/LAT-style text pruning: a token many others attend to matters.
    ``query_mask`` [B, N] (1 = real token) leaves padding queries out of the average.
    """
    p = probs.mean(dim=1)                      # [B, Nq, Nk]
    if query_mask is None:
        return p.mean(dim=1)
    w = query_mask.to(p.dtype)[..., None]
    return (p * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def topk_keep(x: torch.Tensor, scores: torch.Tensor, k, protected: int = 0,
              size: torch.Tensor | None = None, fuse: bool = True, extra: list | None = None):
    """Keep the first ``protected`` tokens and the ``k`` best-scoring others; fuse the rest.

    ``scores`` [B, N - protected] rank the non-protected tokens. Kept tokens stay in their
    original order (sorted indices: position-aware models and readable pictures). With ``fuse``
    the dropped tokens become one token: their score-weighted average (EViT's fused token,
    renormalized so it is a convex combination), with their summed size. ``extra`` tensors
    [B, N, C'] are gathered the same way (fused by summation) and returned after (x, size, idx).
    Returns ``(x, size, kept_idx, *extra)``; ``kept_idx`` [B, k] indexes the non-protected
    tokens.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    c = x.shape[-1]
    head, rest = x[:, :protected], x[:, protected:]
    s_head, s_rest = size[:, :protected], size[:, protected:]
    idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values        # [B, k]
    kept = rest.gather(1, idx[..., None].expand(-1, -1, c))
    s_kept = s_rest.gather(1, idx[..., None])
    outs_extra = []
    if fuse:
        # Weight of each dropped token: its score times its size; kept ones get 0.
        # (updates shaped like the index: ONNX ScatterElements requires it, torch does not)
        dropped = torch.ones_like(scores).scatter(1, idx, torch.zeros_like(idx, dtype=scores.dtype))
        w = (scores.clamp_min(0) * dropped)[..., None] * s_rest
        fused = (rest * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
        s_fused = (s_rest * dropped[..., None]).sum(1, keepdim=True)
        x = torch.cat([head, kept, fused], dim=1)
        size = torch.cat([s_head, s_kept, s_fused], dim=1)
        for e in extra or []:
            e_rest = e[:, protected:]
            e_kept = e_rest.gather(1, idx[..., None].expand(-1, -1, e.shape[-1]))
            e_fused = (e_rest * dropped[..., None]).sum(1, keepdim=True)
            outs_extra.append(torch.cat([e[:, :protected], e_kept, e_fused], dim=1))
    else:
        x = torch.cat([head, kept], dim=1)
        size = torch.cat([s_head, s_kept], dim=1)
        for e in extra or []:
            e_rest = e[:, protected:]
            e_kept = e_rest.gather(1, idx[..., None].expand(-1, -1, e.shape[-1]))
            outs_extra.append(torch.cat([e[:, :protected], e_kept], dim=1))
    return (x, size, idx, *outs_extra)
