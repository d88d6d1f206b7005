"""Recipe sections other than ``passes``: model, data, evaluation, export.

Kept apart from recipe.py so that passes and loaders can import them without importing the
pass registry's union (which needs every pass imported first).

Every size or count has a bound that real models need and no more (a batch of 1e9 or a
100000x100000 image would only exhaust the worker), and nothing a recipe passes to a model
constructor can name a file or a URL: ``model.kwargs`` is an allow-list (TimmKwargs).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here on Python < 3.12

# Upper bounds of recipe sizes: what the largest real models in scope need, with headroom.
MAX_BATCH = 1024
MAX_BATCH_LIST = 16          # entries in a list of batch sizes
MAX_SAMPLES = 1_000_000
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 64
MAX_SEQ_LEN = 8192
MAX_CLASSES = 100_000
MAX_DEPTH = 256              # transformer blocks / encoder layers
MAX_HEADS = 256
MAX_WIDTH = 16_384           # embedding / hidden size
MAX_TOKENS = 16_384          # tokens per image or sentence
MAX_STEPS = 1_000_000
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1         # numpy's default_rng takes non-negative seeds
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 200

BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
ImageSide = Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]
Channels = Annotated[int, Field(ge=1, le=MAX_CHANNELS)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Depth = Annotated[int, Field(ge=1, le=MAX_DEPTH)]
Heads = Annotated[int, Field(ge=1, le=MAX_HEADS)]
LayerIndex = Annotated[int, Field(ge=0, lt=MAX_DEPTH)]
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
Rate = Annotated[float, Field(ge=0, le=1)]
MAX_SPEEDUP = 100
MAX_SIZE_MB = 1e6
Speedup = Annotated[float, Field(gt=0, le=MAX_SPEEDUP)]
PathStr = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]


class StrictModel(BaseModel):
    # NaN/Inf in a recipe is never meant: every float field refuses them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Task = Literal["image-classification", "text-embedding"]


@with_config(ConfigDict(extra="forbid", allow_inf_nan=False))
class TimmKwargs(TypedDict, total=False):
    """What a recipe may pass to ``timm.create_model``: architecture shape and head only.

    An allow-list on purpose: timm also takes ``checkpoint_path``, ``pretrained_cfg``,
    ``pretrained_cfg_overlay`` and ``cache_dir``, which open files or download, so they (and
    anything not listed here) are refused. Weights come from ``model.weights`` only.
    """

    num_classes: Annotated[int, Field(ge=0, le=MAX_CLASSES)]
    img_size: ImageSide | Annotated[list[ImageSide], Field(min_length=2, max_length=2)]
    in_chans: Channels
    patch_size: ImageSide | Annotated[list[ImageSide], Field(min_length=2, max_length=2)]
    embed_dim: Width | Annotated[list[Width], Field(min_length=1, max_length=16)]
    dims: Annotated[list[Width], Field(min_length=1, max_length=16)]
    depth: Depth
    depths: Annotated[list[Depth], Field(min_length=1, max_length=16)]
    num_heads: Heads | Annotated[list[Heads], Field(min_length=1, max_length=16)]
    mlp_ratio: Annotated[float, Field(gt=0, le=64)]
    window_size: ImageSide | Annotated[list[ImageSide], Field(min_length=2, max_length=2)]
    qkv_bias: bool
    qk_norm: bool
    class_token: bool
    no_embed_class: bool
    reg_tokens: Annotated[int, Field(ge=0, le=64)]
    global_pool: Literal["", "token", "avg", "max", "avgmax", "catavgmax", "map", "fast"]
    fc_norm: bool
    pre_norm: bool
    init_values: Annotated[float, Field(ge=0, le=1)]
    dynamic_img_size: bool
    dynamic_img_pad: bool
    drop_rate: Rate
    pos_drop_rate: Rate
    patch_drop_rate: Rate
    proj_drop_rate: Rate
    attn_drop_rate: Rate
    drop_path_rate: Rate
    output_stride: Literal[8, 16, 32]


TIMM_KWARGS = tuple(TimmKwargs.__annotations__)
TIMM_NAME = re.compile(r"[a-z0-9_]{1,100}(\.[a-z0-9_]{1,100})?")


def kwargs_not_allowed(keys: list[str], where: str = "model.kwargs") -> str:
    return (f"not allowed in {where}: a recipe may pass only architecture arguments to the "
            f"model constructor, never a path, URL or download option (weights come from "
            f"model.weights). Allowed: {', '.join(TIMM_KWARGS)}")


class PreprocessSpec(StrictModel):
    """Image preprocessing for image folders; defaults come from the timm model's config."""

    input_size: Annotated[list[ImageSide], Field(min_length=3, max_length=3)] | None = Field(
        None, description=f"[channels, height, width]; channels 1 to {MAX_CHANNELS}, sides 1 "
                          f"to {MAX_IMAGE_SIDE}")
    mean: Annotated[list[float], Field(min_length=1, max_length=MAX_CHANNELS)] | None = None
    std: Annotated[list[Annotated[float, Field(gt=0)]],
                   Field(min_length=1, max_length=MAX_CHANNELS)] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)

    @field_validator("input_size")
    @classmethod
    def _channels(cls, v):
        if v is not None and v[0] > MAX_CHANNELS:
            raise ValueError(f"input_size[0] is the channel count: 1 to {MAX_CHANNELS}, got "
                             f"{v[0]}")
        return v


