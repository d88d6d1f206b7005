"""ModelHandle: a loaded model plus what the pipeline needs to feed, export and evaluate it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE_INPUT = "pixel_values"
TEXT_INPUTS = ("input_ids", "attention_mask")


class SentenceEmbedder(nn.Module):
    """A Hugging Face encoder plus pooling: what sentence-transformers computes, as one module.

    Input ``input_ids`` and ``attention_mask`` ([batch, tokens]); output [batch, hidden] embeddings,
    mean-pooled over unmasked tokens (or the [CLS] token) and L2-normalized when ``normalize``.
    """

    def __init__(self, transformer: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize

    def token_embeddings(self, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embeddings(input_ids, attention_mask)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


class HFImageClassifier(nn.Module):
    """A transformers image classifier as ``pixel_values -> logits`` (one tensor out, as the
    exporter and the metrics expect). ``hf_model`` is the wrapped transformers model."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf_model(pixel_values=pixel_values).logits


@dataclass
class ModelHandle:
    """A loaded model. ``module`` is the torch model (None for ONNX sources)."""

    task: str                           # "image-classification" | "text-embedding"
    source: str                         # "timm" | "hf" | "onnx"
    name: str
    module: nn.Module | None = None
    onnx_path: Path | None = None
    tokenizer: Any = None
    data_config: dict | None = None     # image preprocessing: input_size, mean, std, ...
    max_positions: int = 512            # text models: longest sequence the model accepts
    # Image models whose output is the token map [batch, tokens, channels] (dense features, e.g.
    # a timm ViT with num_classes=0, global_pool=''), not logits.
    token_map: bool = False
    # Passes record what they did to the module here (ToMe-style shared state).
    info: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [IMAGE_INPUT] if self.task == "image-classification" else list(TEXT_INPUTS)

    @property
    def output_name(self) -> str:
        if self.task != "image-classification":
            return "sentence_embedding"
        return "token_map" if self.token_map else "logits"

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.data_config["input_size"]) if self.data_config else ()

    def param_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) if self.module is not None else 0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the torch module on a batch dict (keys as in ``input_names``)."""
        if self.task == "image-classification":
            return self.module(batch[IMAGE_INPUT])
        return self.module(batch["input_ids"], batch["attention_mask"])

    def example_inputs(self, batch_size: int = 2, seq_len: int = 16) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        if self.task == "image-classification":
            return {IMAGE_INPUT: torch.randn(batch_size, *self.input_size, generator=g)}
        vocab = getattr(self.tokenizer, "vocab_size", 1000) if self.tokenizer else 1000
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch_size, seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def to(self, device: torch.device | str) -> ModelHandle:
        if self.module is not None:
            self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        if self.module is None:
            return torch.device("cpu")
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
