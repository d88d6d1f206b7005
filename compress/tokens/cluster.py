"""Expedit / Hourglass token clustering and reconstruction (Liang et al., NeurIPS'22).

Training-free: after some block, the HxW patch tokens are clustered into hxw tokens (soft
k-means with a locality window, centroids initialised by average pooling); later blocks run on
the clusters; at the end each original position is rebuilt from its nearest refined clusters,
so a dense (token-map) output keeps its full resolution. Everything is static per grid size
(the loop unrolls, the locality mask is a constant), so it exports to ONNX for any batch.
Shapes: tokens [batch, H*W, channels].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def locality_mask(grid: tuple[int, int], clusters: tuple[int, int], window: int) -> torch.Tensor:
    """[H*W, h*w] bool: cluster j is within ``window // 2`` cluster cells of token i."""
    H, W = grid
    h, w = clusters
    ti = torch.arange(H).repeat_interleave(W) * h // H     # token's row in the cluster grid
    tj = torch.arange(W).repeat(H) * w // W
    ci = torch.arange(h).repeat_interleave(w)
    cj = torch.arange(w).repeat(h)
    r = window // 2
    return ((ti[:, None] - ci[None]).abs() <= r) & ((tj[:, None] - cj[None]).abs() <= r)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # |x|^2 - 2 x.c + |c|^2 as matmuls (ONNX MatMul; cdist has no ONNX op)
    return (x * x).sum(-1, keepdim=True) - 2 * x @ c.transpose(-1, -2) + \
        (c * c).sum(-1)[:, None, :]


def cluster_tokens(x: torch.Tensor, grid: tuple[int, int], clusters: tuple[int, int],
                   iters: int = 5, tau: float = 1.0, window: int = 5) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """Soft k-means of ``x`` [B, H*W, C] into ``clusters`` tokens; returns (centroids, affinity).

    ``tau`` scales squared distances normalised by the channel count. Grid sizes must divide
    by the cluster sizes (``adaptive_avg_pool2d`` exports to ONNX only then).
    """
    B, N, C = x.shape
    H, W = grid
    h, w = clusters
    if H % h or W % w:
        raise ValueError(f"grid {grid} must divide by clusters {clusters}")
    c = F.avg_pool2d(x.transpose(1, 2).reshape(B, C, H, W), (H // h, W // w))
    c = c.flatten(2).transpose(1, 2)                                     # [B, h*w, C]
    far = (~locality_mask(grid, clusters, window)).to(x.dtype).to(x.device) * 1e4
    a = None
    for _ in range(iters):
        d = _sq_dist(x, c) / C + far
        a = torch.softmax(-tau * d, dim=-1)                             # [B, N, h*w]
        c = (a.transpose(1, 2) @ x) / a.sum(1)[..., None].clamp_min(1e-6)
    return c, a


def reconstruct_tokens(x_before: torch.Tensor, c_before: torch.Tensor, z: torch.Tensor,
                       k: int = 20, tau: float = 1.0) -> torch.Tensor:
    """Rebuild [B, N, C] tokens from refined cluster tokens ``z`` [B, M, C].

    Weights ``exp(-tau * |x_i - c_j|^2 / C)`` between the features before clustering and the
    centroids, kept for each token's ``k`` nearest clusters and normalised to sum to 1.
    """
    C = x_before.shape[-1]
    d = _sq_dist(x_before, c_before) / C
    k = min(k, c_before.shape[1])
    vals, idx = (-tau * d).topk(k, dim=-1)
    wts = torch.softmax(vals, dim=-1)                                   # exp, then sum to 1
    full = torch.zeros_like(d).scatter(-1, idx, wts)
    return full @ z
