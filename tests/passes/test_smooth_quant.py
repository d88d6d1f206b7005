import pytest

from compress import compress
from compress.errors import RecipeError
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe


def _run(recipe_dict, out):
    return compress(parse_recipe(recipe_dict), out_dir=out)


def _bert_recipe(tiny_bert_dir, sentences, passes):
    return {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
            "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
            "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                           "latency": {"enabled": False}},
            "passes": passes}


def test_smoothing_keeps_float_vit_output(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "smooth_quant", "alpha": 0.5}])
    recipe["evaluation"]["latency"] = {"enabled": False}
    r = _run(recipe, tmp_path / "out").report
    assert r["passes"][0]["summary"]["groups"] == 12  # norm1->qkv, norm2->fc1, 6 blocks
    assert r["passes"][0]["summary"]["folded"] == 12
    assert r["metrics"]["compressed"]["logits_rel_error"] < 1e-4
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["blocks.0.attn.qkv"]["smooth_alpha"] == 0.5


def test_smoothing_keeps_float_bert_output_and_quantizes(tmp_path, tiny_bert_dir, sentences):
    r = _run(_bert_recipe(tiny_bert_dir, sentences, [{"type": "smooth_quant", "alpha": "search"}]),
             tmp_path / "float").report
    s = r["passes"][0]["summary"]
    assert s["groups"] == 4 and s["explicit"] == 4  # post-LN: explicit input transform
    assert r["metrics"]["compressed"]["cosine_min"] > 0.99999
    for row in r["layers"]:
        if "smooth_alpha" in row:
            assert row["smooth_err_after"] <= row["smooth_err_before"] + 1e-6
    # smoothed, then W8A8: exports, ORT matches the torch simulation
    r = _run(_bert_recipe(tiny_bert_dir, sentences,
                          [{"type": "smooth_quant", "alpha": "search"},
                           {"type": "quantize", "attention_matmuls": False}]),
             tmp_path / "int8").report
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert r["metrics"]["compressed"]["cosine_mean"] > 0.98


def test_layers_replaced_after_smoothing_keep_the_input_step(tmp_path, tiny_bert_dir, sentences):
    """Post-LN smoothing leaves an explicit step before q/k/v; a pass that replaces those
    Linears afterwards must keep it (dropped, 8-bit weights alone gave cosine_min 0.9977)."""
    r = _run(_bert_recipe(tiny_bert_dir, sentences,
                          [{"type": "smooth_quant", "alpha": 0.8},
                           {"type": "weight_only", "bits": 8, "method": "rtn"}]),
             tmp_path / "out").report
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert r["metrics"]["compressed"]["cosine_min"] > 0.999


def test_bad_alpha_names_the_field(tiny_vit_files):
    with pytest.raises(RecipeError) as e:
        parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[{"type": "smooth_quant",
                                                               "alpha": 1.5}]))
    assert "passes.0.alpha" in str(e.value.errors)
