"""A fast subset of the model zoo (tiny configs on the zoo members' classes) in CI.

The full zoo (random weights at real sizes) runs with ``make zoo``; these tests take the same
build path (``compress.models.zoo.build_member``) at CI size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.context import PassContext, PassReport
from compress.data import Dataset
from compress.errors import EXIT_BAD_INPUT, CompressError, UnsupportedModelError
from compress.models import load_model
from compress.models.zoo import BY_KEY, TIMM_LEFT_OUT, TIMM_ZOO, TINY_INPUT, build_member
from compress.recipe import parse_recipe
from compress.registry import get_pass
from compress.specs import ModelSpec

PLAIN = ["vit_small_reg4", "deit_tiny_distilled", "eva02_tiny"]
REFUSING = ["swin_tiny", "resnet18", "convnext_atto"]
HF_TEXT = ["hf_bert", "hf_distilbert", "hf_roberta", "hf_albert", "hf_deberta_v2"]
HF_IMAGE = ["hf_vit_image", "hf_swin_image"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zoo")
    for key in PLAIN + REFUSING + HF_TEXT + HF_IMAGE:
        build_member(BY_KEY[key], d / key, tiny=True)
    return {key: d / key for key in PLAIN + REFUSING + HF_TEXT + HF_IMAGE}


def _spec(key: str, folder: Path) -> ModelSpec:
    import json

    return ModelSpec(**json.loads((folder / "member.json").read_text())["model"])


def _load(key, folder):
    spec = _spec(key, folder)
    return load_model(spec, Path(spec.weights or spec.path))


def _images(key: str, n: int = 16) -> torch.Tensor:
    side = TINY_INPUT.get(key, 32)
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def _ctx(tmp_path, inputs: dict, report="p") -> PassContext:
    return PassContext(index=0, calib=Dataset(inputs), device=torch.device("cpu"),
                       workdir=tmp_path, out_dir=tmp_path, report=PassReport(0, report),
                       batch_size=16)


def _run_pass(handle, passes: list[dict], tmp_path, inputs) -> PassContext:
    # The recipe only validates the pass config; the model and data are given directly.
    recipe = parse_recipe({"version": 1, "name": "t", "model": {"source": "timm",
                           "name": "test_vit", "weights": "w.safetensors"},
                           "calibration": {"path": "calib.npz"}, "passes": passes})
    cfg = recipe.passes[0]
    ctx = _ctx(tmp_path, inputs, cfg.type)
    get_pass(cfg.type).fn(handle, cfg, ctx)
    return ctx


# --------------------------------------------------------------------------- the list


def test_zoo_holds_every_timm_family_or_says_why_not():
    from timm.models import _registry

    families = set(_registry._model_to_module.values())
    in_zoo = {m.family for m in TIMM_ZOO}
    assert families == in_zoo | set(TIMM_LEFT_OUT), (families - in_zoo - set(TIMM_LEFT_OUT))
    assert not in_zoo & set(TIMM_LEFT_OUT)
    assert len(in_zoo) >= 80 and len(TIMM_ZOO) >= 85
    for m in TIMM_ZOO:                       # every member is a real model of its family
        assert _registry._model_to_module[m.name] == m.family, m.key


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("key", PLAIN + REFUSING)
def test_timm_members_load_exactly(zoo, key):
    import timm

    from compress.models.zoo import TINY_TIMM

    h = _load(key, zoo[key])
    torch.manual_seed(0)
    ref = timm.create_model(BY_KEY[key].name, pretrained=False, **TINY_TIMM[key]).eval()
    x = _images(key, 2)
    with torch.no_grad():
        torch.testing.assert_close(h.module(x), ref(x))
    assert h.input_size[1:] == x.shape[2:]


@pytest.mark.parametrize("key", HF_TEXT)
def test_hf_text_members_load_and_match_transformers(zoo, key):
    from transformers import AutoModel

    h = _load(key, zoo[key])
    enc = h.tokenizer(["A cat sits on the mat.", "Stock prices fell sharply today."],
                      padding=True, return_tensors="pt")
    ref_model = AutoModel.from_pretrained(zoo[key], attn_implementation="eager").eval()
    with torch.no_grad():
        emb = h.module(enc["input_ids"], enc["attention_mask"])
        hidden = ref_model(input_ids=enc["input_ids"],
                           attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    assert h.source == "hf" and h.task == "text-embedding"


@pytest.mark.parametrize("key", HF_IMAGE)
def test_hf_image_members_load_and_match_transformers(zoo, key):
    from transformers import AutoModelForImageClassification

    h = _load(key, zoo[key])
    ref_model = AutoModelForImageClassification.from_pretrained(zoo[key]).eval()
    x = _images(key, 2)
    with torch.no_grad():
        torch.testing.assert_close(h.module(x), ref_model(pixel_values=x).logits)
    assert h.data_config["mean"] == (0.485, 0.456, 0.406) and h.input_size == (3, 32, 32)


def test_hf_task_mismatch_is_a_clear_input_error(zoo):
    spec = ModelSpec(source="hf", path=str(zoo["hf_vit_image"]), task="text-embedding")
    with pytest.raises(UnsupportedModelError, match="Set model.task: image-classification"):
        load_model(spec, zoo["hf_vit_image"])


# --------------------------------------------------------------------------- token passes


@pytest.mark.parametrize("key", PLAIN)
@pytest.mark.parametrize("passes", [[{"type": "tome", "r": 2}],
                                    [{"type": "evit", "keep_rate": 0.5, "locations": [1, 2]}]])
def test_token_passes_apply_to_plain_vits_with_extra_tokens(zoo, key, passes, tmp_path):
    h = _load(key, zoo[key])
    original = copy.deepcopy(h.module)
    x = _images(key)
    ctx = _run_pass(h, passes, tmp_path, {"pixel_values": x})
    counts = ctx.report.summary["tokens_per_block"]
    assert counts[-1] < counts[0]                       # tokens really went away
    assert ctx.report.summary["protected_tokens"] == {"vit_small_reg4": 5,
                                                      "deit_tiny_distilled": 2,
                                                      "eva02_tiny": 1}[key]
    with torch.no_grad():
        ref, out = original(x), h.module(x)
    cos = torch.nn.functional.cosine_similarity(out, ref).mean().item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # random tiny models have near-uniform logits: cosine is the stable fidelity figure
    assert cos > 0.9 and agree >= 0.5, (cos, agree)


def test_eva_rope_follows_kept_tokens_exactly():
    # Prune(1.0) keeps every token (the fused token has size 0, so attention ignores it): the
    # output must equal the original, which holds only if RoPE is gathered per kept token.
    import timm

    from compress.patch.vit_tokens import patch_vit
    from compress.tokens.plan import Merge, Prune

    torch.manual_seed(0)
    m = timm.create_model("eva02_tiny_patch14_224", img_size=28, embed_dim=32, depth=4,
                          num_heads=2, num_classes=10, global_pool="avg").eval()
    x = _images("eva02_tiny", 3)
    with torch.no_grad():
        ref = m(x)
        patch_vit(m, [Prune(1.0)] * 4)
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
        patch_vit(m, [Merge(0)] * 4)
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", REFUSING)
@pytest.mark.parametrize("pass_type", ["tome", "evit"])
def test_token_passes_refuse_windowed_and_cnn_with_exit_2(zoo, key, pass_type, tmp_path):
    h = _load(key, zoo[key])
    with pytest.raises(UnsupportedModelError) as e:
        _run_pass(h, [{"type": pass_type}], tmp_path, {"pixel_values": _images(key)})
    msg = str(e.value)
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert msg.startswith(f"passes.0: {pass_type} supports plain-token ViTs")
    assert ("windowed_vit" if key == "swin_tiny" else "cnn") in msg
    assert "Passes that apply to this model: quantize" in msg


@pytest.mark.parametrize("key,works", [("hf_bert", True), ("hf_roberta", True),
                                       ("hf_distilbert", False), ("hf_albert", False)])
def test_text_token_prune_applies_or_refuses(zoo, key, works, tmp_path):
    h = _load(key, zoo[key])
    enc = h.tokenizer(["A cat sits on the mat."] * 4, padding="max_length", max_length=16,
                      return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    passes = [{"type": "text_token_prune", "keep_rate": 0.5, "layers": [0]}]
    if works:
        ctx = _run_pass(h, passes, tmp_path, inputs)
        assert ctx.report.summary["tokens_per_block"][1] < 128
        return
    with pytest.raises(UnsupportedModelError, match="text token pruning supports BERT-family"):
        _run_pass(h, passes, tmp_path, inputs)


# --------------------------------------------------------------------------- never exit 1

FAMILIES = {
    "w8a8": [{"type": "quantize"}],
    "int4": [{"type": "weight_only", "bits": 4, "block_size": 16}],
    "tome": [{"type": "tome", "r": 2}],
    "evit": [{"type": "evit", "keep_rate": 0.5}],
    "text_token_prune": [{"type": "text_token_prune", "keep_rate": 0.5}],
    "binarize": [{"type": "binarize", "distillation": {"method": "none"}}],
}
# Where the pass must succeed (token passes: plain ViTs / BERT-layout encoders).
MUST_WORK = {("tome", k) for k in PLAIN} | {("evit", k) for k in PLAIN} | {
    ("text_token_prune", "hf_bert"), ("text_token_prune", "hf_roberta"),
    ("w8a8", "vit_small_reg4"), ("w8a8", "hf_bert")}


def _inputs(h, key):
    if h.task == "text-embedding":
        enc = h.tokenizer(["A cat sits on the mat.", "Prices fell."] * 4, padding="max_length",
                          max_length=16, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return {"pixel_values": _images(key)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_pass_family_ends_in_a_bug_on_the_subset(zoo, family, tmp_path):
    """Every subset member x pass family: success, or exit 2 naming what applies instead."""
    outcomes = {}
    for key in PLAIN + REFUSING + HF_TEXT + HF_IMAGE:
        h = _load(key, zoo[key])
        try:
            _run_pass(h, FAMILIES[family], tmp_path / key, _inputs(h, key))
            outcomes[key] = 0
        except CompressError as e:
            outcomes[key] = e.exit_code
            assert e.exit_code == EXIT_BAD_INPUT and len(str(e)) > 40, (key, str(e))
        if (family, key) in MUST_WORK:
            assert outcomes[key] == 0, key
    assert set(outcomes.values()) <= {0, 2}
    assert np.mean([v == 0 for v in outcomes.values()]) > 0  # something applies everywhere


def test_binarize_refuses_a_cnn_and_names_what_applies(zoo, tmp_path):
    h = _load("resnet18", zoo["resnet18"])
    with pytest.raises(UnsupportedModelError) as e:
        _run_pass(h, FAMILIES["binarize"], tmp_path, {"pixel_values": _images("resnet18")})
    assert "This model is ResNet (cnn" in str(e.value)
    assert str(e.value).endswith("Passes that apply to this model: quantize, smooth_quant, "
                                 "weight_only, mixed_precision, ort_quantize.")
