"""Attention that exports as one ``com.microsoft::MultiHeadAttention`` node (ORT CPU kernel).

The dynamo export of timm's or BERT's attention is a chain of Reshape/Transpose/MatMul/Softmax
nodes; ORT runs it as separate kernels with layout copies between them, which is a quarter to a
third of an INT8 encoder's time once the weight matmuls are integer. ``fuse_attention`` swaps
each attention module's class (weights never move) for one that, under ``torch.onnx.export``,
emits ORT's fused ``MultiHeadAttention`` contrib op on the projected q, k, v (B, S, H*d) and, in
torch, computes the same float attention as before (outputs unchanged; tested). The q/k/v
projections stay ordinary Linear layers, so quantization wraps them as usual; the attention
products and softmax stay float, which is also what keeps BERT accurate (issue 3, item 7).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .mixin import mix_into


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                         scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over ``num_heads`` heads; q, k, v are (B, S, H*d).

    ``bias`` broadcasts against (B, H, S, S). Exports as ``com.microsoft::MultiHeadAttention``
    (whose ``attention_bias`` must then be (B or 1, 1, S, S)).
    """
    B, S, D = q.shape
    if _exporting():
        inputs = [q, k, v, None, None, bias]
        while inputs[-1] is None:
            inputs.pop()
        return torch.onnx.ops.symbolic(
            "com.microsoft::MultiHeadAttention", inputs,
            {"num_heads": num_heads, "scale": float(scale)}, dtype=q.dtype, shape=q.shape,
            version=1)
    d = D // num_heads

    def heads(t):
        return t.view(B, t.shape[1], num_heads, d).transpose(1, 2)

    scores = torch.matmul(heads(q) * scale, heads(k).transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(scores.softmax(-1), heads(v))
    return out.transpose(1, 2).reshape(B, S, D)


class FusedTimmAttention(nn.Module):
    """timm ``Attention`` (qkv Linear, no q/k norm, no mask) with fused export."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("fused attention does not take attention masks")
        D = self.attn_dim
        qkv = self.qkv(x)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        x = multi_head_attention(q, k, v, self.num_heads, self.scale)
        return self.proj_drop(self.proj(self.norm(x)))


class FusedBertSelfAttention(nn.Module):
    """BERT-style encoder self-attention with fused export (additive mask as attention bias)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, *args, **kwargs):
        if head_mask is not None:
            raise UnsupportedModelError("fused attention does not take a head mask")
        B, T, _ = hidden_states.shape
        bias = None
        if attention_mask is not None:
            # HF's extended additive mask is (B, 1, 1 or T, T); the ORT kernel wants (B, 1, T, T).
            bias = attention_mask.to(hidden_states.dtype).expand(B, 1, T, T)
        ctx = multi_head_attention(self.query(hidden_states), self.key(hidden_states),
                                   self.value(hidden_states), self.num_attention_heads,
                                   1.0 / math.sqrt(self.attention_head_size), bias)
        return ctx, None


def _original_class(m: nn.Module) -> type:
    from .attention import ExplicitBertSelfAttention, ExplicitTimmAttention

    cls = type(m)
    mixins = (ExplicitTimmAttention, ExplicitBertSelfAttention, FusedTimmAttention,
              FusedBertSelfAttention)
    while issubclass(cls, mixins) and cls not in mixins:
        cls = next(b for b in cls.__bases__ if b not in mixins)
    return cls


def _swap(m: nn.Module, mixin: type) -> None:
    mix_into(m, mixin, "Fused", base=_original_class(m))


def fuse_attention(model: nn.Module, required: bool = True) -> list[str]:
    """Swap every timm ``Attention`` / BERT-style self-attention for its fused-export form.

    Without ``required``, attention this cannot fuse (q/k norm, gates, relative positions) and
    models without any are left as they are (returns the names fused, possibly none).
    """
    from .attention import _is_bert_self_attention, _timm_attention_cls

    timm_attention = _timm_attention_cls()
    names = []
    for name, m in model.named_modules():
        base = _original_class(m)
        if issubclass(base, timm_attention):
            if not isinstance(getattr(m, "q_norm", None), nn.Identity) or \
                    getattr(m, "gate", None) is not None:
                if not required:
                    continue
                raise UnsupportedModelError(f"{name}: q/k norm or gated attention cannot be fused")
            _swap(m, FusedTimmAttention)
            names.append(name)
        elif _is_bert_self_attention(m):
            pos = getattr(m, "position_embedding_type", "absolute")
            if pos != "absolute" or getattr(m, "is_decoder", False):
                if not required:
                    continue
                raise UnsupportedModelError(
                    f"{name}: only encoder attention with absolute positions can be fused")
            _swap(m, FusedBertSelfAttention)
            names.append(name)
    if not names and required:
        raise UnsupportedModelError(
            "found no attention to fuse (timm Attention or BERT-style SelfAttention)")
    return names
