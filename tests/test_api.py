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


def test_report_files_and_schema(tmp_path, tiny_vit_files):
    result = compress(parse_recipe(tiny_vit_recipe(tiny_vit_files)), out_dir=tmp_path)
    r = json.loads(result.report_path.read_text())
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
