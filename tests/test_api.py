"""compress() end to end: reports, gate exit codes, and the done-when numbers of the foundation."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress import compress
from compress.cli import main
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe, write_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


def _refuse_constant(constant):
    raise ValueError(f"report.json holds bare {constant}, which strict JSON parsers refuse")


def test_report_files_and_schema(tmp_path, tiny_vit_files):
    script = "<script>alert(1)</script>"
    recipe = tiny_vit_recipe(tiny_vit_files, name=f"tiny {script}", description=f"d {script}")
    result = compress(parse_recipe(recipe), out_dir=tmp_path)
    r = json.loads(result.report_path.read_text(), parse_constant=_refuse_constant)
    assert r["schema_version"] == 1
    for key in ("recipe", "model", "data", "passes", "layers", "metrics", "gate", "size",
                "latency", "export", "stages", "environment"):
        assert key in r
    assert set(r["latency"]["original"]) == {"1", "2"}
    assert r["latency"]["threads"] >= 1
    names = {a["name"] for a in r["export"]["artifacts"]}
    assert {"model.onnx", "model.fp32.onnx", "recipe.yaml", "plots/layers.png"} <= names
    assert all(len(a["sha256"]) == 64 for a in r["export"]["artifacts"])
    html = result.html_path.read_text()
    assert "Per-layer" in html and "data:image/png;base64," in html
    assert r["environment"]["versions"]["onnxruntime"]
    # The recipe's name and description are the tenant's text: escaped, never markup.
    assert "<script" not in html
    assert "<h1>Compression report: tiny &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in html
    assert "<p>d &lt;script&gt;alert(1)&lt;/script&gt;</p>" in html


def test_non_finite_outputs_are_bad_input():
    import numpy as np

    from compress.api import check_outputs_finite
    from compress.errors import NonFiniteError

    out = np.zeros((5, 10), np.float32)
    check_outputs_finite(out, "evaluation data 'eval.npz'")
    out[3, 1], out[4, 0] = np.nan, -np.inf
    with pytest.raises(NonFiniteError, match=r"outputs on evaluation data 'eval.npz' hold NaN or "
                                             r"Inf for 2 of 5 samples \(first: sample 3\)") as e:
        check_outputs_finite(out, "evaluation data 'eval.npz'")
    assert e.value.exit_code == 2


def test_gate_failure_exits_3_and_still_writes_report(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files)
    recipe["evaluation"]["gate"] = {"max_kl": 0.0}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    res = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "o"), "--json",
                                    "--no-progress"])
    assert res.exit_code == 3, res.output
    payload = json.loads(res.output.strip().splitlines()[-1])
    assert payload["status"] == "gate_failed"
    assert payload["gate"]["checks"][0]["metric"] == "kl"
    assert (tmp_path / "o" / "report.json").is_file()


def test_no_passes_exports_fp32(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[])
    del recipe["calibration"]
    r = compress(parse_recipe(recipe), out_dir=tmp_path).report
    assert r["metrics"]["compressed"]["top1_agreement"] == 1.0
    assert abs(r["size"]["ratio"] - 1) < 0.01


def test_progress_reaches_one_and_stages_are_timed(tmp_path, tiny_vit_files):
    seen = []
    r = compress(parse_recipe(tiny_vit_recipe(tiny_vit_files)), out_dir=tmp_path,
                 progress=lambda stage, frac, msg: seen.append((stage, frac))).report
    fracs = [f for _, f in seen]
    assert fracs == sorted(fracs) and fracs[-1] == pytest.approx(1.0)
    assert {"load", "passes", "export", "evaluate", "latency"} <= set(r["stages"])


def test_cancel_from_progress_callback(tmp_path, tiny_vit_files):
    from compress.errors import CancelledError

    def cancel(stage, frac, msg):
        if stage == "passes":
            raise CancelledError("cancelled by user")

    with pytest.raises(CancelledError):
        compress(parse_recipe(tiny_vit_recipe(tiny_vit_files)), out_dir=tmp_path, progress=cancel)


def test_imagefolder_calibration(tmp_path, digits_reference):
    """The digits PNG folders go through timm preprocessing and agree with the npz arrays."""
    recipe = RECIPES / "digits_vit_w8a8.yaml"
    r = compress(recipe, calib=str(digits_reference / "calib_images"),
                 eval=str(digits_reference / "eval_images"), out_dir=tmp_path,
                 overrides=["evaluation.latency.enabled=false"]).report
    assert r["data"]["evaluation"]["format"] == "imagefolder"
    assert r["data"]["evaluation"]["labeled"]
    assert r["metrics"]["original"]["top1"] > 0.95


@pytest.mark.slow
def test_digits_vit_w8a8_meets_the_foundation_target(tmp_path, digits_reference):
    meta = json.loads((digits_reference / "meta.json").read_text())
    assert meta["test_accuracy"] >= 0.97
    result = compress(RECIPES / "digits_vit_w8a8.yaml", out_dir=tmp_path)
    r = result.report
    assert r["metrics"]["original"]["top1"] >= 0.97
    assert r["metrics"]["drop"]["top1_points"] <= 0.5
    assert result.gate_passed


@pytest.mark.slow
def test_minilm_w8a8_cosine(tmp_path):
    result = compress(RECIPES / "minilm_w8a8.yaml", out_dir=tmp_path,
                      overrides=["evaluation.latency.repeats=3"])
    assert result.report["metrics"]["compressed"]["cosine_mean"] >= 0.99
    assert result.gate_passed


def test_external_data_export(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, export={"external_data": "always",
                                                     "verify_batch_sizes": [2]})
    r = compress(parse_recipe(recipe), out_dir=tmp_path).report
    assert "model.onnx.data" in r["export"]["files"]
    assert (tmp_path / "model.onnx").stat().st_size < 200_000  # weights live in the side file
    assert r["size"]["compressed_bytes"] > (tmp_path / "model.onnx").stat().st_size
    assert r["export"]["parity"][0]["cosine"] > 0.999


def test_report_names_given_files_without_their_folder(tmp_path, tiny_vit_files):
    # The service passes uploads as model/calib/eval; the report must not show its data folder.
    recipe = parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[],
                                          evaluation={"latency": {"enabled": False}}))
    result = compress(recipe, model=str(tiny_vit_files["pt"]), calib=str(tiny_vit_files["calib"]),
                      eval=str(tiny_vit_files["eval"]), out_dir=tmp_path / "out")
    folder = str(tiny_vit_files["dir"])
    for f in ("report.json", "report.html", "recipe.yaml"):
        assert folder not in (tmp_path / "out" / f).read_text(), f
    r = result.report
    assert r["model"]["path"] == "model.pt" and r["recipe"]["model"]["weights"] == "model.pt"
    assert r["recipe"]["calibration"]["path"] == "calib.npz"
    assert r["data"]["evaluation"]["path"] == "eval.npz"
    assert r["data"]["calibration"]["path"] == "calib.npz"


def test_original_param_count_of_an_onnx_model_counts_float_initializers(tmp_path):
    """ONNX models have no torch parameters: the report counts the elements of the original
    file's floating-point initializers (an int64 shape constant is not a parameter)."""
    from types import SimpleNamespace

    import numpy
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from compress.api import _original_param_count

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(numpy.ones((4, 3), numpy.float32), "w"),
         numpy_helper.from_array(numpy.array([1, 4], numpy.int64), "shape")])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    handle = SimpleNamespace(module=None, onnx_path=tmp_path / "m.onnx")
    assert _original_param_count(handle) == 12
