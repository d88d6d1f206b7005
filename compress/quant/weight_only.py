"""Weight-only group quantization as plain tensor functions: RTN, GPTQ, HQQ, and packing.

Layout: a weight ``w`` of shape ``[N, K]`` (out, in) is split along K into groups of
``block`` columns; each (row, group) has a float ``scale`` and an integer ``zero`` in the
unsigned code range ``[0, 2^bits - 1]``: ``w_hat = (q - zero) * scale``. This is exactly the
ONNX Runtime ``MatMulNBits`` / ``GatherBlockQuantized`` convention, so codes go to ONNX as they
are. Symmetric quantization pins ``zero = 2^(bits-1)`` (no zero-point tensor needed).

GPTQ: Frantar et al., https://arxiv.org/abs/2210.17323 (IST-DASLab/gptq ``gptq.py``).
HQQ: Badri & Shaji, https://mobiusml.github.io/hqq_blog/ (mobiusml/hqq ``optimize.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-9


@dataclass
class GroupQuantized:
    """Integer codes ``[N, K]`` (uint8, values < 2^bits), scales and zeros ``[N, K / block]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor  # uint8 integer zero points (float for HQQ)
    bits: int
    block: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scale, self.zero, self.block)


def check_shape(k: int, block: int) -> None:
    if block < 1 or k % block:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block}")


