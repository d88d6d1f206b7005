import pytest

from compress import compress
from compress.errors import RecipeError
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe


def _recipe(files, **mp):
    p = {"type": "mixed_precision", "block_size": 16, "weight_bits": [2, 4, 8],
         "sensitivity_samples": 8, "calibration_samples": 16, "method": "rtn", **mp}
    r = tiny_vit_recipe(files, passes=[p])
    r["evaluation"]["latency"] = {"enabled": False}
    r["export"] = {"verify_batch_sizes": [2]}
    return r


def test_mixed_precision_meets_weight_budget_and_runs_in_ort(tmp_path, tiny_vit_files):
    # Stored bits, block 16 with 4-bit zero points: W4 = 4 + 36/16 = 6.25, W2 = 4.125.
    recipe = _recipe(tiny_vit_files, method="gptq", budget={"avg_weight_bits": 6.0},
                     overrides={"head": None, "blocks.0.attn.qkv": 8})
    result = compress(parse_recipe(recipe), out_dir=tmp_path / "out")
    r = result.report
    s = r["passes"][0]["summary"]
    assert s["avg_weight_bits_stored"] <= 6.0
    # Nominal (code widths only) sits beside it, about 2 bits lower at block 16.
    assert 1.5 < s["avg_weight_bits_stored"] - s["avg_weight_bits_nominal"] < 2.5
    assert s["pinned_layers"] == 1 and s["float_layers"] == 1
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["head"]["weight_bits"] is None
    assert layers["head"]["weight_bits_stored"] == 32.0
    assert layers["blocks.0.attn.qkv"]["weight_bits"] == 8
    # Per-channel int8 Q/DQ, 64 inputs: fp32 scale and int8 zero point per output channel.
    assert layers["blocks.0.attn.qkv"]["weight_bits_stored"] == 8 + 40 / 64
    stored = {2: 2 + 34 / 16, 4: 4 + 36 / 16}
    for row in r["layers"]:
        if row.get("weight_bits") in stored and row["name"] != "blocks.0.attn.qkv":
            assert row["weight_bits_stored"] == pytest.approx(stored[row["weight_bits"]],
                                                              abs=1e-3)
    bits = {row["weight_bits"] for row in r["layers"] if row.get("weight_bits")}
    assert bits <= {2, 4, 8} and len(bits) >= 2          # actually mixed
    # The layers lowered furthest are the least sensitive per bit among those measured.
    assert all(row["sensitivity"] is not None for row in r["layers"]
               if row.get("weight_bits") and not row.get("pinned"))
    ops = r["export"]["op_histogram"]
    assert ops.get("com.microsoft::MatMulNBits", 0) >= 1 and ops.get("QuantizeLinear", 0) >= 1
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    # Measured and predicted error along the path; the plot is written.
    assert s["final_error"] >= 0 and any(t["measured_error"] is not None
                                         for t in s["trajectory"][1:])
    plot = next(p for p in r["plots"] if "mixed_precision" in p["file"])
    assert (tmp_path / "out" / plot["file"]).exists()


def test_max_error_budget_is_respected(tmp_path, tiny_vit_files):
    recipe = _recipe(tiny_vit_files, budget={"max_error": 2e-4}, act_bits=[])
    s = _run_pass_only(recipe, tmp_path).report.summary
    assert s["final_error"] <= 2e-4
    assert s["avg_weight_bits_stored"] < 8   # something was lowered


@pytest.mark.parametrize("mp,match", [
    ({"budget": {"avg_weight_bits": 1.5}},
     r"passes\.0\.budget\.avg_weight_bits=1\.5 is unreachable.*4\.125 stored bits"),
    ({"budget": {"avg_weight_bits": 3}, "overrides": {"re:blocks\\..*": 8}},
     r"passes\.0\.budget\.avg_weight_bits=3"),
    ({"budget": {"size_mb": 0.01}}, r"passes\.0\.budget\.size_mb=0\.01 is unreachable"),
    ({"budget": {"avg_weight_bits": 4}, "overrides": {"blocks.9.mlp.fc1": 4}},
     r"passes\.0\.overrides key 'blocks\.9\.mlp\.fc1' matches no targeted layer"),
    ({"budget": {"avg_act_bits": 6}}, r"passes\.0\.budget\.avg_act_bits=6"),
])
def test_impossible_budgets_and_bad_pins_are_recipe_errors(tmp_path, tiny_vit_files, mp, match):
    with pytest.raises(RecipeError, match=match):
        _run_pass_only(_recipe(tiny_vit_files, **mp), tmp_path)


