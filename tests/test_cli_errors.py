"""Bad input of every kind exits with code 2 and a message that names the problem."""

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from tests.helpers import tiny_vit_recipe, write_recipe


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def run_recipe(tmp_path, recipe, *extra):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    return run_cli("run", path, "--out", tmp_path / "out", "--no-progress", *extra)


def expect_bad_input(code_and_output, *fragments):
    code, out = code_and_output
    assert code == 2, out
    for f in fragments:
        assert f in out, f"{f!r} not in:\n{out}"


def test_missing_recipe_file(tmp_path):
    expect_bad_input(run_cli("run", tmp_path / "missing.yaml"), "does not exist")


def test_invalid_yaml(tmp_path):
    (tmp_path / "r.yaml").write_text("version: 1\nmodel: {source: timm\n")
    expect_bad_input(run_cli("run", tmp_path / "r.yaml"), "not valid YAML")


def test_unknown_field(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "quantize", "bitz": 8}])
    expect_bad_input(run_recipe(tmp_path, r), "passes.0.bitz", "unknown field")


def test_unknown_pass(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "quantise"}])
    expect_bad_input(run_recipe(tmp_path, r), "unknown pass type 'quantise'", "quantize")


def test_json_error_output_has_field_path(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "quantize", "weights": {"bits": 9}}])
    code, out = run_recipe(tmp_path, r, "--json")
    assert code == 2
    payload = json.loads(out.splitlines()[0])
    assert payload["error"]["type"] == "RecipeError"
    assert payload["error"]["errors"][0]["loc"] == "passes.0.weights.bits"


def test_missing_weights_file(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files)
    r["model"]["weights"] = str(tmp_path / "nope.safetensors")
    expect_bad_input(run_recipe(tmp_path, r), "nope.safetensors", "does not exist")


def test_weights_with_wrong_extension(tmp_path, tiny_vit_files):
    (tmp_path / "w.ckpt").write_bytes(b"x")
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--model",
                                tmp_path / "w.ckpt"), "expected one of .safetensors")


def test_corrupt_safetensors(tmp_path, tiny_vit_files):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--model",
                                tmp_path / "bad.safetensors"), "cannot read weights file")


def test_pickled_object_is_refused(tmp_path, tiny_vit_files):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    code, out = run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--model",
                           tmp_path / "evil.pt")
    assert code == 2, out
    assert "pwned" not in out
    assert "cannot read weights file" in out


def test_weights_of_another_architecture_list_keys(tmp_path, tiny_vit_files):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--model",
                                tmp_path / "other.pt"),
                     "missing keys:", "unexpected keys: fc.weight")


def test_misshaped_weights(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files)
    r["model"]["kwargs"] = {**r["model"]["kwargs"], "num_classes": 7}
    expect_bad_input(run_recipe(tmp_path, r), "mis-shaped keys: head.weight (file (10, 64), "
                     "model (7, 64))")


def test_unknown_timm_architecture(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files)
    r["model"]["name"] = "deit_smal_patch16_224"
    expect_bad_input(run_recipe(tmp_path, r), "not a timm architecture",
                     "deit_small_patch16_224")


def test_bad_timm_kwargs(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files)
    r["model"]["kwargs"] = {**r["model"]["kwargs"], "num_clases": 10}
    expect_bad_input(run_recipe(tmp_path, r), "model.kwargs")


def test_hf_folder_without_config(tmp_path, tiny_vit_files):
    (tmp_path / "hf").mkdir()
    r = {"version": 1, "model": {"source": "hf", "path": str(tmp_path / "hf")},
         "evaluation": {"path": str(tiny_vit_files["eval"])}}
    expect_bad_input(run_recipe(tmp_path, r), "has no config.json")


def test_hf_unsupported_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = {"version": 1, "model": {"source": "hf", "path": str(tmp_path / "hf")}}
    expect_bad_input(run_recipe(tmp_path, r), "'gpt2' model", "supported for text-embedding: bert")


def test_hf_custom_code_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}}))
    expect_bad_input(run_recipe(tmp_path, {"version": 1, "model": {
        "source": "hf", "path": str(tmp_path / "hf")}}), "never runs code")


def test_hf_pickle_weights_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"x")
    expect_bad_input(run_recipe(tmp_path, {"version": 1, "model": {
        "source": "hf", "path": str(tmp_path / "hf")}}), "no .safetensors weights")


def test_missing_calibration_data(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files)
    r["calibration"]["path"] = str(tmp_path / "none.npz")
    expect_bad_input(run_recipe(tmp_path, r), "calibration.path", "does not exist")


def test_calibration_wrong_shape(tmp_path, tiny_vit_files):
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 3, 16, 16), np.float32))
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--calib",
                                tmp_path / "small.npz"),
                     "shape [4, 3, 16, 16]", "expects [N, 3, 32, 32]")


def test_npz_with_object_array_refused(tmp_path, tiny_vit_files):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--calib",
                                tmp_path / "obj.npz"), "without pickle")


def test_text_data_for_image_model(tmp_path, tiny_vit_files):
    (tmp_path / "t.txt").write_text("hello world\n")
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--calib",
                                tmp_path / "t.txt"), "image classifier")


