import onnx
import pytest

from compress import compress
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe


def _run(recipe_dict, out):
    return compress(parse_recipe(recipe_dict), out_dir=out)


def test_w8a8_tiny_vit_exports_qdq_that_ort_runs_like_torch(tmp_path, tiny_vit_files):
    result = _run(tiny_vit_recipe(tiny_vit_files), tmp_path / "out")
    r = result.report
    ops = r["export"]["op_histogram"]
    assert ops["QuantizeLinear"] >= 24 + 12  # 24 linear/conv inputs + 12 attention operands
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    # Random-weight model, random inputs: near-uniform logits make top-1 agreement on 16 inputs
    # fragile (and reduce_range, on by default on CPUs without VNNI, costs a bit): the logits
    # themselves must stay close.
    m = r["metrics"]["compressed"]
    assert m["top1_agreement"] >= 0.75
    assert m["logits_rel_error"] < 0.1
    assert r["size"]["ratio"] > 2.5
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["blocks.0.attn.qkv"]["weight_bits"] == 8
    assert layers["blocks.0.attn.matmul_qk"]["act_bits"] == 8
    assert min(row["sqnr_db"] for row in r["layers"]) > 15
    onnx.checker.check_model(str(result.model_path))


def test_ignored_layers_stay_float(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{
        "type": "quantize", "ignore": ["head", "re:blocks\\.0\\..*"], "attention_matmuls": False}])
    r = _run(recipe, tmp_path / "out").report
    names = {row["name"] for row in r["layers"]}
    assert "head" not in names
    assert not any(n.startswith("blocks.0.") for n in names)
    assert "blocks.1.mlp.fc1" in names


def test_weight_only_int8(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "quantize", "activations": None}])
    r = _run(recipe, tmp_path / "out").report
    assert "QuantizeLinear" not in r["export"]["op_histogram"]
    assert r["export"]["op_histogram"]["DequantizeLinear"] >= 24


def test_percentile_observer_runs(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{
        "type": "quantize", "activations": {"observer": "percentile", "percentile": 99.9}}])
    r = _run(recipe, tmp_path / "out").report
    assert r["passes"][0]["summary"]["observer"] == "percentile"
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])


def test_w8a8_tiny_bert_sentence_embeddings(tmp_path, tiny_bert_dir, sentences):
    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "latency": {"enabled": False}},
              "passes": [{"type": "quantize"}]}
    r = _run(recipe, tmp_path / "out").report
    assert r["metrics"]["compressed"]["cosine_mean"] > 0.98
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert any(row["name"].endswith("attention.self.matmul_qk") for row in r["layers"])


def test_ort_quantize_pass_on_exported_graph(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "ort_quantize"}])
    r = _run(recipe, tmp_path / "out").report
    assert r["passes"][0]["summary"]["quantize_nodes"] > 0
    assert r["passes"][0]["summary"]["excluded_nodes"] == 12  # q@k^T and probs@v, 6 blocks
    assert r["metrics"]["compressed"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("mode", ["dynamic"])
def test_ort_quantize_dynamic_needs_no_calibration(tmp_path, tiny_vit_files, mode):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "ort_quantize", "mode": mode}])
    del recipe["calibration"]
    r = _run(recipe, tmp_path / "out").report
    assert "DynamicQuantizeLinear" in r["export"]["op_histogram"] or \
        "MatMulInteger" in r["export"]["op_histogram"]


def test_fast_int8_fused_attention_runs_integer_kernels_in_ort(tmp_path, tiny_vit_files):
    """Fast INT8: weight matmuls QDQ, attention one float MultiHeadAttention node; ORT fuses
    the QDQ matmuls into integer kernels and matches the torch simulation."""
    from compress.export.ort import make_session

    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{
        "type": "quantize", "attention_matmuls": False, "fused_attention": True,
        "activations": {"observer": "mse"}, "weights": {"observer": "mse"}}])
    recipe["evaluation"]["latency"] = {"enabled": False}
    result = _run(recipe, tmp_path / "out")
    r = result.report
    ops = r["export"]["op_histogram"]
    assert ops["com.microsoft::MultiHeadAttention"] == 6
    assert "Softmax" not in ops
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert r["passes"][0]["summary"]["fused_attention"] == 6
    assert r["metrics"]["compressed"]["top1_agreement"] >= 0.9
    opt = tmp_path / "opt.onnx"
    make_session(result.model_path, threads=1, optimized_path=opt)
    fused = onnx.load(str(opt))
    kinds = [n.op_type for n in fused.graph.node]
    assert kinds.count("MatMulIntegerToFloat") + kinds.count("QLinearMatMul") >= 24
    assert "MatMul" not in kinds  # no float weight matmul left


def test_fused_attention_needs_float_attention_matmuls(tiny_vit_files):
    from compress.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[{
            "type": "quantize", "fused_attention": True}]))
    assert "passes.0.fused_attention" in str(e.value.errors)


