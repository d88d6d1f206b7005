"""Explicit attention for timm ViTs and BERT-family encoders.

timm's ``Attention`` calls SDPA and BERT's eager attention calls ``torch.matmul`` inline, so no
pass can reach the two attention products or the softmax. ``make_attention_explicit`` swaps each
attention module's class (weights never move, as in ToMe) for one that routes
``q @ k^T``, the softmax and ``probs @ v`` through submodules ``matmul_qk``, ``softmax`` and
``matmul_av``. Quantization replaces the matmuls with quantized ones, binarization replaces the
softmax, token pruning reads the attention probabilities. Outputs are unchanged (tested).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..quant.modules import MatMul
from .mixin import mix_into


class AttentionProbe(nn.Module):
    """Identity on the attention probabilities; keeps the last ones when ``keep`` is set."""

    def __init__(self):
        super().__init__()
        self.keep = False
        self.last: torch.Tensor | None = None

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if self.keep:
            self.last = probs
        return probs


def _add_submodules(module: nn.Module) -> None:
    if not hasattr(module, "matmul_qk"):
        module.matmul_qk = MatMul()
        module.matmul_av = MatMul()
        module.softmax = nn.Softmax(dim=-1)
        module.probe = AttentionProbe()


# --------------------------------------------------------------------------- timm


def _timm_attention_cls():
    from timm.layers.attention import Attention

    return Attention


class ExplicitTimmAttention(nn.Module):
    """timm ``Attention`` with submodule matmuls and softmax (class swapped in place).

    Note: follows timm.layers.attention.Attention.forward (timm 1.0.x, unfused branch) with the
    products and softmax routed through modules; ``attn_bias`` lets token-merging passes add
    ToMe's proportional-attention term log(size).
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        self._last_keys = k  # read by token-merging passes (ToMe's metric)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
        attn = maybe_add_mask(attn, attn_bias)
        extra = getattr(self, "attn_bias", None)
        if extra is not None:
            attn = attn + extra
        attn = self.probe(self.softmax(attn))
        attn = self.attn_drop(attn)
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


# --------------------------------------------------------------------------- BERT family


def _is_bert_self_attention(m: nn.Module) -> bool:
    # ``dropout``: the forward below uses it; HF ViT/DeiT's ViTSelfAttention has no such module
    return (type(m).__name__.endswith("SelfAttention") and all(
        hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads", "dropout")))


class ExplicitBertSelfAttention(nn.Module):
    """BERT-style self-attention (encoder only, absolute positions) with submodule products.

    Note: follows transformers' BertSelfAttention eager forward (4.5x) without caches,
    cross-attention or relative position scores, which encoders used here do not have.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, *args, **kwargs):
        B, T, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size

        def heads(t):
            return t.view(B, T, h, d).transpose(1, 2)

        q = heads(self.query(hidden_states))
        k = heads(self.key(hidden_states))
        v = heads(self.value(hidden_states))
        self._last_keys = k
        scores = self.matmul_qk(q, k.transpose(-1, -2)) / math.sqrt(d)
        if attention_mask is not None:
            scores = scores + attention_mask
        extra = getattr(self, "attn_bias", None)
        if extra is not None:
            scores = scores + extra
        probs = self.probe(self.softmax(scores))
        probs = self.dropout(probs)
        if head_mask is not None:
            probs = probs * head_mask
        ctx = self.matmul_av(probs, v)
        ctx = ctx.permute(0, 2, 1, 3).reshape(B, T, h * d)
        return ctx, probs


def _swap_class(module: nn.Module, mixin: type) -> None:
    if mix_into(module, mixin, "Explicit"):
        _add_submodules(module)


def make_attention_explicit(model: nn.Module, required: bool = True) -> list[str]:
    """Swap every supported attention module for its explicit form; returns their names.

    Raises UnsupportedModelError when the model has attention this cannot handle, or, with
    ``required``, none at all (passes for which explicit attention is optional, such as
    quantization, pass ``required=False`` and get an empty list).
    """
    timm_attention = _timm_attention_cls()
    names = []
    for name, m in model.named_modules():
        if type(m) is timm_attention or isinstance(m, ExplicitTimmAttention):
            _swap_class(m, ExplicitTimmAttention)
            names.append(name)
        elif _is_bert_self_attention(m):
            pos = getattr(m, "position_embedding_type", "absolute")
            if pos != "absolute" or getattr(m, "is_decoder", False):
                if not required:
                    continue
                raise UnsupportedModelError(
                    f"{name}: attention with position_embedding_type={pos!r} or decoder caches "
                    "is not supported; only encoder attention with absolute positions is")
            _swap_class(m, ExplicitBertSelfAttention)
            names.append(name)
    if not names and required:
        raise UnsupportedModelError(
            "found no supported attention module (timm Attention or BERT-style SelfAttention); "
            "attention passes work on timm ViT/DeiT and BERT-family encoders")
    return names


def explicit_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (ExplicitTimmAttention, ExplicitBertSelfAttention))}


@torch.no_grad()
def route_qkv_bias(model: nn.Module) -> list[str]:
    """Make fused q/k/v projections that bypass their Linear's forward call it instead.

    BEiT/EVA-style attention keeps separate ``q_bias``/``v_bias`` parameters (no key bias) and
    computes ``F.linear(x, self.qkv.weight, cat(q_bias, 0, v_bias))``, so a quantized module
    put at ``qkv`` never runs and the projection stays float. Moving the concatenated bias into
    ``qkv.bias`` (and clearing ``q_bias``, which sends the forward through ``self.qkv(x)``)
    computes the same thing. Returns the attention modules changed.
    """
    names = []
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        q_bias, v_bias = getattr(m, "q_bias", None), getattr(m, "v_bias", None)
        if not isinstance(qkv, nn.Linear) or qkv.bias is not None or \
                not isinstance(q_bias, torch.Tensor) or not isinstance(v_bias, torch.Tensor):
            continue
        k_bias = getattr(m, "k_bias", None)
        if not isinstance(k_bias, torch.Tensor):
            k_bias = torch.zeros_like(q_bias)
        bias = torch.cat((q_bias, k_bias, v_bias))
        if bias.shape[0] != qkv.out_features:
            continue
        qkv.bias = nn.Parameter(bias.detach().clone())
        m.q_bias = None
        if "k_bias" in m._buffers:
            m.k_bias = None
        m.v_bias = None
        names.append(name)
    return names