def test_labels_of_wrong_length(tmp_path, tiny_vit_files):
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 3, 32, 32), np.float32),
             labels=np.zeros(3, np.int64))
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--eval",
                                tmp_path / "e.npz"), "one label per input")


def test_accuracy_gate_without_labels(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files, passes=[])
    r["evaluation"]["path"] = str(tiny_vit_files["calib"])  # unlabeled
    r["evaluation"]["gate"] = {"max_accuracy_drop": 1.0}
    r["evaluation"]["latency"]["enabled"] = False
    expect_bad_input(run_recipe(tmp_path, r), "max_accuracy_drop", "no labels")


def test_invalid_onnx_file(tmp_path, tiny_vit_files):
    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    r = {"version": 1, "model": {"source": "onnx", "path": str(tmp_path / "m.onnx")},
         "evaluation": {"path": str(tiny_vit_files["eval"])}}
    expect_bad_input(run_recipe(tmp_path, r), "not a valid ONNX model")


def test_out_is_a_file(tmp_path, tiny_vit_files):
    (tmp_path / "file").write_text("x")
    path = write_recipe(tmp_path / "recipe.yaml", tiny_vit_recipe(tiny_vit_files))
    expect_bad_input(run_cli("run", path, "--out", tmp_path / "file"), "is a file")


def test_target_that_matches_nothing(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "quantize", "ignore": ["heads"]}])
    expect_bad_input(run_recipe(tmp_path, r), "passes.0.ignore[0] 'heads' matches no module")


def test_unknown_cli_option():
    code, out = run_cli("run", "x.yaml", "--bogus")
    assert code == 2 and "No such option" in out


@pytest.mark.parametrize("bad", ["passes.0.weights.bits=9", "nonsense"])
def test_bad_set_override(tmp_path, tiny_vit_files, bad):
    path = write_recipe(tmp_path / "recipe.yaml", tiny_vit_recipe(tiny_vit_files))
    expect_bad_input(run_cli("run", path, "--set", bad, "--out", tmp_path / "o"))


def test_recipe_validate_command(tmp_path, tiny_vit_files):
    good = write_recipe(tmp_path / "good.yaml", tiny_vit_recipe(tiny_vit_files))
    code, out = run_cli("recipe", "validate", good)
    assert code == 0 and "ok (1 pass: quantize)" in out
    bad = write_recipe(tmp_path / "bad.yaml", {"version": 1})
    code, out = run_cli("recipe", "validate", bad)
    assert code == 2 and "model: Field required" in out


def test_recipe_schema_command():
    code, out = run_cli("recipe", "schema")
    assert code == 0
    schema = json.loads(out)
    assert "quantize" in schema["properties"]["passes"]["items"]["discriminator"]["mapping"]


# --------------------------------------------------------------------------- hardening (issue 14)

def test_checkpoint_path_kwarg_never_reaches_timm(tmp_path, tiny_vit_files):
    # A loadable checkpoint elsewhere on the machine: before the allow-list, timm loaded it and
    # the run succeeded.
    r = tiny_vit_recipe(tiny_vit_files)
    r["model"]["kwargs"] = {**r["model"]["kwargs"], "checkpoint_path": str(tiny_vit_files["pt"])}
    expect_bad_input(run_recipe(tmp_path, r), "model.kwargs.checkpoint_path",
                     "not allowed in model.kwargs", "Allowed: num_classes")
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--set",
                                f"model.kwargs.checkpoint_path={tiny_vit_files['pt']}"),
                     "model.kwargs.checkpoint_path", "not allowed")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_nan_weights_exit_2_naming_the_tensor(tmp_path, tiny_vit_files):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_vit_files["weights"]))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    code, out = run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--model",
                           tmp_path / "nan.safetensors", "--json")
    assert code == 2, out
    error = json.loads(out.splitlines()[0])["error"]
    assert error["type"] == "NonFiniteError"
    assert "weights file 'nan.safetensors'" in error["message"]
    assert "head.weight (1 of 640 values)" in error["message"]


def test_weights_that_overflow_on_the_data_exit_2(tmp_path, tiny_vit_files):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_vit_files["weights"]))
    state["head.weight"] = torch.full_like(state["head.weight"], 3e38)  # finite; logits overflow
    save_file(state, str(tmp_path / "big.safetensors"))
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--model",
                                tmp_path / "big.safetensors"),
                     "the original model's outputs on evaluation data '",
                     "eval.npz' hold NaN or Inf",
                     "for 16 of 16 samples")


def test_empty_npz_calibration_exits_2(tmp_path, tiny_vit_files):
    (tmp_path / "calib.npz").write_bytes(b"")
    expect_bad_input(run_recipe(tmp_path, tiny_vit_recipe(tiny_vit_files), "--calib",
                                tmp_path / "calib.npz"),
                     "calibration.path 'calib.npz' is empty (0 bytes)", "numpy.savez")