def test_opt_m_two_region_exports_exactly(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{
        "type": "quantize", "attention_matmuls": False, "fused_attention": True,
        "activations": {"opt_m": True}}])
    recipe["evaluation"]["latency"] = {"enabled": False}
    r = _run(recipe, tmp_path / "out").report
    assert r["passes"][0]["summary"]["opt_m_layers"] == 6  # every blocks.N.mlp.fc2
    layers = {row["name"]: row for row in r["layers"]}
    assert "opt_m_m" in layers["blocks.0.mlp.fc2"]
    assert "opt_m_m" not in layers["blocks.0.mlp.fc1"]
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    # fc2 runs as two integer matmuls: 6 more QuantizeLinear than without OPT-m
    assert r["export"]["op_histogram"]["QuantizeLinear"] >= 24 + 6



def test_opt_m_softmax_two_region_probs_export_exactly(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{
        "type": "quantize", "activations": {"opt_m": ["softmax"]}}])
    recipe["evaluation"]["latency"] = {"enabled": False}
    r = _run(recipe, tmp_path / "out").report
    assert r["passes"][0]["summary"]["opt_m_layers"] == 6  # every blocks.N.attn.matmul_av
    layers = {row["name"]: row for row in r["layers"]}
    av = layers["blocks.0.attn.matmul_av"]
    assert "opt_m_m" in av and 0 < av["opt_m_split"] < 1
    assert "opt_m_m" not in layers["blocks.0.attn.matmul_qk"]
    assert "opt_m_m" not in layers["blocks.0.mlp.fc2"]
    # weights.reduce_range (auto) keeps ORT's U8S8 weight matmuls exact on x86 without VNNI;
    # the two-region product itself is exact in ORT (tests/quant/test_modules.py, u8 x u8).
    assert all(p["cosine"] > 0.995 for p in r["export"]["parity"])
    m = r["metrics"]["compressed"]  # random weights: near-uniform logits, see the W8A8 test
    assert m["top1_agreement"] >= 0.75 and m["logits_rel_error"] < 0.1
    # probs @ v runs as two integer matmuls: one more QuantizeLinear per block than plain W8A8
    # (26 Linear/Conv inputs with patch embed and head, 2 operands x 12 attention products)
    assert r["export"]["op_histogram"]["QuantizeLinear"] == 26 + 24 + 6


def test_opt_m_softmax_and_gelu_on_tiny_bert(tmp_path, tiny_bert_dir, sentences):
    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "latency": {"enabled": False}},
              "passes": [{"type": "quantize", "activations": {"opt_m": ["gelu", "softmax"]}}]}
    r = _run(recipe, tmp_path / "out").report
    assert r["passes"][0]["summary"]["opt_m_layers"] == 4  # 2 layers x (output.dense, probs@v)
    names = {row["name"] for row in r["layers"] if "opt_m_m" in row}
    assert any(n.endswith("attention.self.matmul_av") for n in names)
    assert any(n.endswith("output.dense") and "attention" not in n for n in names)
    assert r["metrics"]["compressed"]["cosine_mean"] > 0.98
    assert all(p["cosine"] > 0.995 for p in r["export"]["parity"])  # see above: no-VNNI x86


@pytest.mark.parametrize("opt_m, expected", [(True, ["gelu"]), (False, []), ("softmax", ["softmax"]),
                                             (["gelu", "softmax"], ["gelu", "softmax"])])
def test_opt_m_accepts_bool_for_post_gelu(opt_m, expected):
    from compress.passes.quantize import ActivationQuant

    assert ActivationQuant(opt_m=opt_m).opt_m == expected


def test_opt_m_softmax_needs_attention_matmuls(tiny_vit_files):
    from compress.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[{
            "type": "quantize", "attention_matmuls": False,
            "activations": {"opt_m": ["softmax"]}}]))
    assert "passes.0.attention_matmuls" in str(e.value.errors)
    assert "activations.opt_m" in str(e.value.errors)
    with pytest.raises(RecipeError) as e:
        parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[{
            "type": "quantize", "activations": {"opt_m": ["relu"]}}]))
    assert "passes.0.activations.opt_m" in str(e.value.errors)

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.slow
def test_digits_vit_fast_int8_drop(tmp_path, digits_reference):
    result = compress(RECIPES / "digits_vit_int8_fast.yaml", out_dir=tmp_path,
                      overrides=["evaluation.latency.enabled=false"])
    r = result.report
    assert r["metrics"]["drop"]["top1_points"] <= 0.2
    # export.ort_cpu_kernels: each block's q/k/v projections + attention are one QAttention
    assert r["export"]["op_histogram"]["com.microsoft::QAttention"] == 4
    assert result.gate_passed


@pytest.mark.slow
def test_minilm_fast_int8_cosine(tmp_path):
    result = compress(RECIPES / "minilm_int8_fast.yaml", out_dir=tmp_path,
                      overrides=["evaluation.latency.enabled=false"])
    r = result.report
    assert r["metrics"]["compressed"]["cosine_mean"] >= 0.995
    assert r["export"]["op_histogram"]["com.microsoft::QAttention"] == 6
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert result.gate_passed
