import pytest
import timm
import torch

from compress.errors import EXIT_BAD_INPUT, UnsupportedModelError
from compress.models.handle import ModelHandle, SentenceEmbedder
from compress.models.kind import applicable_passes, model_kind, require


def _meta(name, **kw):
    with torch.device("meta"):   # structure only: no weights initialized
        return timm.create_model(name, pretrained=False, **kw)


@pytest.mark.parametrize("name,kind,runner,prefix,features", [
    ("vit_small_patch14_reg4_dinov2", "plain_vit", "timm_vit", 5, {"reg_tokens", "layer_scale"}),
    ("deit_tiny_distilled_patch16_224", "plain_vit", "timm_vit", 2, {"dist_token"}),
    ("deit3_small_patch16_224", "plain_vit", "timm_vit", 1, {"layer_scale"}),
    ("eva02_tiny_patch14_224", "plain_vit", "timm_eva", 1, {"rope", "swiglu"}),
    ("vit_wee_patch16_reg1_gap_256", "plain_vit", "timm_vit", 1, {"reg_tokens", "avg_pool"}),
    ("beit_base_patch16_224", "plain_vit", None, 1, {"rel_pos_bias"}),
    ("swin_tiny_patch4_window7_224", "windowed_vit", None, 0, set()),
    ("pvt_v2_b0", "windowed_vit", None, 0, set()),
    ("levit_128s", "hybrid", None, 0, set()),
    ("mobilevit_xxs", "hybrid", None, 0, set()),
    ("resnet18", "cnn", None, 0, set()),
    ("convnext_atto", "cnn", None, 0, set()),
    ("mixer_s16_224", "mlp", None, 0, set()),
])
def test_timm_models_get_their_kind(name, kind, runner, prefix, features):
    k = model_kind(_meta(name))
    assert (k.kind, k.token_runner, k.prefix_tokens) == (kind, runner, prefix)
    assert features <= set(k.features)
    assert k.why


def test_beit_is_plain_but_its_relative_position_bias_blocks_token_reduction():
    k = model_kind(_meta("beit_base_patch16_224", depth=2))
    assert k.blockers == ("rel_pos_bias",)
    assert "tome" not in applicable_passes(k) and "quantize" in applicable_passes(k)


def test_refusal_names_supported_kinds_the_model_and_what_applies():
    k = model_kind(_meta("swin_tiny_patch4_window7_224"))
    with pytest.raises(UnsupportedModelError) as e:
        require(k, "tome", ("plain_vit",), needs_runner=True, where="passes.0")
    msg = str(e.value)
    assert msg.startswith("passes.0: tome supports plain-token ViTs")
    assert "SwinTransformer (windowed_vit" in msg
    assert "Passes that apply to this model: quantize, smooth_quant, weight_only" in msg
    assert "evit" not in msg.split("apply to this model")[1]
    assert e.value.exit_code == EXIT_BAD_INPUT


def test_plain_vit_passes_and_refusal_reason_for_a_blocked_one():
    k = model_kind(_meta("beit_base_patch16_224", depth=2))
    with pytest.raises(UnsupportedModelError, match=r"not supported here: rel_pos_bias"):
        require(k, "evit", needs_runner=True)
    require(model_kind(_meta("eva02_tiny_patch14_224")), "tome", needs_runner=True)  # no raise
    with pytest.raises(UnsupportedModelError, match="drives timm VisionTransformer blocks"):
        require(model_kind(_meta("eva02_tiny_patch14_224")), "expedit", needs_runner=True,
                runners=("timm_vit",))


def test_text_and_onnx_handles():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=32))
    k = model_kind(SentenceEmbedder(bert))
    assert (k.kind, k.depth, k.features) == ("text_encoder", 3, ("bert",))
    onnx = ModelHandle(task="image-classification", source="onnx", name="m")
    assert model_kind(onnx).kind == "onnx"
    assert applicable_passes(model_kind(onnx)) == ["ort_quantize"]