def test_missing_checkpoint_names_the_path_as_given(tmp_path, tiny_vit_files):
    r = tiny_vit_recipe(tiny_vit_files)
    r["model"]["weights"] = "models/missing.safetensors"   # relative to the recipe's folder
    code, out = run_recipe(tmp_path, r)
    expect_bad_input((code, out), "model.weights 'models/missing.safetensors' does not exist",
                     "expected a .safetensors or .pt weights file")
    assert str(tmp_path) not in out


# ------------------------------------------------------------------ CLI papercuts (issue 15)

def test_recipe_list_shows_every_bundled_recipe():
    from compress.bundled import RECIPES_DIR

    code, out = run_cli("recipe", "list")
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == len(list(RECIPES_DIR.glob("*.yaml")))
    w8a8 = next(x for x in lines if x.startswith("digits_vit_w8a8 "))
    assert "timm:vit_tiny_patch16_224  [quantize]  digits ViT, int8 weights per channel" in w8a8
    minilm = next(x for x in lines if x.startswith("minilm_int4 "))
    assert "hf:reference:minilm/model  [weight_only]" in minilm
    code, out = run_cli("recipe", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["digits_vit_w8a8"]["passes"] == ["quantize"]


def test_run_takes_a_bundled_recipe_name_and_a_file_wins(tmp_path, monkeypatch):
    # The --set error is raised after the recipe is read and before anything runs: it shows
    # which recipe `run` picked without running a job.
    code, out = run_cli("run", "digits_vit_w8a8", "--set", "passes.0.weights.bits=x",
                        "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and "recipes/digits_vit_w8a8.yaml" in out, out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_vit_w8a8").write_text("version: 1\n")
    code, out = run_cli("run", "digits_vit_w8a8", "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and "digits_vit_w8a8: invalid recipe" in out and "model: Field required" \
        in out and "recipes/" not in out
    code, out = run_cli("run", "no_such_recipe", "--out", tmp_path / "o")
    assert code == 2 and "recipe file 'no_such_recipe' does not exist" in out


def test_set_error_names_the_override_not_the_file(tmp_path, tiny_vit_files):
    path = write_recipe(tmp_path / "recipe.yaml", tiny_vit_recipe(tiny_vit_files))
    code, out = run_cli("run", path, "--set", "passes.0.weights.bits=x", "--out", tmp_path / "o")
    assert code == 2
    assert out.startswith(f"error: --set passes.0.weights.bits=x (on {path}): invalid recipe")
    assert "passes.0.weights.bits: Input should be 2, 3, 4, 5, 6, 7 or 8 (got 'x') " \
           "(from --set passes.0.weights.bits=x)" in out
    code, out = run_cli("run", path, "--set", "evaluation.gate.min_speedup=1",
                        "--set", "evaluation.latency.enabled=false", "--out", tmp_path / "o")
    assert code == 2 and "error: --set evaluation.latency.enabled=false (on " in out
    assert "gate.min_speedup needs latency measured" in out
    # an error in the file itself still names the file
    bad = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "quantize", "bitz": 8}])
    path = write_recipe(tmp_path / "bad.yaml", bad)
    code, out = run_cli("run", path, "--set", "evaluation.num_samples=8", "--out", tmp_path / "o")
    assert code == 2 and out.startswith(f"error: {path}: invalid recipe")
    assert "from --set" not in out


def test_non_empty_out_is_refused_without_overwrite(tmp_path, tiny_vit_files):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "report.json").write_text("{}")
    (out_dir / "notes.txt").write_text("mine")
    path = write_recipe(tmp_path / "recipe.yaml", tiny_vit_recipe(tiny_vit_files))
    code, out = run_cli("run", path, "--out", out_dir, "--json")
    assert code == 2
    error = json.loads(out.splitlines()[0])["error"]
    assert error["type"] == "InputError"
    assert f"--out '{out_dir}' is not empty" in error["message"]
    assert "pass --overwrite" in error["message"]
    assert (out_dir / "report.json").read_text() == "{}"
    # a bad recipe is reported before --out is looked at
    code, out = run_cli("run", path, "--out", out_dir, "--set", "x.y=1")
    assert code == 2 and "x: unknown field" in out and "--overwrite" not in out
    # --overwrite removes the earlier run's results (and only those) before the run; the
    # missing weights file then stops this run before it writes anything
    code, out = run_cli("run", path, "--out", out_dir, "--overwrite", "--model",
                        tmp_path / "nope.safetensors")
    assert code == 2 and "nope.safetensors' does not exist" in out
    assert not (out_dir / "report.json").exists() and (out_dir / "notes.txt").exists()


def test_help_is_fast_and_imports_nothing_heavy():
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).parents[1]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compress", "--help"], capture_output=True,
                          text=True, cwd=repo, timeout=60)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0 and "submit" in proc.stdout and "run" in proc.stdout
    assert seconds < 3, f"compress --help took {seconds:.2f} s"   # ~0.3 s measured
    probe = ("import sys, compress.cli; from click.testing import CliRunner; "
             "CliRunner().invoke(compress.cli.main, ['--help']); "
             "print(sorted(m for m in ('torch', 'timm', 'onnx', 'onnxruntime', 'fastapi', "
             "'transformers', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=repo, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
