"""What kind of model a pass is looking at: one check shared by every pass.

``model_kind(model)`` sorts a ModelHandle (or a bare module) into one of

    plain_vit     a flat token sequence through ``blocks`` (timm ViT/DeiT/DeiT3/EVA-02/BEiT,
                  Hugging Face ViT/DeiT/BEiT): class, distillation and register tokens,
                  LayerScale, RoPE, relative position bias are features of this kind
    windowed_vit  attention over a hierarchical or windowed token grid (Swin, PVT, Twins,
                  MViT, PiT, CrossViT): the token count per stage is fixed by the layout
    hybrid        attention and convolutions mixed inside the stages (LeViT, MobileViT,
                  EfficientFormer, CoaT, MaxViT, FastViT)
    cnn           convolutions only (ResNet, ConvNeXt, EfficientNet, MobileNet, RegNet, ...)
    mlp           token-mixing MLPs without attention (MLP-Mixer, ResMLP, gMLP)
    text_encoder  a BERT-family encoder (``SentenceEmbedder`` or a transformers model)
    vim           Vision Mamba (compress.models.vim): bidirectional state-space scans over
                  patch tokens with a middle class token; ToP-ViM (top_vim) prunes its tokens
    onnx          an ONNX graph from elsewhere: only graph-level passes apply

and ``require(kind, pass_name, supported)`` raises ``UnsupportedModelError`` (exit 2) naming the
kinds the pass supports, what this model is, and the passes that do apply to it. Known timm and
transformers classes are named in tables; anything else is sorted by its structure (attention
modules, convolutions, a flat ``blocks`` list), so a model nobody listed still gets a kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError

KINDS = ("plain_vit", "windowed_vit", "hybrid", "cnn", "mlp", "text_encoder", "vim", "onnx")

KIND_TEXT = {
    "plain_vit": "plain-token ViTs (a flat token sequence through `blocks`: ViT, DeiT, "
                 "DeiT3, EVA-02, ViT with registers)",
    "windowed_vit": "windowed or hierarchical vision transformers (Swin, PVT, Twins, MViT, PiT)",
    "hybrid": "conv-attention hybrids (LeViT, MobileViT, EfficientFormer, CoaT)",
    "cnn": "convolutional networks (ResNet, ConvNeXt, EfficientNet, MobileNet, RegNet)",
    "mlp": "MLP and recurrent token mixers (MLP-Mixer, ResMLP, gMLP, Sequencer)",
    "text_encoder": "BERT-family text encoders",
    "vim": "Vision Mamba (bidirectional state-space models over patch tokens)",
    "onnx": "ONNX graphs",
}

# Which bundled passes apply to which kinds: the alternatives a refusal lists. Quantization works
# on the traced graph or module structure of every kind; token passes need a flat token sequence.
PASS_KINDS: dict[str, tuple[str, ...]] = {
    "quantize": KINDS[:-1],
    "smooth_quant": KINDS[:-1],
    "weight_only": KINDS[:-1],
    "mixed_precision": KINDS[:-1],
    "ort_quantize": KINDS,
    # binarize: Linear layers (convolutions stay float, so a CNN has nothing to binarize)
    "binarize": ("plain_vit", "windowed_vit", "hybrid", "mlp", "text_encoder"),
    "tome": ("plain_vit",),
    "evit": ("plain_vit",),
    "expedit": ("plain_vit",),
    "ia_red": ("plain_vit",),
    "text_token_prune": ("text_encoder",),
    "top_vim": ("vim",),
}

# timm classes by kind (a class not listed is sorted by structure).
TIMM_WINDOWED = {
    "SwinTransformer", "SwinTransformerV2", "SwinTransformerV2Cr", "PyramidVisionTransformerV2",
    "Twins", "MultiScaleVit", "Hiera", "HieraDet", "DaVit", "Nest", "PoolingVisionTransformer",
    "CrossVit", "Visformer", "VisionTransformerSAM",
}
TIMM_HYBRID = {
    "Levit", "LevitDistilled", "MobileVit", "EfficientFormer", "EfficientFormerV2", "CoaT",
    "MaxxVit", "FastVit", "EdgeNeXt", "GlobalContextVit", "TinyVit", "EfficientVit",
    "EfficientVitLarge", "EfficientVitMsra", "NextViT", "RepVit", "Xcit", "TNT", "VOLO",
    "ConVit", "Cait", "SHViT", "SwiftFormer", "LowFormer", "CSATv2", "IFormer", "EfficientViM",
}
TIMM_PLAIN = {"VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit",
              "VisionTransformerRelPos", "Deit"}
TIMM_MLP = {"MlpMixer", "Sequencer2d"}

# transformers config model_type by kind.
HF_IMAGE_KINDS = {
    "vit": "plain_vit", "deit": "plain_vit", "beit": "plain_vit", "dinov2": "plain_vit",
    "data2vec-vision": "plain_vit", "swin": "windowed_vit", "swinv2": "windowed_vit",
    "convnext": "cnn", "convnextv2": "cnn", "resnet": "cnn", "regnet": "cnn",
    "mobilevit": "hybrid", "levit": "hybrid", "efficientformer": "hybrid",
}

# Token-reduction runners in compress.patch.vit_tokens, by the timm class they drive.
TOKEN_RUNNERS = {"VisionTransformer": "timm_vit", "VisionTransformerDistilled": "timm_vit",
                 "Eva": "timm_eva"}


@dataclass(frozen=True)
class ModelKind:
    """What a model is, for deciding which passes apply.

    ``prefix_tokens``: class + distillation + register tokens (plain ViTs); ``depth``: blocks or
    encoder layers; ``features``: what a pass may need to know (``class_token``, ``dist_token``,
    ``reg_tokens``, ``layer_scale``, ``rope``, ``swiglu``, ``rel_pos_bias``, ``avg_pool``, ...);
    ``token_runner``: the token-reduction forward that drives this class (``timm_vit``,
    ``timm_eva``), None where token reduction cannot run; ``why``: one sentence for messages.
    """

    kind: str
    arch: str
    source: str = "torch"
    prefix_tokens: int = 0
    depth: int = 0
    features: tuple[str, ...] = field(default_factory=tuple)
    token_runner: str | None = None
    why: str = ""
    # What keeps a plain ViT from a token-reduction runner (e.g. "rel_pos_bias", "max_pool").
    blockers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return f"{self.arch} ({self.kind}: {self.why})" if self.why else \
            f"{self.arch} ({self.kind})"


def model_kind(model) -> ModelKind:
    """The kind of a ModelHandle, a SentenceEmbedder, a timm or transformers module."""
    from .handle import ModelHandle, SentenceEmbedder

    if isinstance(model, ModelHandle):
        if model.module is None:
            return ModelKind("onnx", model.name, source="onnx",
                             why="an ONNX graph; torch passes need the timm or Hugging Face model")
        if model.task == "text-embedding":
            return _text_kind(getattr(model.module, "transformer", model.module))
        model = model.module
    if isinstance(model, SentenceEmbedder):
        return _text_kind(model.transformer)
    from .vim import VisionMamba

    if isinstance(model, VisionMamba):
        return _vim_kind(model)
    inner = getattr(model, "hf_model", None)   # HF image classifier wrapper (loaders)
    if inner is not None:
        return _hf_kind(inner)
    if type(model).__module__.startswith("transformers."):
        return _hf_kind(model)
    return _timm_kind(model)


def _vim_kind(model: nn.Module) -> ModelKind:
    depth = len(model.layers)
    return ModelKind("vim", type(model).__name__, source="vim", prefix_tokens=1, depth=depth,
                     features=("class_token", "middle_class_token", "bidirectional_ssm"),
                     why=f"bidirectional state-space scans over patch tokens through {depth} "
                     "layers, class token in the middle; attention-based token passes do not "
                     "apply")


def _text_kind(transformer: nn.Module) -> ModelKind:
    cfg = getattr(transformer, "config", None)
    mtype = getattr(cfg, "model_type", type(transformer).__name__)
    depth = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layers", 0) or 0)
    return ModelKind("text_encoder", type(transformer).__name__, source="hf", depth=depth,
                     features=(mtype,), why=f"a {mtype} text encoder")


def _hf_kind(model: nn.Module) -> ModelKind:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", "")
    arch = type(model).__name__
    kind = HF_IMAGE_KINDS.get(mtype)
    if kind is None:
        if hasattr(cfg, "vocab_size"):
            return _text_kind(model)
        kind = _structural_kind(model)[0]
    depth = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    why = {"plain_vit": "a Hugging Face ViT-family image model (flat token sequence)",
           "windowed_vit": "a Hugging Face windowed-attention image model",
           }.get(kind, f"a Hugging Face {mtype or arch} image model")
    return ModelKind(kind, arch, source="hf", depth=depth, prefix_tokens=1 if
                     kind == "plain_vit" else 0, features=(mtype,), why=why)


def _timm_kind(model: nn.Module) -> ModelKind:
    arch = type(model).__name__
    # A patched model's class is a mixin subclass: look through to the timm class.
    for cls in type(model).__mro__:
        if cls.__module__.startswith("timm."):
            arch = cls.__name__
            break
    if arch in TIMM_PLAIN or (arch not in TIMM_WINDOWED | TIMM_HYBRID | TIMM_MLP and
                              _looks_plain(model)):
        return _plain_vit_kind(model, arch)
    if arch in TIMM_WINDOWED:
        return ModelKind("windowed_vit", arch, why="attention over windowed or hierarchical "
                         "token grids; the token count per stage is fixed by the layout")
    if arch in TIMM_HYBRID:
        return ModelKind("hybrid", arch, why="convolutions and attention mixed inside the "
                         "stages; tokens live on a spatial grid")
    if arch in TIMM_MLP:
        return ModelKind("mlp", arch, why="token-mixing MLPs with a fixed token count")
    kind, why = _structural_kind(model)
    return ModelKind(kind, arch, why=why)


def _looks_plain(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        return False
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        return False
    return all(hasattr(b, "attn") and not any(isinstance(m, nn.Conv2d) for m in b.modules())
               for b in blocks)


def _plain_vit_kind(model: nn.Module, arch: str) -> ModelKind:
    blocks = getattr(model, "blocks", [])
    depth = len(blocks)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    feats = []
    if getattr(model, "cls_token", None) is not None:
        feats.append("class_token")
    if getattr(model, "dist_token", None) is not None:
        feats.append("dist_token")
    if int(getattr(model, "num_reg_tokens", 0) or 0) > 0 or \
            getattr(model, "reg_token", None) is not None:
        feats.append("reg_tokens")
    b0 = blocks[0] if depth else None
    if b0 is not None:
        if any(type(m).__name__ == "LayerScale" for m in b0.modules()) or \
                getattr(b0, "gamma_1", None) is not None:
            feats.append("layer_scale")
        if any("SwiGLU" in type(m).__name__ or "GluMlp" in type(m).__name__
               for m in b0.modules()):
            feats.append("swiglu")
        if any(hasattr(m, "relative_position_bias_table") for m in b0.modules()) or \
                getattr(model, "rel_pos_bias", None) is not None:
            feats.append("rel_pos_bias")
    if getattr(model, "rope", None) is not None:
        feats.append("rope")
        if getattr(model, "rope_mixed", False):
            feats.append("rope_mixed")
    pool = getattr(model, "global_pool", None)
    if pool:
        feats.append(f"{pool}_pool")
    if getattr(model, "attn_pool", None) is not None:
        feats.append("attn_pool")
    runner = TOKEN_RUNNERS.get(arch)
    blockers = [f for f in feats if f in ("rel_pos_bias", "rope_mixed", "attn_pool")]
    if pool not in ("token", "avg", "", None):
        blockers.append(f"global_pool {pool!r}")
    if runner == "timm_vit":
        from timm.models.vision_transformer import Block
        if not all(type(b) is Block for b in blocks):
            blockers.append(f"{type(b0).__name__} blocks")
    if runner == "timm_eva":
        from timm.models.eva import EvaBlock
        if not all(type(b) is EvaBlock for b in blocks):
            blockers.append(f"{type(b0).__name__} blocks")
    if runner is None and not blockers:
        blockers.append(f"{arch} is not a timm VisionTransformer or Eva")
    if blockers:
        runner = None
    shown = ", ".join(f for f in feats if not f.endswith("_pool")) or "no extra tokens"
    return ModelKind("plain_vit", arch, prefix_tokens=prefix, depth=depth, features=tuple(feats),
                     token_runner=runner, blockers=tuple(blockers),
                     why=f"a flat token sequence through {depth} blocks ({prefix} prefix tokens; "
                     f"{shown})")


def _structural_kind(model: nn.Module) -> tuple[str, str]:
    """Sort an unlisted model by what it contains."""
    attention = convs = 0
    for name, m in model.named_modules():
        cname = type(m).__name__
        if isinstance(m, nn.MultiheadAttention) or ("Attention" in cname or
                                                    cname.endswith("Attn")) \
                and any(isinstance(c, nn.Linear | nn.Conv2d) for c in m.children()):
            attention += 1
        elif isinstance(m, nn.Conv1d | nn.Conv2d) and not name.startswith(("patch_embed", "stem")):
            convs += 1
    if attention and convs > 2:
        return "hybrid", "convolutions and attention mixed inside the stages"
    if attention:
        return "windowed_vit", "attention over a hierarchical token grid"
    if convs:
        return "cnn", "convolutions only, no token sequence"
    return "mlp", "no attention and no convolutions past the stem"


def applicable_passes(kind: ModelKind) -> list[str]:
    """Bundled passes that apply to this kind of model (token passes also need a runner)."""
    out = []
    for name, kinds in PASS_KINDS.items():
        if kind.kind not in kinds:
            continue
        if name in ("tome", "evit", "expedit", "ia_red") and kind.token_runner is None:
            continue
        if name in ("expedit", "ia_red") and kind.token_runner != "timm_vit":
            continue
        out.append(name)
    return out


def require(kind: ModelKind, pass_name: str, supported: Iterable[str] = (), *,
            needs_runner: bool = False, runners: Iterable[str] | None = None,
            alternatives: Iterable[str] | None = None, where: str = "") -> None:
    """Raise UnsupportedModelError unless ``kind`` is one of ``supported``.

    ``needs_runner``: a plain ViT must also have a token-reduction runner (``runners`` limits
    which). ``alternatives``: the passes to suggest (default: those that apply to this kind).
    ``where``: the recipe location to lead the message with, e.g. ``passes.0``.
    """
    supported = tuple(supported) or PASS_KINDS.get(pass_name, ())
    ok = kind.kind in supported
    reason = ""
    if ok and needs_runner:
        allowed = tuple(runners) if runners is not None else tuple(set(TOKEN_RUNNERS.values()))
        if kind.token_runner not in allowed:
            ok = False
            if kind.source == "hf":
                reason = " (Hugging Face image transformers are not patched for token " \
                         "reduction; load the timm equivalent)"
            elif kind.blockers:
                reason = f" (not supported here: {', '.join(kind.blockers)})"
            else:
                reason = f" ({pass_name} drives timm VisionTransformer blocks only)"
    if ok:
        return
    alts = list(alternatives) if alternatives is not None else applicable_passes(kind)
    alts = [a for a in alts if a != pass_name]
    lead = f"{where}: " if where else ""
    raise UnsupportedModelError(
        f"{lead}{pass_name} supports {'; '.join(KIND_TEXT[k] for k in supported)}. This model is "
        f"{kind.label}{reason}. Passes that apply to this model: "
        f"{', '.join(alts) if alts else 'none of the bundled torch passes'}.")