def group_qparams(w: torch.Tensor, bits: int, block: int, symmetric: bool,
                  shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero per (row, group); ``shrink`` < 1 clips the range."""
    n, k = w.shape
    check_shape(k, block)
    g = w.float().reshape(n, k // block, block)
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = g.abs().amax(-1) * shrink
        # Codes [0, 2^b - 1] around zero 2^(b-1): [-half, half - 1] * scale covers
        # [-amax, amax] with the positive end at half - 1 steps.
        scale = (amax / max(half - 1, 1)).clamp_min(EPS)
        zero = torch.full_like(scale, half)
    else:
        lo = g.amin(-1).clamp(max=0) * shrink
        hi = g.amax(-1).clamp(min=0) * shrink
        scale = ((hi - lo) / qmax).clamp_min(EPS)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero.to(torch.uint8)


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    block: int) -> torch.Tensor:
    n, k = w.shape
    s = scale.float().repeat_interleave(block, 1)
    z = zero.float().repeat_interleave(block, 1)
    # Integer zero points: round then shift (exact integer grid); float ones (HQQ): shift first.
    q = torch.round(w.float() / s) + z if not zero.is_floating_point() else \
        torch.round(w.float() / s + z)
    return torch.clamp(q, 0, 2 ** bits - 1).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      block: int) -> torch.Tensor:
    s = scale.float().repeat_interleave(block, 1)
    z = zero.float().repeat_interleave(block, 1)
    return (codes.float() - z) * s


def rtn(w: torch.Tensor, bits: int, block: int, symmetric: bool = False,
        mse_grid: int = 0, max_shrink: float = 0.2) -> GroupQuantized:
    """Round to nearest; with ``mse_grid`` > 0, each group's range is shrunk to minimize the
    squared weight error over ``mse_grid`` steps down to ``1 - max_shrink`` (GPTQ's ``mse``)."""
    w = w.float()
    scale, zero = group_qparams(w, bits, block, symmetric)
    if mse_grid > 0:
        n, k = w.shape
        best = _group_err(w, scale, zero, bits, block)
        for i in range(1, mse_grid + 1):
            s2, z2 = group_qparams(w, bits, block, symmetric, shrink=1 - max_shrink * i / mse_grid)
            err = _group_err(w, s2, z2, bits, block)
            better = err < best
            scale = torch.where(better, s2, scale)
            zero = torch.where(better, z2, zero)
            best = torch.minimum(err, best)
    return GroupQuantized(quantize_groups(w, scale, zero, bits, block), scale, zero, bits, block)


def _group_err(w, scale, zero, bits, block):
    n, k = w.shape
    wq = dequantize_groups(quantize_groups(w, scale, zero, bits, block), scale, zero, block)
    return (w - wq).pow(2).reshape(n, k // block, block).sum(-1)


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """``2/n sum x x^T`` over the rows of ``inputs`` ``[n, K]`` (GPTQ's layer Hessian)."""
    x = inputs.double().reshape(-1, inputs.shape[-1])
    return (2.0 / max(x.shape[0], 1)) * (x.T @ x)


class HessianAccumulator:
    """Running ``2/n sum x x^T`` of a Linear layer's inputs (a forward pre-hook target)."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        self.h += (2.0 / self.n) * (x.T @ x)


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, block: int, symmetric: bool = False,
         percdamp: float = 0.01, act_order: bool = False, blocksize: int = 128,
         mse_grid: int = 0) -> GroupQuantized:
    """GPTQ: quantize columns one by one, spreading each column's error over the columns not yet
    quantized through the inverse Hessian (Cholesky form), block by block.

    Group parameters come from the original weights ("static groups") when ``act_order`` is on,
    so groups stay contiguous in K and the ONNX layout needs no ``g_idx``; otherwise each group's
    parameters come from the already error-compensated weights when its first column is reached.
    """
    n, k = w.shape
    check_shape(k, block)
    W = w.detach().clone().double()
    H = h.detach().clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order
    if static:
        st = rtn(W.float(), bits, block, symmetric, mse_grid)
        scale, zero = st.scale.clone(), st.zero.clone()
    else:
        scale = torch.zeros(n, k // block)
        zero = torch.zeros(n, k // block, dtype=torch.uint8)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    # Keep group starts inside one GPTQ block so a group's range sees the updated weights.
    bs = max(blocksize // block, 1) * block
    qmax = 2 ** bits - 1
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block
            if not static and col % block == 0:
                gq = rtn(W1[:, i:i + block].float(), bits, block, symmetric, mse_grid)
                scale[:, g], zero[:, g] = gq.scale[:, 0], gq.zero[:, 0]
            sg, zg = scale[:, g].double(), zero[:, g].double()
            q = (torch.clamp(torch.round(W1[:, i] / sg) + zg, 0, qmax) - zg) * sg
            Q1[:, i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)].float()
    codes = quantize_groups(Q, scale, zero, bits, block)
    return GroupQuantized(codes, scale.float(), zero, bits, block)


def hqq(w: torch.Tensor, bits: int, block: int, iters: int = 20, p: float = 0.7,
        beta: float = 10.0, kappa: float = 1.01) -> GroupQuantized:
    """HQQ (data-free): half-quadratic optimization of each group's zero point against a
    sparsity-promoting l_p error. The zero point stays float (rounding it undoes most of the
    gain); MatMulNBits takes float zero points (slow at 2 bits in ORT 1.32, issue #28552).
    """
    n, k = w.shape
    check_shape(k, block)
    W = w.float().reshape(n, k // block, block)
    qmax = 2 ** bits - 1
    lo, hi = W.amin(-1, keepdim=True), W.amax(-1, keepdim=True)
    inv = qmax / (hi - lo).clamp_min(EPS)        # HQQ stores 1/scale
    z = -lo * inv
    best_err, best_z = None, z.clone()
    for _ in range(iters):
        wq = torch.clamp(torch.round(W * inv + z), 0, qmax)
        wr = (wq - z) / inv
        we = _shrink_lp(W - wr, beta, p)
        z = torch.mean(wq - (W - we) * inv, dim=-1, keepdim=True)
        beta *= kappa
        err = (W - (torch.clamp(torch.round(W * inv + z), 0, qmax) - z) / inv).abs().mean()
        if best_err is not None and err >= best_err:
            break
        best_err, best_z = err, z.clone()
    scale = (1 / inv).squeeze(-1)
    zero = best_z.squeeze(-1).float()
    return GroupQuantized(quantize_groups(w, scale, zero, bits, block), scale, zero, bits, block)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-8).pow(p - 1))


# ---- packing ---------------------------------------------------------------------------------

def container_bits(bits: int) -> int:
    """ORT's MatMulNBits/GatherBlockQuantized run 2, 4 and 8 bits; other widths use 8."""
    return bits if bits in (2, 4, 8) else 8


def pack_uint(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., K]`` (values < 2^bits) into uint8, low bits first along K."""
    per = 8 // bits
    *lead, k = codes.shape
    if k % per:
        raise ValueError(f"last dim {k} is not a multiple of {per} for {bits}-bit packing")
    c = codes.to(torch.int32).reshape(*lead, k // per, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_uint(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8)


def matmulnbits_tensors(gq: GroupQuantized, bits: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B [N, k_blocks, block*bits/8]``, ``scales [N * k_blocks]``, packed ``zero_points``
    ``[N, ceil(k_blocks*bits/8)]`` for com.microsoft::MatMulNBits at ``bits`` (container)."""
    bits = bits or container_bits(gq.bits)
    n, k = gq.codes.shape
    kb = k // gq.block
    b = pack_uint(gq.codes.reshape(n, kb, gq.block), bits)
    if gq.zero.is_floating_point():
        return b, gq.scale.reshape(-1).float().contiguous(), gq.zero.reshape(-1).float()
    per = 8 // bits
    zpad = (-kb) % per
    z = torch.nn.functional.pad(gq.zero, (0, zpad)) if zpad else gq.zero
    zp = pack_uint(z, bits)
    return b, gq.scale.reshape(-1).float().contiguous(), zp.reshape(-1).contiguous()
