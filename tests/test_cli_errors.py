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
    expect_bad_input(run_recipe(tmp_path, r), "'gpt2' model", "supported encoder families")


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
