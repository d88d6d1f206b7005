"""The quality gate sees speed and size: min_speedup per batch size, max_size_mb, their bounds,
and a compressed model slower than fp32 failing `min_speedup: 1.0` with exit 3."""

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from compress.cli import main
from compress.errors import DataError, RecipeError
from compress.evaluate.gate import describe_failure, performance_checks
from compress.recipe import parse_recipe
from compress.specs import GateSpec
from tests.helpers import make_tiny_vit, tiny_vit_recipe, write_recipe


def test_min_speedup_number_applies_to_every_measured_batch_size():
    checks = performance_checks(GateSpec(min_speedup=1.0), {"1": 0.361, "8": 1.25}, 10**6)
    assert [(c["metric"], c["value"], c["passed"]) for c in checks] == [
        ("speedup_batch_1", 0.361, False), ("speedup_batch_8", 1.25, True)]
    assert describe_failure(checks[0]) == (
        "speedup at batch 1 is 0.36 (compressed is 2.77× slower than fp32), the gate wants at "
        "least 1 (evaluation.gate.min_speedup)")


def test_min_speedup_mapping_checks_only_the_batch_sizes_named():
    checks = performance_checks(GateSpec(min_speedup={8: 1.2}), {"1": 0.5, "8": 1.25}, 1)
    assert [(c["metric"], c["limit"], c["passed"]) for c in checks] == [
        ("speedup_batch_8", 1.2, True)]


def test_min_speedup_without_latency_numbers_is_an_error_not_a_pass():
    with pytest.raises(DataError, match="evaluation.gate.min_speedup needs latency"):
        performance_checks(GateSpec(min_speedup=1.0), None, 1)


def test_max_size_mb_compares_megabytes():
    ok, = performance_checks(GateSpec(max_size_mb=0.5), None, 400_000)
    bad, = performance_checks(GateSpec(max_size_mb=0.3), None, 400_000)
    assert (ok["value"], ok["passed"], bad["passed"]) == (0.4, True, False)
    assert describe_failure(bad) == "size_mb is 0.4, the gate wants at most 0.3"


@pytest.mark.parametrize("field, value, fragment", [
    ("min_speedup", 0, "greater than 0"),
    ("min_speedup", 101, "less than or equal to 100"),
    ("min_speedup", {1: -1}, "greater than 0"),
    ("min_speedup", {0: 1.0}, "greater than or equal to 1"),
    ("min_speedup", float("nan"), "finite number"),
    ("max_size_mb", 0, "greater than 0"),
    ("max_size_mb", 2e6, "less than or equal to 1000000"),
])
def test_gate_bounds(field, value, fragment):
    with pytest.raises(ValidationError, match=fragment):
        GateSpec(**{field: value})


def _recipe(files, gate, **latency):
    r = tiny_vit_recipe(files)
    r["evaluation"]["gate"] = gate
    r["evaluation"]["latency"].update(latency)
    return r


def test_min_speedup_without_latency_is_a_recipe_error_naming_the_field(tiny_vit_files):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_recipe(tiny_vit_files, {"min_speedup": 1.0}, enabled=False))
    assert e.value.errors[0][0] == "evaluation"
    assert "gate.min_speedup needs latency measured" in e.value.errors[0][1]
    with pytest.raises(RecipeError) as e:
        parse_recipe(_recipe(tiny_vit_files, {"min_speedup": {8: 1.0}}, batch_sizes=[1, 2]))
    assert "gate.min_speedup names batch size(s) [8] that are not measured" in str(e.value)
    parse_recipe(_recipe(tiny_vit_files, {"min_speedup": {2: 1.0}, "max_size_mb": 5}))


def test_slower_compressed_model_fails_min_speedup_with_exit_3(tmp_path, tiny_vit_files,
                                                                monkeypatch):
    """The issue's digits_vit_mixed case: 0.75 ms -> 2.08 ms at batch 1 passed the gate as
    "0.362× faster". ORT timing of a tiny model is noise, so the latency stage's measurement is
    replaced by those numbers; the gate, report and summary code are the real ones. The pass is
    int4 weight-only, which moves Linear weights into buffers: the parameter count of the
    report must still be the original model's."""
    import compress.api

    monkeypatch.setattr(compress.api, "measure_latencies", lambda *a, **k: {
        "original": {"1": 0.75}, "compressed": {"1": 2.08}})
    r = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only", "method": "rtn",
                                                 "block_size": 16}])
    r["evaluation"]["gate"] = {"min_speedup": 1.0, "max_size_mb": 100}
    r["evaluation"]["latency"]["batch_sizes"] = [1]
    r["export"]["verify_batch_sizes"] = [1]
    path = write_recipe(tmp_path / "recipe.yaml", r)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 3, res.output
    assert "speed:  batch 1: 2.77× slower" in res.output
    assert "  - speedup at batch 1 is 0.36 (compressed is 2.77× slower than fp32)" in res.output
    verdict_line = next(x for x in res.output.splitlines() if x.startswith("verdict: "))
    assert verdict_line.startswith("verdict: smaller by ")
    assert "slower by 2.77× at batch 1, accuracy change " in verdict_line
    assert "points (top-1, 95% CI, n=16), gate failed" in verdict_line

    report = json.loads((out / "report.json").read_text())
    checks = {c["metric"]: c for c in report["gate"]["checks"]}
    assert checks["speedup_batch_1"] == {"metric": "speedup_batch_1", "limit": 1.0,
                                         "value": 0.361, "passed": False}
    assert checks["size_mb"]["passed"] and report["gate"]["passed"] is False
    assert report["verdict"]["speed"] == [{"batch": "1", "ratio": 0.361,
                                           "words": "2.77× slower", "slower": True}]
    html = (out / "report.html").read_text()
    assert '<td class="num bad">2.77× slower</td>' in html
    assert '<span class="bad">slower by 2.77× at batch 1</span>' in html
    assert "faster" not in html.split('id="verdict"')[1].split("</p>")[0]

    original = sum(p.numel() for p in make_tiny_vit().parameters())
    assert report["model"]["params"] == original == 264_650
    assert report["model"]["params_counted"].startswith("parameters of the original model")
    assert f"{original:,} parameters (original model)" in html
