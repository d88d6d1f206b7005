"""Binarization after BiBERT (Qin et al., ICLR'22, https://arxiv.org/abs/2203.06390).

Plain tensor functions first (binarizers with straight-through estimators, bit packing, the
MatMulNBits 2-bit layout), then the thin modules a pass swaps into a model. Only torch is
imported, so ``bench/gpu_distill.py`` can load this file on a machine without the rest of
compress.

BiBERT, read from its code (transformer/utils_quant.py, modeling_quant.py):
  * weights per output row: ``W_c = W - mean(W)``, ``alpha = mean|W_c|``, ``B = alpha*sign(W_c)``;
    gradient through ``clamp(W_c, -1, 1)`` (straight-through inside the clip range);
  * binarized Linear inputs: ``sign(x)``, no scale, gradient 1 where |x| <= 1, else 0;
  * Bi-Attention: ``A = sign(Q) sign(K)^T / sqrt(d) + mask``, no softmax, ``bool(A)`` (1 iff
    A > 0) with the same clipped STE, context ``bool(A) @ sign(V)``.
Everything the forward pass computes is exact: an STE term is ``c - c.detach()``, which is
zero in value and carries only the gradient of ``c``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- tensor functions


def _ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def weight_signs_alpha(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row signs (bool, True = +1) of the centred weight and the scale alpha.

    ``alpha = mean|W - mean W|`` per row; a centred value of exactly 0 counts as +1, so every
    row takes exactly two values.
    """
    wc = w - w.mean(dim=-1, keepdim=True)
    return wc >= 0, wc.abs().mean(dim=-1)


def binarize_weight(w: torch.Tensor, ste: bool = True) -> torch.Tensor:
    """``alpha * sign(W - mean W)`` per output row (dim 0 rows, last dim reduced).

    With ``ste`` the gradient flows to ``w`` through ``clamp(W - mean W, -1, 1)`` as in BiBERT.
    """
    wc = w - w.mean(dim=-1, keepdim=True)
    alpha = wc.abs().mean(dim=-1, keepdim=True).detach()
    b = alpha * torch.where(wc >= 0, 1.0, -1.0).to(w.dtype)
    if not ste:
        return b
    return _ste(b, wc.clamp(-1.0, 1.0))


