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
                dict(K=self.in_features, N=self.out_features, bits=self.container,
                     block_size=self.block, accuracy_level=self.accuracy_level),
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
                dict(gather_axis=0, quantize_axis=1, block_size=self.block, bits=self.container),
                dtype=torch.float32, shape=[*ids.shape, self.embedding_dim], version=1)
        return F.embedding(ids, self.dequantized_weight())

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"block={self.block}")