def _run_pass_only(recipe, tmp_path):
    """Load model and data, run the pass alone (no baseline or export): fast error checks."""
    from compress.api import Pipeline
    from compress.context import PassContext, PassReport
    from compress.passes.mixed_precision import mixed_precision

    r = parse_recipe(recipe)
    p = Pipeline(r, model=None, calib=None, eval=None, out_dir=tmp_path, progress=None,
                 device="cpu")
    p.load()
    p.load_data()
    ctx = PassContext(index=0, calib=p.calib, device=p.device, workdir=tmp_path,
                      out_dir=tmp_path, report=PassReport(0, "mixed_precision"), batch_size=16)
    mixed_precision(p.handle, r.passes[0], ctx)
    return ctx


@pytest.mark.parametrize("mp,field", [
    ({"budget": {}}, "budget"),
    ({"budget": {"avg_weight_bits": 4}, "overrides": {"head": 7}}, "overrides"),
    ({"budget": {"avg_weight_bits": 4}, "block_size": 20}, "block_size"),
    ({"budget": {"avg_weight_bits": 4}, "act_bits": [5]}, "act_bits"),
])
def test_bad_config_fails_validation(tiny_vit_files, mp, field):
    with pytest.raises(RecipeError, match=field):
        parse_recipe(_recipe(tiny_vit_files, **mp))


@pytest.mark.slow
def test_digits_vit_w4a8_mixed_done_when(tmp_path, digits_reference):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "digits_vit_mixed.yaml"
    r = compress(recipe, out_dir=tmp_path / "out",
                 overrides=["evaluation.latency.enabled=false"]).report
    s = r["passes"][0]["summary"]
    assert s["avg_weight_bits_stored"] <= 5.125      # plain block-32 INT4's stored bits
    assert r["metrics"]["drop"]["top1_points"] <= 1.0


@pytest.mark.slow
def test_minilm_mixed_done_when(tmp_path, minilm_dir):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "minilm_mixed.yaml"
    result = compress(recipe, out_dir=tmp_path / "out",
                      overrides=["evaluation.latency.enabled=false"])
    r = result.report
    assert r["passes"][0]["summary"]["avg_weight_bits_stored"] <= 5.65
    assert r["metrics"]["compressed"]["cosine_mean"] >= 0.985
    assert result.model_path.stat().st_size <= 20e6


def test_size_budget_is_met_by_the_exported_file(tmp_path, tiny_vit_files):
    # A size budget between all-2-bit and all-8-bit, symmetric (no zero points in the file),
    # with OPT-m and scale search on: the searched model's tensor data in model.onnx stays
    # within the budget and the pass's estimate bounds it from above.
    import onnx

    from compress.export.onnx import onnx_size_bytes

    recipe = _recipe(tiny_vit_files, budget={"size_mb": 0.26}, symmetric=True, opt_m=True,
                     mse_grid=4, act_bits=[8])
    r = compress(parse_recipe(recipe), out_dir=tmp_path / "out").report
    s = r["passes"][0]["summary"]
    path = tmp_path / "out" / "model.onnx"
    proto = onnx.load(str(path))
    tensors = sum(t.ByteSize() for t in proto.graph.initializer)
    assert s["estimated_size_mb"] <= 0.26
    assert tensors <= 0.26e6
    # The pass's estimate is conservative (never under the file's tensor bytes) and close.
    assert 0.9 * s["estimated_size_mb"] <= tensors / 1e6 <= s["estimated_size_mb"]
    graph = onnx_size_bytes(path) - tensors
    assert onnx_size_bytes(path) <= 0.26e6 + graph
    assert len({row["weight_bits"] for row in r["layers"] if row.get("weight_bits")}) >= 2
    # Symmetric MatMulNBits carry no zero-point input; OPT-m searched the post-GELU fc2s.
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) < 4 or not n.input[3] for n in nbits)
    fc2 = [row for row in r["layers"] if row["name"].endswith("mlp.fc2")]
    assert fc2 and s["opt_m_layers"] == len(fc2)
    assert all(p["cosine"] > 0.99 for p in r["export"]["parity"])


def test_embeddings_are_searched_only_at_widths_their_operator_stores():
    # GatherBlockQuantized holds 4- or 8-bit codes: a 2-bit table would be stored as 8-bit
    from torch import nn

    from compress.passes.mixed_precision import _layer_size, _searched_widths

    emb, lin = nn.Embedding(1000, 64), nn.Linear(64, 64)
    assert _searched_widths(emb, [2, 3, 4, 8]) == [4, 8]
    assert _searched_widths(emb, [2, 3]) == [8]
    assert _searched_widths(lin, [2, 3, 4, 8]) == [2, 3, 4, 8]
    assert _layer_size(emb, (2, None), 32) == _layer_size(emb, (8, None), 32)
    assert _layer_size(emb, (4, None), 32) < _layer_size(emb, (8, None), 32) / 1.8