def sign_ste(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """``sign(x)`` with the clipped straight-through estimator: gradient 1 for |x| <= clip."""
    return _ste(torch.sign(x), x.clamp(-clip, clip))


def bool_ste(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """``bool(x)``: 1 where x > 0, else 0 (BiBERT's binarized attention), clipped STE."""
    return _ste((x > 0).to(x.dtype), x.clamp(-clip, clip))


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a bool [rows, K] tensor into uint8 [rows, ceil(K/8)]; bit i of byte j is column 8j+i.

    A set bit means +1. Padding bits of the last byte are 0.
    """
    rows, k = signs.shape
    pad = (-k) % 8
    bits = F.pad(signs.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=signs.device))
    return (bits.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_signs``: bool [rows, k]."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].bool()


def matmulnbits_2bit(signs: torch.Tensor, alpha: torch.Tensor, block_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ±alpha weight in com.microsoft::MatMulNBits' 2-bit layout (no zero-point input).

    MatMulNBits dequantizes ``(code - 2) * scale`` for 2 bits without zero points, so +1 is code
    3 and -1 is code 1; K is padded to whole blocks with code 2 (value 0). Returns ``qweight``
    uint8 [N, k_blocks, block_size // 4] (four codes per byte, low bits first along K) and
    ``scales`` float32 [N * k_blocks] (alpha repeated per block).
    """
    n, k = signs.shape
    k_blocks = math.ceil(k / block_size)
    codes = torch.where(signs, 3, 1).to(torch.int32)
    codes = F.pad(codes, (0, k_blocks * block_size - k), value=2)
    codes = codes.reshape(n, k_blocks, block_size // 4, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=signs.device)
    qweight = (codes << shifts).sum(-1).to(torch.uint8)
    scales = alpha.float().repeat_interleave(k_blocks)
    return qweight.contiguous(), scales.contiguous()


def binary_ops_flops(fp_macs: float, binary_macs: float) -> float:
    """Operations as BiBERT counts them: float MACs plus binary (1-bit x 1-bit) MACs / 64.

    A 64-bit XNOR + popcount does 64 binary multiply-accumulates in about one instruction.
    """
    return fp_macs + binary_macs / 64.0


# --------------------------------------------------------------------------- modules

def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


class BinaryLinear(nn.Module):
    """nn.Linear with ``alpha * sign(W - mean W)`` weights and optional input binarization.

    ``act``: ``none`` (W1A32), ``int8`` (W1A8: ``input_quantizer`` fake-quantizes the input,
    straight-through in training) or ``sign`` (W1A1). After ``freeze()`` the ONNX export emits
    ``com.microsoft::MatMulNBits(bits=2)`` with the codes ±1 and alpha as the per-row scale:
    the smallest weight form ONNX Runtime executes (it has no 1-bit kernel).
    """

    def __init__(self, linear: nn.Linear, act: str = "none",
                 input_quantizer: nn.Module | None = None, block_size: int = 32,
                 accuracy_level: int = 4):
        super().__init__()
        if act not in ("none", "int8", "sign"):
            raise ValueError(f"act must be none, int8 or sign, got {act!r}")
        if block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two in 16..256, got {block_size}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.act = act
        self.input_quantizer = input_quantizer
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self.frozen = False

    def binary_weight(self) -> torch.Tensor:
        return binarize_weight(self.weight, ste=self.training or torch.is_grad_enabled())

    def binarize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "sign":
            return torch.sign(x) if _exporting() else sign_ste(x)
        if self.act == "int8" and self.input_quantizer is not None:
            xq = self.input_quantizer(x)
            return xq if _exporting() else x + (xq - x).detach()
        return x

    def freeze(self) -> None:
        """Store the MatMulNBits codes and scales (the weight must not change afterwards)."""
        signs, alpha = weight_signs_alpha(self.weight.detach())
        qweight, scales = matmulnbits_2bit(signs, alpha, self.block_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.frozen = True

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """1-bit storage: packed signs uint8 [N, ceil(K/8)] and alpha float32 [N]."""
        signs, alpha = weight_signs_alpha(self.weight.detach())
        return pack_signs(signs.cpu()), alpha.float().cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.binarize_input(x)
        if _exporting() and self.frozen:
            y = torch.onnx.ops.symbolic(
                "com.microsoft::MatMulNBits", [x, self.qweight, self.scales],
                {"K": self.in_features, "N": self.out_features, "bits": 2,
                 "block_size": self.block_size, "accuracy_level": self.accuracy_level},
                dtype=x.dtype, shape=[*x.shape[:-1], self.out_features], version=1)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.act}"


class BiMatMulQK(nn.Module):
    """``sign(q) @ sign(k)^T * scale``; ``scale`` makes the scores BiBERT's ``BQ BK^T / sqrt(d)``
    where the attention divides by sqrt(d) after the product (BERT) or not at all (timm scales
    q before, which a sign erases)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if _exporting():
            y = torch.matmul(torch.sign(a), torch.sign(b))
        else:
            y = torch.matmul(sign_ste(a), sign_ste(b))
        return y * self.scale if self.scale != 1.0 else y


class BoolAttention(nn.Module):
    """Replaces the softmax: ``bool(A)`` (masked scores, -inf or -10000, become 0)."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return (scores > 0).to(scores.dtype)
        return bool_ste(scores)


class BiMatMulAV(nn.Module):
    """``bool(A) @ sign(V) / n_keys``.

    BiBERT leaves the product unnormalized (the next layer's sign erases the scale); dividing by
    the key count keeps the context in the value range when the next Linear keeps float inputs
    (W1A32, W1A8) and changes nothing under W1A1.
    """

    def forward(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sv = torch.sign(v) if _exporting() else sign_ste(v)
        return torch.matmul(probs, sv) / v.shape[-2]
