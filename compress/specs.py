"""Recipe sections other than ``passes``: model, data, evaluation, export.

Kept apart from recipe.py so that passes and loaders can import them without importing the
pass registry's union (which needs every pass imported first).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


Task = Literal["image-classification", "text-embedding"]
KwargValue = Union[bool, int, float, str, list[int], list[float]]


class PreprocessSpec(StrictModel):
    """Image preprocessing for image folders; defaults come from the timm model's config."""

    input_size: list[int] | None = Field(None, description="[channels, height, width]")
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)


class ModelSpec(StrictModel):
    """Where the model comes from. Nothing is ever downloaded and no uploaded code runs."""

    source: Literal["timm", "hf", "onnx"] = Field(
        description="timm: architecture name + weights file; hf: a Hugging Face model folder; "
                    "onnx: an ONNX file (only ONNX-stage passes apply)")
    name: str | None = Field(None, description="timm architecture, e.g. deit_small_patch16_224")
    kwargs: dict[str, KwargValue] = Field(
        default_factory=dict, description="extra keyword arguments for timm.create_model")
    weights: str | None = Field(
        None, description="timm weights: .safetensors, or .pt/.pth read with weights_only=True")
    path: str | None = Field(None, description="HF model folder or ONNX file")
    task: Task | None = Field(
        None, description="default: image-classification for timm, text-embedding for hf")
    pooling: Literal["mean", "cls"] = Field("mean", description="text-embedding pooling")
    normalize: bool = Field(True, description="L2-normalize text embeddings (sentence-transformers)")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)

    @model_validator(mode="after")
    def _check_source_fields(self):
        if self.source == "timm":
            if not self.name:
                raise ValueError("source 'timm' needs 'name' (a timm architecture such as "
                                 "deit_small_patch16_224)")
            if self.path:
                raise ValueError("source 'timm' takes 'weights', not 'path'")
        else:
            if not self.path:
                raise ValueError(f"source {self.source!r} needs 'path' (the "
                                 f"{'model folder' if self.source == 'hf' else 'ONNX file'})")
            if self.weights or self.kwargs or self.name:
                raise ValueError(f"'name', 'kwargs' and 'weights' are for source 'timm'; source "
                                 f"{self.source!r} reads everything from 'path'")
        return self

    @property
    def resolved_task(self) -> Task:
        if self.task:
            return self.task
        return "text-embedding" if self.source == "hf" else "image-classification"


class DataSpec(StrictModel):
    path: str | None = Field(None, description="image folder, .npz/.npy, .txt or .jsonl "
                                               "(the CLI's --calib/--eval override it)")
    format: Literal["auto", "imagefolder", "npz", "npy", "text", "jsonl"] = "auto"
    num_samples: int = Field(256, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=4096)
    seed: int = Field(0, description="seed of the deterministic subset")
    max_length: int = Field(128, ge=8, le=8192, description="token limit for text")
    text_field: str = Field("text", description="JSONL field holding the sentence")
    input_key: str | None = Field(None, description="npz array holding inputs (default: the "
                                                    "first of x, inputs, images, pixel_values)")
    label_key: str = Field("labels", description="npz array holding integer labels")


class CalibrationSpec(DataSpec):
    pass


class GateSpec(StrictModel):
    """Quality gate on the exported model; every limit given must hold."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, description="top-1 points (0-100) the compressed model may lose; needs labels")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_kl: float | None = Field(None, ge=0)
    max_logits_rel_error: float | None = Field(
        None, ge=0, description="||compressed - original|| / ||original|| over all logits")
    min_cosine: float | None = Field(None, ge=-1, le=1, description=(
        "mean cosine to the original: embeddings, or token maps (per token, mean per sample)"))
    min_sample_cosine: float | None = Field(None, ge=-1, le=1, description=(
        "worst sample's cosine to the original (embeddings; token maps: its mean over tokens)"))
    min_retrieval_overlap: float | None = Field(None, ge=0, le=1)


class LatencySpec(StrictModel):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8])
    repeats: int = Field(20, ge=1, le=10_000)
    warmup: int = Field(3, ge=0, le=1000)
    threads: int | None = Field(None, ge=1, description="ORT intra-op threads (default: all cores)")
    seq_len: int = Field(128, ge=1, description="token count for text models")
    enabled: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v):
        if not v or any(b < 1 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of positive integers")
        return v


class EvaluationSpec(DataSpec):
    num_samples: int = Field(512, ge=1, le=1_000_000)
    gate: GateSpec = Field(default_factory=GateSpec)
    retrieval_k: int = Field(10, ge=1, le=1000)
    latency: LatencySpec = Field(default_factory=LatencySpec)


class ExportSpec(StrictModel):
    opset: int = Field(21, ge=17, le=25)
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: weights in a side file when the model is over 1 GiB")
    verify_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 3],
        description="batch sizes at which ORT output is checked against torch")
    keep_fp32: bool = Field(True, description="keep model.fp32.onnx beside the compressed model")
    ort_cpu_kernels: bool = Field(
        False, description="after export, write ONNX Runtime's CPU integer kernels directly: "
        "each Q/DQ MatMul ORT would run as MatMulIntegerToFloat gets its bias folded in, and "
        "each layer's q/k/v projections + fused attention become one QAttention (one int8 GEMM, "
        "no split), and residual adds before a LayerNorm are written as Sum, which keeps ORT's "
        "slower SkipLayerNormalization kernel out. Same arithmetic as ORT's own Q/DQ fusion, "
        "fewer passes over the activations; "
        "the file then runs in ONNX Runtime only")
    parity_min_cosine: float = Field(
        0.99, ge=0, le=1, description="ORT vs torch agreement below which export fails")
