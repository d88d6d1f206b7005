"""The model zoo: one small member of every timm family and every transformers encoder family.

Members are built with random weights (timm ``pretrained=False``; transformers models from
small configs), so nothing is downloaded. ``build_member`` writes a member into a folder as a
compress user would bring it: timm weights as ``model.safetensors``, a Hugging Face folder
(``save_pretrained(safe_serialization=True)`` plus a tokenizer), and ``member.json``, the
recipe's ``model`` block. ``scripts/build_zoo.py`` builds the whole zoo; the tests build
tiny members (``tiny=True``: a few blocks, low resolution) on the same path; ``docs/zoo.md``
lists the members and the families left out.

The timm list was decided from ``timm.list_models()`` (timm 1.0.31): every model module
(family) whose smallest model has under 30M parameters, its smallest non-test member (or the
member with the feature the family is known for). ``kwargs`` shrink a member only where the
family has nothing under 30M (BEiT) or where its default resolution is far above 224.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class ZooMember:
    key: str                       # folder name and --models key
    source: str                    # "timm" | "hf"
    name: str                      # timm architecture, or transformers model_type
    family: str                    # timm model module, or transformers model_type
    group: str                     # plain ViT | windowed/hierarchical | hybrid | CNN | MLP | text
    kwargs: dict = field(default_factory=dict)
    note: str = ""
    task: str = "image-classification"
    tiny_kwargs: dict | None = None  # CI: a tiny config on the same code path (None: not tiny)


def _t(key, name, family, group, note="", **kwargs) -> ZooMember:
    return ZooMember(key, "timm", name, family, group, kwargs, note)


PLAIN, WINDOWED, HYBRID, CNN, MLP, TEXT = ("plain ViT", "windowed/hierarchical ViT", "hybrid",
                                           "CNN", "MLP", "text encoder")

TIMM_ZOO: list[ZooMember] = [
    # plain-token ViTs: token passes apply
    _t("vit_tiny", "vit_tiny_patch16_224", "vision_transformer", PLAIN, "class token"),
    _t("vit_small_reg4", "vit_small_patch14_reg4_dinov2", "vision_transformer", PLAIN,
       "4 register tokens, LayerScale; at 224 px (default 518)", img_size=224),
    _t("vit_wee_reg1_gap", "vit_wee_patch16_reg1_gap_256", "vision_transformer", PLAIN,
       "no class token, 1 register token, average pooling"),
    _t("deit_tiny_distilled", "deit_tiny_distilled_patch16_224", "deit", PLAIN,
       "class + distillation token"),
    _t("deit3_small", "deit3_small_patch16_224", "deit", PLAIN, "LayerScale"),
    _t("eva02_tiny", "eva02_tiny_patch14_224", "eva", PLAIN, "RoPE, SwiGLU"),
    _t("vit_tiny_dinov3", "vit_tiny_patch16_dinov3_qkvb", "eva", PLAIN,
       "RoPE, register tokens, LayerScale"),
    _t("beit_narrow", "beit_base_patch16_224", "beit", PLAIN,
       "relative position bias; width 192, 3 heads (the family has nothing under 30M)",
       embed_dim=192, num_heads=3),
    _t("vit_relpos_small", "vit_relpos_small_patch16_224", "vision_transformer_relpos", PLAIN,
       "relative position MLP"),
    _t("vit_tiny_r_s16", "vit_tiny_r_s16_p8_224", "vision_transformer_hybrid", PLAIN,
       "ResNet stem, ViT blocks"),
    _t("vitamin_small", "vitamin_small_224", "vitamin", PLAIN, "MbConv stem, ViT blocks"),
    _t("cait_xxs24", "cait_xxs24_224", "cait", HYBRID, "class-attention layers, LayerScale"),
    _t("xcit_nano", "xcit_nano_12_p16_224", "xcit", HYBRID, "cross-covariance attention"),
    _t("convit_tiny", "convit_tiny", "convit", HYBRID, "gated positional self-attention"),
    _t("tnt_s", "tnt_s_legacy_patch16_224", "tnt", HYBRID, "transformer in transformer"),
    _t("volo_d1", "volo_d1_224", "volo", HYBRID, "outlook attention"),
    # windowed / hierarchical / pooling transformers
    _t("swin_tiny", "swin_tiny_patch4_window7_224", "swin_transformer", WINDOWED),
    _t("swinv2_tiny", "swinv2_tiny_window8_256", "swin_transformer_v2", WINDOWED),
    _t("swinv2_cr_tiny", "swinv2_cr_tiny_224", "swin_transformer_v2_cr", WINDOWED),
    _t("pvt_v2_b0", "pvt_v2_b0", "pvt_v2", WINDOWED, "spatial-reduction attention"),
    _t("twins_pcpvt_small", "twins_pcpvt_small", "twins", WINDOWED),
    _t("mvitv2_tiny", "mvitv2_tiny", "mvitv2", WINDOWED, "pooling attention"),
    _t("hiera_tiny", "hiera_tiny_224", "hiera", WINDOWED),
    _t("sam2_hiera_tiny", "sam2_hiera_tiny", "hieradet_sam2", WINDOWED),
    _t("davit_tiny", "davit_tiny", "davit", WINDOWED, "dual attention"),
    _t("nest_tiny", "nest_tiny", "nest", WINDOWED),
    _t("pit_ti", "pit_ti_224", "pit", WINDOWED, "pooling stages, distillation-free"),
    _t("crossvit_tiny", "crossvit_tiny_240", "crossvit", WINDOWED, "two branches, 240 px"),
    _t("visformer_tiny", "visformer_tiny", "visformer", WINDOWED),
    _t("focalnet_tiny_srf", "focalnet_tiny_srf", "focalnet", HYBRID, "focal modulation"),
    # conv-attention hybrids
    _t("levit_128s", "levit_128s", "levit", HYBRID, "distilled head, attention biases"),
    _t("mobilevit_xxs", "mobilevit_xxs", "mobilevit", HYBRID, "256 px"),
    _t("efficientformer_l1", "efficientformer_l1", "efficientformer", HYBRID),
    _t("efficientformerv2_s0", "efficientformerv2_s0", "efficientformer_v2", HYBRID),
    _t("coat_lite_tiny", "coat_lite_tiny", "coat", HYBRID, "conv-attention"),
    _t("coatnet_nano", "coatnet_nano_rw_224", "maxxvit", HYBRID),
    _t("tiny_vit_5m", "tiny_vit_5m_224", "tiny_vit", HYBRID),
    _t("fastvit_t8", "fastvit_t8", "fastvit", HYBRID),
    _t("edgenext_xxs", "edgenext_xx_small", "edgenext", HYBRID, "256 px"),
    _t("gcvit_xxtiny", "gcvit_xxtiny", "gcvit", HYBRID),
    _t("efficientvit_b0", "efficientvit_b0", "efficientvit_mit", HYBRID, "linear attention"),
    _t("efficientvit_m0", "efficientvit_m0", "efficientvit_msra", HYBRID),
    _t("repvit_m1", "repvit_m1", "repvit", HYBRID),
    _t("shvit_s1", "shvit_s1", "shvit", HYBRID),
    _t("swiftformer_xs", "swiftformer_xs", "swiftformer", HYBRID),
    _t("iformer_t", "iformer_t", "iformer", HYBRID),
    _t("lowformer_b0", "lowformer_b0", "lowformer", HYBRID),
    _t("efficientvim_m1", "efficientvim_m1", "efficientvim", HYBRID, "state-space mixer"),
    _t("csatv2", "csatv2", "csatv2", HYBRID),
    _t("halonet_h1", "halonet_h1", "byoanet", HYBRID, "halo attention, 256 px"),
    # MLPs and other token mixers
    _t("gmlp_ti16", "gmlp_ti16_224", "mlp_mixer", MLP),
    _t("sequencer2d_s", "sequencer2d_s", "sequencer", MLP, "BiLSTM token mixing"),
    _t("poolformerv2_s12", "poolformerv2_s12", "metaformer", CNN, "pooling token mixer"),
    _t("convmixer_768_32", "convmixer_768_32", "convmixer", CNN),
    # CNNs
    _t("resnet18", "resnet18", "resnet", CNN),
    _t("resnetv2_18", "resnetv2_18", "resnetv2", CNN, "pre-activation"),
    _t("convnext_atto", "convnext_atto", "convnext", CNN),
    _t("efficientnet_b0", "efficientnet_b0", "efficientnet", CNN),
    _t("mobilenetv3_large", "mobilenetv3_large_100", "mobilenetv3", CNN),
    _t("hardcorenas_b", "hardcorenas_b", "hardcorenas", CNN),
    _t("regnetx_002", "regnetx_002", "regnet", CNN),
    _t("ghostnet_050", "ghostnet_050", "ghostnet", CNN),
    _t("repghostnet_050", "repghostnet_050", "repghost", CNN),
    _t("densenet121", "densenet121", "densenet", CNN),
    _t("dla46x_c", "dla46x_c", "dla", CNN),
    _t("dpn48b", "dpn48b", "dpn", CNN),
    _t("cspnext_tiny", "cspnext_tiny", "cspnext", CNN),
    _t("cs3darknet_focus_s", "cs3darknet_focus_s", "cspnet", CNN),
    _t("mobileone_s0", "mobileone_s0", "byobnet", CNN),
    _t("hgnetv2_b0", "hgnetv2_b0", "hgnet", CNN),
    _t("hrnet_w18_small", "hrnet_w18_small", "hrnet", CNN),
    _t("inception_v3", "inception_v3", "inception_v3", CNN, "299 px"),
    _t("inception_next_atto", "inception_next_atto", "inception_next", CNN),
    _t("lcnetv2_small", "lcnetv2_small", "lcnetv2", CNN),
    _t("mambaout_femto", "mambaout_femto", "mambaout", CNN, "gated CNN"),
    _t("nf_regnet_b0", "nf_regnet_b0", "nfnet", CNN, "normalizer-free"),
    _t("rdnet_tiny", "rdnet_tiny", "rdnet", CNN),
    _t("res2next50", "res2next50", "res2net", CNN),
    _t("resnest14d", "resnest14d", "resnest", CNN, "split attention"),
    _t("rexnet_100", "rexnet_100", "rexnet", CNN),
    _t("seresnet18", "legacy_seresnet18", "senet", CNN, "squeeze-excitation"),
    _t("skresnet18", "skresnet18", "sknet", CNN, "selective kernels"),
    _t("starnet_s050", "starnet_s050", "starnet", CNN),
    _t("fasternet_t0", "fasternet_t0", "fasternet", CNN, "partial convolutions"),
    _t("cpubone_nano", "cpubone_nano", "cpubone", CNN),
    _t("ese_vovnet19b_slim_dw", "ese_vovnet19b_slim_dw", "vovnet", CNN),
    _t("xception", "legacy_xception", "xception", CNN, "299 px"),
    _t("xception41p", "xception41p", "xception_aligned", CNN, "299 px"),
]

# timm families whose smallest model has 30M parameters or more (timm 1.0.31), and why each is
# left out; docs/zoo.md repeats this.
TIMM_LEFT_OUT = {
    "inception_resnet_v2": "smallest model 55.8M parameters",
    "inception_v4": "smallest model 42.7M parameters",
    "mobilenetv5": "smallest model 82.7M parameters (a multimodal encoder)",
    "naflexvit": "smallest model 86.5M parameters; variable-resolution patch input",
    "nasnet": "smallest model 88.8M parameters",
    "nextvit": "smallest model 31.8M parameters",
    "pnasnet": "smallest model 86.1M parameters",
    "selecsls": "smallest model 30.4M parameters",
    "tresnet": "smallest model 31.4M parameters",
    "vgg": "smallest model 132.9M parameters",
    "vision_transformer_sam": "smallest model 86.5M parameters (SAM image encoder)",
    "deepseek_vit": "411.8M parameters (VLM vision tower)",
    "gemma4_vit": "167.4M parameters (VLM vision tower)",
    "qwen3_vit": "87.4M parameters (VLM vision tower)",
}

# Tiny configs of plain/windowed/CNN members, on the same classes, for CI.
TINY_TIMM = {
    "vit_small_reg4": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                       "num_heads": 2, "num_classes": 10},
    "deit_tiny_distilled": {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2,
                            "num_classes": 10, "patch_size": 8},
    "eva02_tiny": {"img_size": 28, "embed_dim": 32, "depth": 4, "num_heads": 2,
                   "num_classes": 10},
    "swin_tiny": {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16,
                  "depths": (1, 1), "num_heads": (1, 2), "num_classes": 10},
    "resnet18": {"num_classes": 10},
    "convnext_atto": {"num_classes": 10, "depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)},
}
TINY_INPUT = {"vit_small_reg4": 32, "deit_tiny_distilled": 32, "eva02_tiny": 28,
              "swin_tiny": 32, "resnet18": 32, "convnext_atto": 32}


# --------------------------------------------------------------------------- transformers

# (config class, kwargs beyond the shared small sizes) per model_type; every one is an
# encoder-only architecture people fine-tune for classification or embeddings.
HF_TEXT = {
    "bert": ("BertConfig", {}),
    "distilbert": ("DistilBertConfig", {"dim": None, "n_layers": None, "n_heads": None,
                                        "hidden_dim": None}),
    "roberta": ("RobertaConfig", {"max_position_embeddings": 514, "pad_token_id": 1}),
    "xlm-roberta": ("XLMRobertaConfig", {"max_position_embeddings": 514, "pad_token_id": 1}),
    "albert": ("AlbertConfig", {"embedding_size": 64}),
    "electra": ("ElectraConfig", {"embedding_size": 64}),
    "mpnet": ("MPNetConfig", {"max_position_embeddings": 514}),
    "deberta-v2": ("DebertaV2Config", {"relative_attention": True, "pos_att_type":
                                       ["p2c", "c2p"], "position_buckets": 64}),
    "deberta": ("DebertaConfig", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"]}),
    "camembert": ("CamembertConfig", {"max_position_embeddings": 514, "pad_token_id": 1}),
    "modernbert": ("ModernBertConfig", {"global_attn_every_n_layers": 2,
                                        "local_attention": 16}),
}
HF_IMAGE = {
    "vit": ("ViTConfig", {}),
    "deit": ("DeiTConfig", {"architectures": ["DeiTForImageClassificationWithTeacher"]}),
    "beit": ("BeitConfig", {"use_relative_position_bias": True}),
    "swin": ("SwinConfig", {"embed_dim": 48, "depths": [2, 2, 2], "num_heads": [2, 4, 8],
                            "window_size": 7}),
    "dinov2": ("Dinov2Config", {}),
    "convnext": ("ConvNextConfig", {"hidden_sizes": [32, 64, 128, 256],
                                    "depths": [1, 1, 2, 1]}),
}


def _hf(key: str, model_type: str, task: str, note: str = "") -> ZooMember:
    return ZooMember(key, "hf", model_type, model_type, TEXT if task == "text-embedding"
                     else {"swin": WINDOWED, "convnext": CNN}.get(model_type, PLAIN),
                     note=note, task=task, tiny_kwargs={})


HF_ZOO: list[ZooMember] = [
    *[_hf(f"hf_{t.replace('-', '_')}", t, "text-embedding") for t in HF_TEXT],
    *[_hf(f"hf_{t}_image", t, "image-classification") for t in HF_IMAGE],
]

ZOO: list[ZooMember] = TIMM_ZOO + HF_ZOO
BY_KEY = {m.key: m for m in ZOO}


def hf_config(model_type: str, tiny: bool, image_size: int = 224):
    """A small (or tiny) transformers config for ``model_type``, with random-init defaults."""
    import transformers

    table = HF_TEXT if model_type in HF_TEXT else HF_IMAGE
    cls_name, extra = table[model_type]
    cls = getattr(transformers, cls_name)
    hidden, layers, heads, inter = (32, 2, 2, 64) if tiny else (256, 4, 4, 1024)
    if model_type == "distilbert":
        kw = {"dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": inter,
              "vocab_size": 30522, "max_position_embeddings": 512}
    elif model_type in HF_TEXT:
        kw = {"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "intermediate_size": inter,
              **{k: v for k, v in extra.items() if v is not None}}
        kw.setdefault("max_position_embeddings", 512)
        if model_type == "albert":
            kw["embedding_size"] = hidden // 2
        if model_type == "electra":
            kw["embedding_size"] = hidden
        if model_type == "modernbert":
            kw.update(pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101,
                      sep_token_id=102)
    else:
        size = 32 if tiny else image_size
        kw = {"image_size": size, "num_labels": 10 if tiny else 1000, **extra}
        if model_type in ("vit", "deit", "beit", "dinov2"):
            kw.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inter, patch_size=8 if tiny else 16)
        if model_type == "swin" and tiny:
            kw.update(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                      patch_size=2)
        if model_type == "convnext" and tiny:
            kw.update(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    return cls(**kw)


def _minilm_tokenizer_dir() -> Path:
    from ..reference.minilm import package_model_dir

    return package_model_dir()


def build_member(member: ZooMember, out: Path, tiny: bool = False, seed: int = 0) -> dict:
    """Write ``member`` (random weights) into ``out``; returns the recipe's ``model`` block.

    ``tiny``: a CI-sized config on the same classes (timm members in ``TINY_TIMM``).
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if member.source == "timm":
        import timm
        from safetensors.torch import save_file

        kwargs = dict(TINY_TIMM[member.key]) if tiny else dict(member.kwargs)
        model = timm.create_model(member.name, pretrained=False, **kwargs).eval()
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        spec = {"source": "timm", "name": member.name, "kwargs": kwargs,
                "weights": str(out / "model.safetensors")}
        if tiny:   # CNNs take any size: the tiny member is fed at its tiny resolution
            side = TINY_INPUT[member.key]
            spec["preprocess"] = {"input_size": [3, side, side]}
    else:
        spec = _build_hf(member, out, tiny)
    desc = {"key": member.key, "family": member.family, "group": member.group,
            "note": member.note, "params": _params(out, member), "model": spec}
    (out / "member.json").write_text(json.dumps(desc, indent=2))
    return spec


def _build_hf(member: ZooMember, out: Path, tiny: bool) -> dict:
    import transformers

    cfg = hf_config(member.name, tiny)
    if member.task == "text-embedding":
        model = transformers.AutoModel.from_config(cfg, attn_implementation="eager")
        model.eval().save_pretrained(out, safe_serialization=True)
        tok = _minilm_tokenizer_dir()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                  "special_tokens_map.json"):
            shutil.copy(tok / f, out / f)
        return {"source": "hf", "path": str(out), "task": "text-embedding"}
    model = transformers.AutoModelForImageClassification.from_config(
        cfg, attn_implementation="eager")
    model.eval().save_pretrained(out, safe_serialization=True)
    size = cfg.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "size": {"height": size, "width": size}}))
    return {"source": "hf", "path": str(out), "task": "image-classification"}


def _params(out: Path, member: ZooMember) -> int:
    from safetensors import safe_open

    total = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                total += _numel(sf.get_slice(k).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
