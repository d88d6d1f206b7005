"""Quantization as plain tensor functions: ranges, scales, fake quantization, error metrics.

Conventions (Gholami et al., arXiv 2103.13630): ``q = clamp(round(x / scale) + zp, qmin, qmax)``,
``x_hat = (q - zp) * scale``. ``torch.round`` rounds half to even, as ONNX QuantizeLinear does, so
the torch simulation and ONNX Runtime agree bit for bit on the integer codes.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer code range; ``narrow`` drops the most negative code (symmetric weights)."""
    if signed:
        lo = -(2 ** (bits - 1)) + (1 if narrow else 0)
        return lo, 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def symmetric_qparams(amax: torch.Tensor, bits: int, narrow: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale for a signed symmetric range covering [-amax, amax]; zero point 0."""
    _, qmax = int_range(bits, signed=True, narrow=narrow)
    scale = (amax.float() / qmax).clamp_min(EPS)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def affine_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for an unsigned range covering [min, max] (which always holds 0)."""
    qmin, qmax = int_range(bits, signed=False)
    lo = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    hi = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
             ) -> torch.Tensor:
    """Integer codes (as float tensor) of ``x``."""
    return torch.clamp(torch.round(x / scale) + zp, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    return (q - zp) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                  ste: bool = False) -> torch.Tensor:
    """Quantize and dequantize; with ``ste`` the gradient passes straight through."""
    y = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)
    return x + (y - x).detach() if ste else y