VIM_NAMES = ("vim_tiny", "vim_small")


class VimSpec(StrictModel):
    """Vision Mamba sizes (source vim): each field given overrides ``model.name``'s config
    (vim_tiny: img_size 224, patch_size 16, in_chans 3, embed_dim 192, depth 24, d_state 16,
    d_conv 4, expand 2, dt_rank 12, num_classes 1000; vim_small: embed_dim 384, dt_rank 24).
    Without a name the base is vim_tiny's."""

    img_size: ImageSide | None = None
    patch_size: ImageSide | None = None
    in_chans: Channels | None = None
    embed_dim: Width | None = None
    depth: Depth | None = None
    d_state: int | None = Field(None, ge=1, le=256, description="SSM state size per channel")
    d_conv: int | None = Field(None, ge=1, le=64, description="causal depthwise conv width")
    expand: int | None = Field(None, ge=1, le=8, description="d_inner = expand * embed_dim")
    dt_rank: int | None = Field(None, ge=1, le=MAX_WIDTH,
                                description="default ceil(embed_dim / 16)")
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)
    scan: Literal["loop", "scan"] | None = Field(
        None, description="loop: a Python loop (unrolled in ONNX); scan: torch's scan operator, "
        "one ONNX Scan node (default loop)")

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ModelSpec(StrictModel):
    """Where the model comes from. Nothing is ever downloaded and no uploaded code runs."""

    source: Literal["timm", "hf", "onnx", "vim"] = Field(
        description="timm: architecture name + weights file; hf: a Hugging Face model folder; "
                    "onnx: an ONNX file (only ONNX-stage passes apply); vim: Vision Mamba "
                    "(hustvl/Vim layout) with name vim_tiny/vim_small and/or sizes in 'vim'")
    name: str | None = Field(
        None, description="timm architecture, e.g. deit_small_patch16_224 (no hub or folder "
                          "prefix); for source vim: vim_tiny or vim_small")
    vim: VimSpec | None = Field(
        None, description="source vim: sizes overriding the named config (custom sizes)")
    kwargs: TimmKwargs = Field(
        default_factory=dict, description="architecture arguments for timm.create_model "
        "(allow-list below; no paths, URLs or download options)")
    weights: PathStr | None = Field(
        None, description="timm or vim weights: .safetensors, or .pt/.pth read with "
                          "weights_only=True (optional for vim: seeded random weights without)")
    path: PathStr | None = Field(None, description="HF model folder or ONNX file")
    task: Task | None = Field(
        None, description="default: image-classification for timm, text-embedding for hf")
    pooling: Literal["mean", "cls"] = Field("mean", description="text-embedding pooling")
    normalize: bool = Field(True,
                            description="L2-normalize text embeddings (sentence-transformers)")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        # timm names are lowercase words with an optional .tag; this keeps out the 'hf-hub:'
        # and 'local-dir:' prefixes, which make timm download a config or read a folder.
        if v is not None and not TIMM_NAME.fullmatch(v):
            raise ValueError("a timm architecture name is lowercase letters, digits and '_' "
                             "with an optional '.tag' (e.g. deit_small_patch16_224); hub or "
                             "folder prefixes such as 'hf-hub:' or 'local-dir:' are not allowed")
        return v

    @field_validator("kwargs", mode="wrap")
    @classmethod
    def _allowed_kwargs(cls, value, handler):
        # Name every refused key at its own path (model.kwargs.checkpoint_path) with the list
        # of what is allowed; pydantic's own extra_forbidden says neither.
        if isinstance(value, dict):
            refused = [k for k in value if k not in TIMM_KWARGS]
            if refused:
                raise ValidationError.from_exception_data("kwargs", [InitErrorDetails(
                    type=PydanticCustomError("kwarg_not_allowed", "{why}",
                                             {"why": kwargs_not_allowed(refused)}),
                    loc=(str(k),), input=value[k]) for k in refused])
        return handler(value)

    @model_validator(mode="after")
    def _check_source_fields(self):
        if self.vim is not None and self.source != "vim":
            raise ValueError("'vim' (Vision Mamba sizes) is for source 'vim'")
        if self.source == "vim":
            if self.name is not None and self.name not in VIM_NAMES:
                raise ValueError(f"source 'vim' takes name {' or '.join(VIM_NAMES)} (or no name "
                                 f"and the sizes in 'vim'), got {self.name!r}")
            if self.name is None and self.vim is None:
                raise ValueError("source 'vim' needs 'name' (vim_tiny or vim_small) or the "
                                 "sizes in 'vim'")
            if self.path or self.kwargs:
                raise ValueError("source 'vim' takes 'name', 'vim' and 'weights'; 'path' and "
                                 "'kwargs' are for other sources")
        elif self.source == "timm":
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
    def file_field(self) -> str:
        """The field that names the model's file: ``weights`` for timm, ``path`` otherwise."""
        return "weights" if self.source in ("timm", "vim") else "path"

    @property
    def file_value(self) -> str | None:
        return getattr(self, self.file_field)

    @property
    def resolved_task(self) -> Task:
        if self.task:
            return self.task
        return "text-embedding" if self.source == "hf" else "image-classification"



