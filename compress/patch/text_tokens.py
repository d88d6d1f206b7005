"""Attention-based token pruning inside BERT-family sentence encoders (``SentenceEmbedder``).

``patch_text(embedder, plan, sep_id)`` swaps the embedder's class for one that runs the encoder
layers itself. At the layers named in ``plan`` (``{layer: keep_rate}``) the tokens are ranked,
between the layer's attention and its feed-forward, by the attention they receive from the
real (unpadded) queries; [CLS] (position 0) is never dropped, [SEP] tokens rank first and
padding last. ``keep_rate`` applies to the padded length with integer ops, so the exported
graph computes the keep count from its sequence dimension. Dropped real tokens are fused into
one token (their attention-weighted average) whose weight is their count, so mean pooling
still averages over every original token: ``sum(size_i * h_i) / sum(size_i)``. Padding has size
0, which is also its attention mask (log size = -inf, clamped).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.handle import SentenceEmbedder
from ..tokens.prune import keep_count, received_attention, topk_keep
from .attention import make_attention_explicit
from .mixin import mix_into

MASK_VALUE = -1e4  # additive mask for padding (finite: stays finite through QDQ and ORT)


def _encoder_parts(transformer: nn.Module):
    emb = getattr(transformer, "embeddings", None)
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if emb is None or layers is None or not all(
            hasattr(layer, "attention") and hasattr(layer, "feed_forward_chunk")
            for layer in layers):
        raise UnsupportedModelError(
            f"text token pruning supports BERT-family encoders (embeddings, encoder.layer[i] "
            f"with attention and feed_forward_chunk), not {type(transformer).__name__}")
    return emb, layers


class TokenPrunedEmbedder(nn.Module):
    """Mixin for SentenceEmbedder: encoder layers with token pruning, size-weighted pooling."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        info = self._token_pruning
        emb, layers = _encoder_parts(self.transformer)
        h = emb(input_ids=input_ids)
        size = attention_mask.to(h.dtype)[..., None]                 # [B, T, 1]
        special = (input_ids == info["sep_id"]).to(h.dtype)[..., None]
        record = info.get("record")
        for i, layer in enumerate(layers):
            attn = layer.attention.self
            rate = info["plan"].get(i)
            valid = size[..., 0] > 0
            bias = (1.0 - valid.to(h.dtype))[:, None, None, :] * MASK_VALUE
            if info["prop_attn"]:
                bias = bias + size.clamp_min(1.0).log()[:, None, None, :, 0]
            attn.probe.keep = rate is not None
            a = layer.attention(h, attention_mask=bias)[0]
            if rate is not None:
                scores = received_attention(attn.probe.last, valid)[:, 1:]
                scores = torch.where(valid[:, 1:], scores + 2.0 * special[:, 1:, 0], -1.0)
                k = keep_count(a.shape[1] - 1, rate)
                a, size, idx, special = topk_keep(a, scores, k, 1, size, info["fuse"],
                                                  extra=[special])
                if record is not None:
                    record.append((i, idx.detach(), size.detach()))
            attn.probe.last = None
            h = layer.feed_forward_chunk(a)
        self._last_sizes = size
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            pooled = (h * size).sum(1) / size.sum(1).clamp_min(1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def patch_text(embedder: nn.Module, plan: dict[int, float], sep_id: int, fuse: bool = True,
               prop_attn: bool = True) -> None:
    """Prune tokens at ``plan``'s layers (``{layer index: keep rate}``) of a SentenceEmbedder."""
    if not isinstance(embedder, SentenceEmbedder):
        raise UnsupportedModelError("text token pruning needs a sentence-embedding model")
    _, layers = _encoder_parts(embedder.transformer)
    bad = [i for i in plan if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layers {bad} not in 0..{len(layers) - 1}")
    make_attention_explicit(embedder)
    mix_into(embedder, TokenPrunedEmbedder, "TokenPruned")
    embedder._token_pruning = {"plan": dict(plan), "sep_id": int(sep_id), "fuse": fuse,
                               "prop_attn": prop_attn}
