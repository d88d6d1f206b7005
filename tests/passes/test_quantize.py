import onnx
import pytest

from compress import compress
from compress.recipe import parse_recipe
from tests.archs import ARCHS, arch_recipe, build_arch_files
from tests.helpers import tiny_vit_recipe


def _run(recipe_dict, out):
    return compress(parse_recipe(recipe_dict), out_dir=out)


@pytest.fixture(scope="session")
def arch_files(tmp_path_factory):
    return build_arch_files(tmp_path_factory)


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
    # probs @ v runs as two integer matmuls where the two-region form (iso-bit: two 7-bit
    # regions) won the search, one QuantizeLinear more per such block than plain W8A8 (26
    # Linear/Conv inputs with patch embed and head, 2 operands x 12 attention products); where
    # one 8-bit region measured better it is a plain uint8 Q/DQ.
    two = [row for row in r["layers"] if row.get("opt_m_region_bits") == 7]
    assert two and all(row["name"].endswith("matmul_av") for row in two)
    assert {row.get("opt_m_region_bits") for row in layers.values() if "opt_m_m" in row} <= {7, 8}
    assert r["export"]["op_histogram"]["QuantizeLinear"] == 26 + 24 + len(two)


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


@pytest.mark.parametrize("opt_m, expected", [(True, ["gelu"]), (False, []),
                                             ("softmax", ["softmax"]),
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


# --------------------------------------------------------------------------- any architecture
W8A8 = [{"type": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8}}]
FAST = [{"type": "smooth_quant", "alpha": "search"},
        {"type": "quantize", "activations": {"bits": 8, "observer": "mse"},
         "attention_matmuls": False, "fused_attention": True}]


def _integer_ops(model_path, tmp_path):
    """Op histogram of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    from collections import Counter

    from compress.export.ort import make_session

    opt = tmp_path / "optimized.onnx"
    make_session(model_path, 1, optimized_path=opt)
    return Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_w8a8_quantizes_every_architecture(tmp_path, arch_files, arch):
    """No attention module or LayerNorm -> Linear pair is required: CNNs get graph-level Q/DQ
    that ORT runs as QLinearConv, transformers get their Linear layers quantized."""
    r = _run(arch_recipe(arch_files[arch], W8A8), tmp_path / "out").report
    s = r["passes"][0]["summary"]
    m = r["metrics"]["compressed"]
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])  # export holds
    assert m["logits_rel_error"] < 0.1 and m["top1_agreement"] >= 0.8
    ops = _integer_ops(tmp_path / "out" / "model.onnx", tmp_path)
    if arch in ("resnet", "convnext"):
        assert s["engine"] == "onnx"
        assert ops["QLinearConv"] >= 4 and "Conv" not in ops  # every Conv runs integer
        assert r["size"]["ratio"] > 2.5  # tiny: biases and LayerNorm params stay float
    else:
        assert s["engine"] == "torch" and s["quantized_layers"] >= 6
        assert s["unobserved_layers"] == 0  # EVA's qkv runs through its (quantized) module
        assert ops["MatMulIntegerToFloat"] >= 6
        assert any("attention_matmuls" in note for note in s["skipped"])


@pytest.mark.parametrize("arch", ["resnet", "swin"])
def test_fast_int8_skips_what_does_not_apply(tmp_path, arch_files, arch):
    r = _run(arch_recipe(arch_files[arch], FAST, export={"ort_cpu_kernels": True,
                                                          "verify_batch_sizes": [1, 3]}),
             tmp_path / "out").report
    smooth, quant = r["passes"][0]["summary"], r["passes"][1]["summary"]
    m = r["metrics"]["compressed"]
    assert m["logits_rel_error"] < 0.1 and m["top1_agreement"] >= 0.8
    if arch == "resnet":
        assert smooth["groups"] == 0 and "nothing smoothed" in smooth["skipped"][0]
        assert quant["engine"] == "onnx"
    else:
        # Swin: norm2 -> fc1 and patch merging smoothed (folded), window attention not fused
        assert smooth["groups"] == 3 and smooth["folded"] == 3
        assert quant["fused_attention"] == 0
        assert any("fused_attention" in note for note in quant["skipped"])


def test_layer_that_never_runs_is_reported_not_a_crash(tmp_path, tiny_vit_files):
    """A head the calibration data never reaches has no activation range: its input stays
    float and the report says so (was: ActQuantizer.freeze() before any data was observed)."""
    import torch
    from torch import nn

    from compress.calibration import observe_activations
    from compress.context import PassContext, PassReport
    from compress.data import Dataset
    from compress.models.handle import ModelHandle
    from compress.passes.quantize import QuantizeConfig, quantize

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(12, 8)
            self.head = nn.Linear(8, 4)
            self.unused_head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.body(x.flatten(1)))

    handle = ModelHandle(task="image-classification", source="timm", name="toy",
                         module=TwoHeads().eval(), data_config={"input_size": (3, 2, 2)})
    calib = Dataset({"pixel_values": torch.randn(16, 3, 2, 2)})
    report = PassReport(index=0, type="quantize")
    ctx = PassContext(index=0, calib=calib, device=torch.device("cpu"), workdir=tmp_path,
                      out_dir=tmp_path, report=report, batch_size=8)
    quantize(handle, QuantizeConfig(engine="torch"), ctx)
    assert report.summary["unobserved_layers"] == 1
    assert "unused_head" in report.summary["skipped"][-1]
    assert report.layers["unused_head"]["act_bits"] is None
    assert report.layers["head"]["act_bits"] == 8
    assert observe_activations is not None


def test_ort_quantize_on_an_onnx_cnn_from_elsewhere_runs_integer_convs(tmp_path, arch_files):
    """An ONNX CNN without its torch model gets W8A8 at the graph level; with op_types auto the
    Conv outputs, residual Adds and pooling are quantized too, so ORT runs QLinearConv."""
    import timm
    import torch
    from safetensors.torch import load_file

    f = arch_files["resnet"]
    model = timm.create_model(f["name"], pretrained=False, **f["kwargs"]).eval()
    model.load_state_dict(load_file(str(f["dir"] / "model.safetensors")))
    onnx_path = tmp_path / "resnet.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(onnx_path), dynamo=False,
                      input_names=["pixel_values"], output_names=["logits"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    recipe = {"version": 1, "model": {"source": "onnx", "path": str(onnx_path),
                                      "task": "image-classification"},
              "calibration": {"path": str(f["dir"] / "calib.npz"), "batch_size": 16},
              "evaluation": {"path": str(f["dir"] / "eval.npz"), "batch_size": 8,
                             "latency": {"enabled": False}},
              "passes": [{"type": "ort_quantize"}]}
    r = _run(recipe, tmp_path / "out").report
    assert "Add" in r["passes"][0]["summary"]["op_types"]  # auto -> all for a conv graph
    ops = _integer_ops(tmp_path / "out" / "model.onnx", tmp_path)
    assert ops["QLinearConv"] >= 4 and "Conv" not in ops
    m = r["metrics"]["compressed"]
    assert m["logits_rel_error"] < 0.1 and m["top1_agreement"] >= 0.8
