"""Expedit / Hourglass token clustering and reconstruction (Liang et al., NeurIPS'22).

Training-free: after some block, the HxW patch tokens are clustered into hxw tokens (soft
k-means with a locality window, centroids initialised by adaptive average pooling); later blocks
run on the clusters; at the end each original position is rebuilt from its nearest refined
clusters, so a dense (token-map) output keeps its full resolution. Every size is a Python int
taken from the input's shape (the loop unrolls, the pooling matrix and locality mask are
constants of the grid), so a graph exports to ONNX for any batch at the resolution it was traced.
Shapes: tokens [batch, H*W, channels].
"""

from __future__ import annotations

import math

import torch

# Added to the distance of clusters outside a token's window (the reference implementation's
# constant): exp(-tau * 1e16) is 0 for any useful tau, so they get no affinity.
FAR = 1e16


def cluster_grid(grid: tuple[int, int], clusters: tuple[int, int] | None = None,
                 ratio: float | None = None) -> tuple[int, int]:
    """The hxw cluster grid for an HxW token grid: ``clusters`` as given, or ``ratio`` of the
    tokens (each side scaled by sqrt(ratio), rounded, at least 1)."""
    if clusters is not None:
        return int(clusters[0]), int(clusters[1])
    side = math.sqrt(ratio)
    return max(1, min(grid[0], round(grid[0] * side))), max(1, min(grid[1], round(grid[1] * side)))


def _bins(n: int, m: int) -> list[tuple[int, int]]:
    # adaptive_avg_pool's bins: [floor(i*n/m), ceil((i+1)*n/m))
    return [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]


def pool_matrix(grid: tuple[int, int], clusters: tuple[int, int]) -> torch.Tensor:
    """[h*w, H*W] matrix P with ``P @ x`` == ``adaptive_avg_pool2d`` of the token grid.

    A constant MatMul instead of the pooling op: it exports for any grid, divisible or not.
    """
    rows = torch.zeros(clusters[0], grid[0])
    for i, (a, b) in enumerate(_bins(grid[0], clusters[0])):
        rows[i, a:b] = 1.0 / (b - a)
    cols = torch.zeros(clusters[1], grid[1])
    for j, (a, b) in enumerate(_bins(grid[1], clusters[1])):
        cols[j, a:b] = 1.0 / (b - a)
    return torch.kron(rows, cols)


def locality_mask(grid: tuple[int, int], clusters: tuple[int, int], window: int) -> torch.Tensor:
    """[H*W, h*w] bool: cluster j is within ``window // 2`` cluster cells of token i's cell."""
    H, W = grid
    h, w = clusters
    ti = torch.arange(H).repeat_interleave(W) * h // H     # token's row in the cluster grid
    tj = torch.arange(W).repeat(H) * w // W
    ci = torch.arange(h).repeat_interleave(w)
    cj = torch.arange(w).repeat(h)
    r = window // 2
    return ((ti[:, None] - ci[None]).abs() <= r) & ((tj[:, None] - cj[None]).abs() <= r)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # |x|^2 - 2 x.c + |c|^2 as matmuls (ONNX MatMul; cdist has no ONNX op); clamped at 0
    # because the expansion can go slightly negative in float32.
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ c.transpose(-1, -2) + (c * c).sum(-1)[:, None, :]
    return d.clamp_min(0)


def cluster_tokens(x: torch.Tensor, grid: tuple[int, int], clusters: tuple[int, int],
                   iters: int = 5, tau: float = 0.01, window: int = 5
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft k-means of ``x`` [B, H*W, C] into h*w tokens; returns (centroids, affinity).

    Centroids start as the adaptive average pool of the grid; each of ``iters`` steps computes
    ``A = softmax_j(-tau * (|x_i - c_j|^2 + far_ij))`` (far: outside the locality window) and
    ``c_j = sum_i A_ij x_i / sum_i A_ij``. ``iters=0`` returns the pooled grid (affinity None).
    """
    H, W = grid
    h, w = clusters
    if x.shape[1] != H * W:
        raise ValueError(f"{x.shape[1]} tokens do not form a {H}x{W} grid")
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"clusters {clusters} must lie within the {H}x{W} token grid")
    pool = pool_matrix(grid, (h, w)).to(x.dtype).to(x.device)
    c = pool @ x                                                          # [B, h*w, C]
    far = (~locality_mask(grid, (h, w), window)).to(x.dtype).to(x.device) * FAR
    a = None
    for _ in range(iters):
        a = torch.softmax(-tau * (_sq_dist(x, c) + far), dim=-1)          # [B, N, h*w]
        c = (a.transpose(1, 2) @ x) / a.sum(1)[..., None].clamp_min(1e-12)
    return c, a


def reconstruct_tokens(x_before: torch.Tensor, c_before: torch.Tensor, z: torch.Tensor,
                       k: int = 20, tau: float = 0.01) -> torch.Tensor:
    """Rebuild [B, N, C] tokens from refined cluster tokens ``z`` [B, M, C].

    ``w_ij = exp(-tau * |x_i - c_j|^2)`` between the features before clustering and the
    centroids, kept for each token's ``k`` nearest clusters, rows L2-normalised (as the
    reference ``F.normalize``), ``out_i = sum_j w_ij z_j``.
    """
    logits = -tau * _sq_dist(x_before, c_before)                         # [B, N, M]
    k = min(k, c_before.shape[1])
    top = logits.topk(k, dim=-1).values
    # Shifting by the row's best logit leaves the L2-normalised row unchanged and keeps exp from
    # underflowing to an all-zero row for tokens far from every centroid.
    wts = torch.exp(logits - top[..., :1])
    wts = torch.where(logits >= top[..., -1:], wts, torch.zeros_like(wts))
    wts = wts / wts.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return wts @ z
