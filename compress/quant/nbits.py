"""Block-quantized Linear and Embedding modules that export to ONNX Runtime's N-bit kernels.

``NBitsLinear`` computes ``x @ dequant(codes)^T + b`` in torch and, under ``torch.onnx.export``,
emits ``com.microsoft::MatMulNBits`` (CPU: 2, 4 or 8 bits; other widths ride in the 8-bit
container with their narrower code range, so they are simulated). ``NBitsEmbedding`` emits
``com.microsoft::GatherBlockQuantized`` (4 or 8 bits on CPU; others in the 8-bit container).
Codes, scales and zero points go into the graph as they are, so ORT computes the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import ActQuantizer
from .weight_only import GroupQuantized, container_bits, matmulnbits_tensors, pack_uint


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


class NBitsLinear(nn.Module):
    """nn.Linear with block-quantized weights (``GroupQuantized``) and an optional input quantizer.

    ``accuracy_level`` 4 lets ORT quantize the input to int8 per block inside MatMulNBits
    (the fast path; about 0.5% relative error per layer); 0 computes in float (exact parity).
    """

    def __init__(self, linear: nn.Linear, gq: GroupQuantized,
                 input_quantizer: ActQuantizer | None = None, accuracy_level: int = 4):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.block = gq.bits, gq.block
        self.container = container_bits(gq.bits)
        self.accuracy_level = accuracy_level
        self.gq = gq
        self.bias = linear.bias
        self.input_quantizer = input_quantizer
        b, s, z = matmulnbits_tensors(gq, self.container)
        self.register_buffer("qweight", b)
        self.register_buffer("scales", s)
        self.register_buffer("zero_points", z)
        self._w = None

    @property
    def simulated(self) -> bool:
        return self.bits != self.container or (
            self.input_quantizer is not None and self.input_quantizer.simulated)

    def dequantized_weight(self) -> torch.Tensor:
        if self._w is None:
            self._w = self.gq.dequantize()
        return self._w.to(self.scales.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        if _exporting():
            inputs = [xq, self.qweight, self.scales, self.zero_points]
            if self.bias is not None:
                inputs += [None, self.bias]
            return torch.onnx.ops.symbolic(
                "com.microsoft::MatMulNBits", inputs,
                {"K": self.in_features, "N": self.out_features, "bits": self.container,
                     "block_size": self.block, "accuracy_level": self.accuracy_level},
                dtype=x.dtype, shape=[*x.shape[:-1], self.out_features], version=1)
        return F.linear(xq, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"block={self.block}, container={self.container}")


class NBitsEmbedding(nn.Module):
    """nn.Embedding with rows block-quantized along the hidden dimension."""

    def __init__(self, emb: nn.Embedding, gq: GroupQuantized):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.bits, self.block = gq.bits, gq.block
        # GatherBlockQuantized's CPU kernel takes 4- and 8-bit data (2-bit zero points fail
        # shape inference in ORT 1.32), so everything else uses the 8-bit container.
        self.container = gq.bits if gq.bits in (4, 8) else 8
        self.gq = gq
        per = 8 // self.container
        kb = gq.zero.shape[1]
        z = F.pad(gq.zero, (0, (-kb) % per)) if kb % per else gq.zero
        self.register_buffer("qweight", pack_uint(gq.codes, self.container))
        self.register_buffer("scales", gq.scale.float().contiguous())
        self.register_buffer("zero_points", pack_uint(z, self.container))
        self._w = None

    @property
    def simulated(self) -> bool:
        return self.bits != self.container

    def dequantized_weight(self) -> torch.Tensor:
        if self._w is None:
            self._w = self.gq.dequantize()
        return self._w.to(self.scales.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return torch.onnx.ops.symbolic(
                "com.microsoft::GatherBlockQuantized",
                [self.qweight, ids, self.scales, self.zero_points],
                {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block,
                 "bits": self.container},
                dtype=torch.float32, shape=[*ids.shape, self.embedding_dim], version=1)
        return F.embedding(ids, self.dequantized_weight())

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"block={self.block}")


class NBitsConv2d(nn.Module):
    """nn.Conv2d with block-quantized weights: the kernel flattened to ``[out, in/groups * kh *
    kw]`` and quantized in blocks along that row, like a Linear's.

    ORT has no N-bit convolution kernel, so the export is ONNX's own blocked
    ``DequantizeLinear`` (opset 21, ``block_size`` along axis 1, the last block may be short)
    -> ``Reshape`` -> ``Conv``: the file holds 4-bit codes (``pack_block_dequantize_weights``
    turns their 8-bit container into UINT4 after export) and ORT dequantizes them when it runs
    the Conv, which costs a little time but no accuracy beyond the rounding itself. Rows are
    padded with zeros to whole blocks for the quantizer; the padding is cut before export.
    """

    def __init__(self, conv: nn.Conv2d, gq: GroupQuantized):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported")
        self.weight_shape = tuple(conv.weight.shape)
        self.k = conv.weight[0].numel()
        self.bits, self.block = gq.bits, gq.block
        self.container = container_bits(gq.bits)
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride, conv.padding, conv.dilation, conv.groups)
        self.gq = gq
        self.register_buffer("codes", gq.codes[:, :self.k].to(torch.uint8).contiguous())
        self.register_buffer("scales", gq.scale.float().contiguous())
        self.register_buffer("zero_points", gq.zero.to(torch.uint8).contiguous())
        self._w = None

    @property
    def simulated(self) -> bool:
        return self.bits not in (4, 8)

    def dequantized_weight(self) -> torch.Tensor:
        if self._w is None:
            self._w = self.gq.dequantize()[:, :self.k].reshape(self.weight_shape)
        return self._w.to(self.scales.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            w = torch.onnx.ops.symbolic(
                "DequantizeLinear", [self.codes, self.scales, self.zero_points],
                {"axis": 1, "block_size": self.block}, dtype=torch.float32,
                shape=self.codes.shape, version=21).reshape(self.weight_shape)
        else:
            w = self.dequantized_weight()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"weight={list(self.weight_shape)}, bits={self.bits}, block={self.block}, "
                f"groups={self.groups}")


def quantize_conv_weight(conv: nn.Conv2d, bits: int, block: int, symmetric: bool,
                         mse_grid: int = 0) -> GroupQuantized:
    """RTN block quantization of a Conv kernel flattened to rows, padded to whole blocks."""
    from .weight_only import rtn

    w = conv.weight.detach().float().cpu().flatten(1)
    pad = -w.shape[1] % block
    if pad:
        # Repeat the row's last value rather than zeros, so padding never widens a block's range.
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], 1)
    return rtn(w, bits, block, symmetric, mse_grid)