class DataSpec(StrictModel):
    path: PathStr | None = Field(None, description="image folder, .npz/.npy, .txt or .jsonl "
                                                   "(the CLI's --calib/--eval override it)")
    format: Literal["auto", "imagefolder", "npz", "npy", "text", "jsonl"] = "auto"
    num_samples: int = Field(256, ge=1, le=MAX_SAMPLES)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the deterministic subset")
    max_length: int = Field(128, ge=8, le=MAX_SEQ_LEN, description="token limit for text")
    text_field: str = Field("text", min_length=1, max_length=MAX_NAME_CHARS,
                            description="JSONL field holding the sentence")
    input_key: str | None = Field(
        None, min_length=1, max_length=MAX_NAME_CHARS, description="npz array holding inputs "
        "(default: the first of x, inputs, images, pixel_values)")
    label_key: str = Field("labels", min_length=1, max_length=MAX_NAME_CHARS,
                           description="npz array holding integer labels")


class CalibrationSpec(DataSpec):
    pass


class GateSpec(StrictModel):
    """Quality gate on the exported model; every limit given must hold."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, le=100,
        description="top-1 points (0-100) the compressed model may lose; needs labels")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_kl: float | None = Field(None, ge=0)
    max_logits_rel_error: float | None = Field(
        None, ge=0, description="||compressed - original|| / ||original|| over all logits")
    min_cosine: float | None = Field(None, ge=-1, le=1, description=(
        "mean cosine to the original: embeddings, or token maps (per token, mean per sample)"))
    min_sample_cosine: float | None = Field(None, ge=-1, le=1, description=(
        "worst sample's cosine to the original (embeddings; token maps: its mean over tokens)"))
    min_retrieval_overlap: float | None = Field(None, ge=0, le=1)
    min_speedup: Speedup | dict[BatchSize, Speedup] | None = Field(None, description=(
        "fp32 ONNX latency / compressed ONNX latency that must be reached: one number for every "
        "batch size in evaluation.latency.batch_sizes, or a mapping batch size -> number. 1.0 "
        "fails a compressed model that is slower than fp32 at any batch size; needs latency "
        f"measured (evaluation.latency.enabled). Each value in (0, {MAX_SPEEDUP:g}]"))
    max_size_mb: float | None = Field(None, gt=0, le=MAX_SIZE_MB, description=(
        "largest compressed model (ONNX file plus external data) in MB (10^6 bytes)"))


BatchSizes = Annotated[list[BatchSize], Field(min_length=1, max_length=MAX_BATCH_LIST)]


class LatencySpec(StrictModel):
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 8])
    repeats: int = Field(20, ge=1, le=10_000)
    warmup: int = Field(3, ge=0, le=1000)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS,
                                description="ORT intra-op threads (default: all cores)")
    seq_len: int = Field(128, ge=1, le=MAX_SEQ_LEN, description="token count for text models")
    enabled: bool = True


class EvaluationSpec(DataSpec):
    num_samples: int = Field(512, ge=1, le=MAX_SAMPLES)
    gate: GateSpec = Field(default_factory=GateSpec)
    retrieval_k: int = Field(10, ge=1, le=1000)
    latency: LatencySpec = Field(default_factory=LatencySpec)

    @model_validator(mode="after")
    def _speed_gate_needs_latency(self):
        wanted = self.gate.min_speedup
        if wanted is None:
            return self
        if not self.latency.enabled:
            raise ValueError("gate.min_speedup needs latency measured, but latency.enabled is "
                             "false; enable evaluation.latency or remove "
                             "evaluation.gate.min_speedup")
        if isinstance(wanted, dict):
            unmeasured = sorted(set(wanted) - set(self.latency.batch_sizes))
            if unmeasured:
                raise ValueError(
                    f"gate.min_speedup names batch size(s) {unmeasured} that are not measured; "
                    f"evaluation.latency.batch_sizes is {self.latency.batch_sizes}: add them "
                    "there or remove them from evaluation.gate.min_speedup")
        return self


class ExportSpec(StrictModel):
    opset: int = Field(21, ge=17, le=25)
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: weights in a side file when the model is over 1 GiB")
    verify_batch_sizes: BatchSizes = Field(
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
    int8_embeddings: bool = Field(
        False, description="with ort_cpu_kernels: lookup tables of 65536+ values read by a "
        "Gather (word and position embeddings) are stored as int8 with one scale per row and "
        "only the gathered rows are dequantized (com.microsoft::GatherBlockQuantized); "
        "all-MiniLM-L6-v2 fast INT8 58.6 -> 23.0 MB, cosine to fp32 0.99728 -> 0.99723")
    parity_min_cosine: float = Field(
        0.99, ge=0, le=1, description="ORT vs torch agreement below which export fails")

    @model_validator(mode="after")
    def _int8_embeddings_need_lowering(self):
        if self.int8_embeddings and not self.ort_cpu_kernels:
            raise ValueError("export.int8_embeddings is applied by the ORT CPU lowering; set "
                             "export.ort_cpu_kernels: true or remove export.int8_embeddings")
        return self