def reshape_for_axis(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - test||)."""
    ref, test = ref.detach().double(), test.detach().double()
    noise = torch.linalg.vector_norm(ref - test)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(ref) / noise))


def sqnr_from_sums(signal_sq: float, noise_sq: float) -> float:
    import math

    if noise_sq <= 0:
        return float("inf")
    return 10 * math.log10(max(signal_sq, EPS) / noise_sq)


def search_weight_scale(w: torch.Tensor, bits: int, metric: str = "mse", grid: int = 64,
                        min_fraction: float = 0.3) -> torch.Tensor:
    """Per-output-channel symmetric scale whose clipping minimizes the row's quantization error.

    ``metric``: ``minmax`` (no search), ``mse`` (squared error) or ``cosine`` (1 - cosine
    similarity of the row); candidates clip each row at ``t * max|row|`` for ``grid`` fractions t
    in [min_fraction, 1]. ``percentile`` clips each row at its 99.99th |w| percentile.
    """
    rows = w.detach().flatten(1).float()
    amax = rows.abs().amax(1)
    _, qmax = int_range(bits, signed=True, narrow=True)
    if metric == "minmax":
        return symmetric_qparams(amax, bits)[0]
    if metric == "percentile":
        clip = torch.quantile(rows.abs(), 0.9999, dim=1)
        return symmetric_qparams(torch.minimum(clip, amax), bits)[0]
    best_err = torch.full_like(amax, float("inf"))
    best_scale = symmetric_qparams(amax, bits)[0]
    for t in torch.linspace(min_fraction, 1.0, grid):
        scale = symmetric_qparams(amax * t, bits)[0]
        y = fake_quantize(rows, scale[:, None], torch.zeros(()), -qmax, qmax)
        if metric == "mse":
            err = (y - rows).pow(2).mean(1)
        elif metric == "cosine":
            cos = torch.nn.functional.cosine_similarity(rows.double(), y.double(), dim=1)
            err = 1 - cos.float()
        else:
            raise ValueError(f"unknown weight observer {metric!r}")
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def two_region_fake_quantize(x: torch.Tensor, split: torch.Tensor, scale1: torch.Tensor,
                             zp1: torch.Tensor, scale2: torch.Tensor, region_bits: int,
                             tail: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """OPT-m two-region quantization: the dense region ``x <= split`` on a fine unsigned grid
    (``scale1``, ``zp1``), the tail ``x - split > 0`` on a coarse one (``scale2 = 2^m scale1``,
    zero point 0), each on ``region_bits`` codes. Returns both dequantized parts; their sum is
    the quantized ``x``. ``tail=False`` is the single-region form: ``x`` on the fine grid
    alone (clamped at its top), the second part zero.

    Iso-bit: a b-bit OPT-m activation has two regions at ``region_bits = b - 1`` (one flag bit
    picks the region: 2^b levels in all, as in PTQ4ViT's twin-uniform and MPTQ-ViT's quantizer)
    or one region at b bits; ``search_two_region`` chooses.

    Serves post-GELU inputs (dense near 0, long positive tail) and post-Softmax probabilities
    (most mass far below 1, a few large ones). Each part is an ordinary uint8
    QuantizeLinear/(Clip)/DequantizeLinear, so the product with the right operand exports
    exactly as two integer matmuls (``x @ B = x1 @ B + x2 @ B``).
    """
    qmin, qmax = int_range(region_bits, signed=False)
    if not tail:
        return fake_quantize(x, scale1, zp1, qmin, qmax), torch.zeros_like(x)
    x1 = fake_quantize(torch.minimum(x, split), scale1, zp1, qmin, qmax)
    x2 = fake_quantize(torch.relu(x - split), scale2, torch.zeros((), device=x.device), qmin,
                       qmax)
    return x1, x2


def search_two_region(x: torch.Tensor | list[torch.Tensor], rhs: torch.Tensor | list[torch.Tensor],
                      bits: int = 8, splits: int = 12, max_m: int = 10,
                      value_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Split and power-of-two scale ratio ``2^m`` minimizing the error of the product ``x @ rhs``
    at ``bits`` bits in all (iso-bit: two regions at ``bits - 1`` each, or one at ``bits``).

    ``x``: calibration samples of the left operand (``..., K``); ``rhs``: the right operand
    (``..., K, N``), broadcast by ``torch.matmul``. For a Linear, ``x`` is input rows (tokens x K)
    and ``rhs`` is ``weight.T``; for attention, ``x`` is probabilities (B, H, rows, K) and
    ``rhs`` the matching values (B, H, K, d). Lists hold several such pairs (e.g. one per
    calibration batch, whose sequence lengths may differ).

    Candidates: one region over the whole range at ``bits`` (min-max, no tail), and splits at
    ``max(x) / 2^k`` (k = 1..splits-1) with both regions at ``bits - 1`` and the tail scale
    ``2^m`` times the fine one (m = 0..max_m). The objective is the mean of ``((x_hat - x) @
    rhs)^2``; as the single region is a candidate, the result is never worse than uniform
    ``bits``-bit min-max on this sample. ``value_range`` (min, max) overrides the sample's range
    (e.g. the range of all calibration data, of which ``x`` is a sample). The result holds
    ``region_bits`` and ``tail`` (False: the single region won).
    """
    xs = x if isinstance(x, list) else [x]
    rhss = rhs if isinstance(rhs, list) else [rhs]
    if len(xs) != len(rhss) or not xs:
        raise ValueError(f"search_two_region needs matching x/rhs pairs, got {len(xs)} and "
                         f"{len(rhss)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"two-region activations need 2..8 bits in all, got {bits}")
    if value_range is None:
        value_range = (torch.stack([t.min() for t in xs]).min(),
                       torch.stack([t.max() for t in xs]).max())
    lo, hi = value_range[0].clamp(max=0), value_range[1].clamp(min=0)
    best = None
    for k in range(splits):
        split = hi / 2 ** k
        if split <= 0:
            break
        tail = k > 0
        region_bits = bits - 1 if tail else bits
        s1, zp1 = affine_qparams(lo, split, region_bits)
        for m in range(max_m + 1 if tail else 1):
            s2 = s1 * 2 ** m
            sq, n = 0.0, 0
            for xi, ri in zip(xs, rhss, strict=False):
                x1, x2 = two_region_fake_quantize(xi, split, s1, zp1.float(), s2, region_bits,
                                                  tail)
                e = (x1 + x2 - xi) @ ri
                sq += float(e.double().pow(2).sum())
                n += e.numel()
            err = sq / n
            if best is None or err < best["error"]:
                qmax = int_range(region_bits, signed=False)[1]
                best = {"error": err, "split": split.clone(), "m": m, "scale1": s1, "zp1": zp1,
                        "scale2": s2, "region_bits": region_bits, "tail": tail,
                        "tail_clipped": bool(tail and hi - split > s2 * qmax)}
    return best
