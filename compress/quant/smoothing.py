"""SmoothQuant with a per-channel shift (MPTQ-ViT's SQ-b), as plain tensor functions.

For a LayerNorm -> Linear pair with calibration activations X (tokens x C) at the Linear input:

1. shift ``z_j = (max X_j + min X_j) / 2`` (centres each channel; Outlier Suppression+),
2. scale ``s_j = max|X_j - z_j|^alpha / max_k |W_kj|^(1 - alpha)`` (SmoothQuant, clamped >= 1e-5),
3. the Linear then sees ``X' = (X - z) / s`` and computes ``X' (W diag s)^T + (b + W z)``, which
   equals ``X W^T + b``: the float output is unchanged while activation outliers move into the
   weights, which are quantized per output channel and absorb them better.

When the LayerNorm output feeds only the Linear(s) (pre-LN transformers: timm ViT/DeiT norm1 ->
qkv, norm2 -> fc1) ``(X - z) / s`` folds into the LayerNorm (``gamma' = gamma / s``,
``beta' = (beta - z) / s``) and costs nothing. Post-LN BERT also adds the LayerNorm output to
the residual stream, so there the transform stays an explicit per-channel affine on the Linear's
input (one elementwise node before the quantizer); the Linear side is still folded.
"""

from __future__ import annotations

import torch

from .functional import affine_qparams, fake_quantize, int_range, symmetric_qparams

SCALE_MIN = 1e-5


def smoothing_factors(x_min: torch.Tensor, x_max: torch.Tensor, weights: list[torch.Tensor],
                      alpha: float, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel scale ``s`` and shift ``z`` for Linear weights sharing one input.

    ``x_min``/``x_max``: per-channel extremes of the input (C,); ``weights``: (out, C) each
    (q, k, v sharing an input are smoothed together, as SmoothQuant does).
    """
    z = (x_max + x_min) / 2 if shift else torch.zeros_like(x_max)
    a = torch.maximum((x_max - z).abs(), (x_min - z).abs()).clamp_min(SCALE_MIN)
    w = torch.cat([w.detach().abs() for w in weights], 0).amax(0).clamp_min(SCALE_MIN)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(SCALE_MIN)
    return s.float(), z.float()


def fold_into_linear(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                     z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a Linear that takes ``(x - z) / s`` and outputs what it did on ``x``."""
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                   device=weight.device)
    new_b = b + weight @ z.to(weight)
    return weight * s.to(weight)[None, :], new_b


def fold_into_layernorm(gamma: torch.Tensor, beta: torch.Tensor, s: torch.Tensor,
                        z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm affine parameters whose output is ``(LN(x) - z) / s``."""
    return gamma / s.to(gamma), (beta - z.to(beta)) / s.to(beta)


def quantized_linear_error(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           s: torch.Tensor, z: torch.Tensor, w_bits: int = 8,
                           a_bits: int = 8) -> float:
    """Relative output error of the smoothed Linear at W``w_bits``A``a_bits`` against float.

    Weights per output channel symmetric, activations per tensor asymmetric (min-max), the
    settings the ``quantize`` pass uses; ``x`` is a sample of input rows (tokens x C).
    """
    ref = torch.nn.functional.linear(x, weight, bias)
    w2, b2 = fold_into_linear(weight, bias, s, z)
    x2 = (x - z) / s
    qmin, qmax = int_range(a_bits, signed=False)
    scale, zp = affine_qparams(x2.min(), x2.max(), a_bits)
    xq = fake_quantize(x2, scale, zp.float(), qmin, qmax)
    w_scale, _ = symmetric_qparams(w2.abs().amax(1), w_bits)
    _, wmax = int_range(w_bits, signed=True, narrow=True)
    wq = fake_quantize(w2, w_scale[:, None], torch.zeros(()), -wmax, wmax)
    out = torch.nn.functional.linear(xq, wq, b2)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def search_alpha(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                 alphas: list[float], shift: bool = True, w_bits: int = 8, a_bits: int = 8
                 ) -> tuple[float, dict[float, float]]:
    """The alpha (from ``alphas``) with the least summed quantized output error of the Linears.

    Returns the best alpha and the summed relative error of every candidate.
    """
    x_min, x_max = x.amin(0), x.amax(0)
    errors = {}
    for a in alphas:
        s, z = smoothing_factors(x_min, x_max, [w for w, _ in weights], a, shift)
        errors[a] = sum(quantized_linear_error(x, w, b, s, z, w_bits, a_bits) for w, b in weights)
    best = min(errors, key=errors.get)
    return best, errors
