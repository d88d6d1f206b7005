"""The bundled Vision Mamba recipes: they validate, and their passes run end to end on a tiny
Vim (the recipe's passes and export settings, a random 2-layer model in place of the digits Vim
so that no reference has to be trained)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from compress.api import compress
from compress.models.vim import VimConfig, VisionMamba
from compress.recipe import Recipe

RECIPES = Path(__file__).parents[2] / "recipes"
VIM_RECIPES = ("digits_vim_w8a8", "digits_vim_int4", "vim_tiny_w8a8")
SIZES = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2,
         "d_state": 4, "num_classes": 10}


@pytest.mark.parametrize("name", VIM_RECIPES)
def test_vim_recipes_validate(name):
    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    recipe = Recipe.model_validate(data)
    assert recipe.model.source == "vim"


@pytest.fixture(scope="module")
def tiny_vim_files(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_vim")
    torch.manual_seed(0)
    model = VisionMamba(VimConfig(**SIZES)).eval()
    with torch.no_grad():   # larger than the training init, so that quantization is visible
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"))
    x = np.random.default_rng(0).standard_normal((64, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(d / "calib.npz", x=x[:32])
    np.savez(d / "eval.npz", x=x[32:], labels=labels[32:].astype(np.int64))
    return {"weights": d / "model.safetensors", "calib": d / "calib.npz", "eval": d / "eval.npz"}


def _run_on_tiny(name: str, files: dict[str, Path], out: Path) -> dict:
    return _run_on_tiny_recipe(RECIPES / f"{name}.yaml", files, out)


def _run_on_tiny_recipe(path: Path, files: dict[str, Path], out: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["model"]["vim"] = {**SIZES, "scan": data["model"]["vim"].get("scan", "loop")}
    data["model"]["weights"] = str(files["weights"])
    data["calibration"].update(path=str(files["calib"]), num_samples=32, batch_size=16)
    data["evaluation"].update(path=str(files["eval"]), num_samples=32, batch_size=16)
    data["evaluation"]["latency"] = {"batch_sizes": [1, 2], "repeats": 2, "warmup": 1}
    data["evaluation"]["gate"] = {}
    (out / "recipe.yaml").write_text(yaml.safe_dump(data))
    compress(out / "recipe.yaml", out_dir=out / "run")
    return json.loads((out / "run" / "report.json").read_text())


@pytest.mark.slow
def test_digits_vim_w8a8_recipe_exports_scan_nodes_and_matches_torch(tiny_vim_files, tmp_path):
    report = _run_on_tiny("digits_vim_w8a8", tiny_vim_files, tmp_path)
    graph = onnx.load(str(tmp_path / "run" / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Scan") == 2 * SIZES["depth"]      # two directions per layer
    assert ops.count("QuantizeLinear") > 0
    assert all(p["cosine"] >= 0.9999 for p in report["export"]["parity"])
    passes = {p["type"]: p["summary"] for p in report["passes"]}
    assert passes["smooth_quant"]["groups"] == SIZES["depth"]     # RMSNorm -> in_proj
    assert passes["smooth_quant"]["folded"] == SIZES["depth"]
    # in_proj, x_proj(+_b), dt_proj(+_b), out_proj per layer, the head and the patch embedding
    assert passes["quantize"]["quantized_layers"] == 6 * SIZES["depth"] + 2
    assert report["metrics"]["compressed"]["top1_agreement"] >= 0.8


@pytest.mark.slow
def test_digits_vim_int4_recipe_runs(tiny_vim_files, tmp_path):
    report = _run_on_tiny("digits_vim_int4", tiny_vim_files, tmp_path)
    passes = {p["type"]: p["summary"] for p in report["passes"]}
    # in_proj, x_proj(+_b), out_proj per layer and the head; dt_proj ignored
    assert passes["weight_only"]["quantized_layers"] == 4 * SIZES["depth"] + 1
    assert passes["weight_only"]["bits"] == 4
    # ORT's 4-bit MatMulNBits kernel accumulates in its own order: 0.99985 on this model
    assert all(p["cosine"] >= 0.999 for p in report["export"]["parity"])


@pytest.mark.slow
@pytest.mark.parametrize("scan,scan_nodes", [("scan", 2 * SIZES["depth"]), ("loop", 0)])
def test_fp32_export_matches_torch(tiny_vim_files, tmp_path, scan, scan_nodes):
    data = yaml.safe_load((RECIPES / "digits_vim_w8a8.yaml").read_text())
    data["model"]["vim"]["scan"] = scan
    data["passes"] = []
    (tmp_path / "digits_vim_fp32.yaml").write_text(yaml.safe_dump(data))
    data_dir = tmp_path / "in"
    data_dir.mkdir()
    report = _run_on_tiny_recipe(tmp_path / "digits_vim_fp32.yaml", tiny_vim_files, data_dir)
    ops = [n.op_type for n in onnx.load(str(data_dir / "run" / "model.onnx")).graph.node]
    assert ops.count("Scan") == scan_nodes
    assert "QuantizeLinear" not in ops
    assert all(p["cosine"] >= 0.9999 for p in report["export"]["parity"])
    assert report["metrics"]["compressed"]["top1_agreement"] == 1.0
