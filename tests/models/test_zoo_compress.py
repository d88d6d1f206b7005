"""A fast subset of the model zoo end to end through compress(): W8A8, fast INT8 and INT4.

tests/models/test_zoo.py runs each pass on its own; here the same tiny members (zoo build
path, tiny configs) go through the whole pipeline a user runs: load, calibration on crops of
real photos or real sentences, the passes, ONNX export with ORT parity, and evaluation in
ONNX Runtime. One member per kind the generic path tells apart: a plain ViT with a
distillation token (torch engine, fused attention), a windowed ViT, a CNN (graph engine: Q/DQ
placed on the exported graph) and the DistilBERT folder that used to crash W8A8 with
``add_pooling_layer``. Eight compress() runs, about 100 s of CPU time in all.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from compress.api import compress
from compress.models.zoo import BY_KEY, TINY_INPUT, build_member
from compress.recipe import parse_recipe

IMAGE_MEMBERS = ["deit_tiny_distilled", "swin_tiny", "convnext_atto"]
TEXT_MEMBERS = ["hf_distilbert"]
ROOT = Path(__file__).resolve().parents[2]


def _photo_crops(n: int, side: int, seed: int) -> np.ndarray:
    """``n`` normalised crops of scikit-learn's two sample photos, ``side`` px square."""
    import torch
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        crop = torch.from_numpy(img[y:y + s, x:x + s].astype(np.float32) / 255).permute(2, 0, 1)
        out.append(torch.nn.functional.interpolate(crop[None], size=(side, side),
                                                   mode="bilinear", antialias=True)[0])
    x = torch.stack(out)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((x - mean) / std).numpy()


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("zoo_e2e")
    built = {}
    for key in IMAGE_MEMBERS:
        side = TINY_INPUT[key]
        spec = build_member(BY_KEY[key], d / key, tiny=True)
        np.savez(d / key / "calib.npz", x=_photo_crops(32, side, 0))
        np.savez(d / key / "eval.npz", x=_photo_crops(32, side, 1))
        built[key] = {"model": spec, "calib": str(d / key / "calib.npz"),
                      "eval": str(d / key / "eval.npz")}
    texts = resources.files("compress.reference") / "texts"
    for key in TEXT_MEMBERS:
        spec = build_member(BY_KEY[key], d / key, tiny=True)
        for role in ("calib", "eval"):
            (d / f"{role}.txt").write_text((texts / f"{role}.txt").read_text())
        built[key] = {"model": spec, "calib": str(d / "calib.txt"), "eval": str(d / "eval.txt")}
    return built


def _fast_int8_passes() -> tuple[list[dict], dict]:
    """The bundled fast-INT8 recipe's passes and export block, whatever they are today."""
    import yaml

    r = yaml.safe_load((ROOT / "recipes" / "deit_small_int8_fast.yaml").read_text())
    return r["passes"], r.get("export", {})


def _run(member: dict, passes: list[dict], out: Path, export: dict | None = None) -> dict:
    recipe = {
        "version": 1, "name": "zoo-e2e", "model": member["model"],
        "calibration": {"path": member["calib"], "num_samples": 32, "batch_size": 16},
        "evaluation": {"path": member["eval"], "num_samples": 32, "batch_size": 16,
                       "latency": {"enabled": False}},
        "passes": passes,
        "export": {"verify_batch_sizes": [1, 4], **(export or {})},
    }
    result = compress(parse_recipe(recipe), out_dir=out)
    assert result.exit_code == 0, result.gate_failures
    assert result.model_path.is_file()
    report = json.loads(result.report_path.read_text())
    assert all(p["cosine_mean"] > 0.99 for p in report["export"]["parity"]
               if "cosine_mean" in p), report["export"]["parity"]
    return report


def _fidelity_ok(report: dict, task_text: bool, min_agreement: float, min_cosine: float):
    m = report["metrics"]["compressed"]
    if task_text:
        assert m["cosine_mean"] >= min_cosine, m
    else:
        assert m["top1_agreement"] >= min_agreement, m


@pytest.mark.parametrize("key", IMAGE_MEMBERS + TEXT_MEMBERS)
def test_w8a8_end_to_end(members, key, tmp_path):
    report = _run(members[key], [{"type": "quantize"}], tmp_path)
    # Tiny random members have near-uniform logits (a few flips out of 32 are noise); the
    # figure that separates a working INT8 model from a broken one is the logit error.
    _fidelity_ok(report, key in TEXT_MEMBERS, 0.75, 0.99)
    if key not in TEXT_MEMBERS:
        assert report["metrics"]["compressed"]["logits_rel_error"] < 0.15
    summary = report["passes"][0]["summary"]
    assert summary.get("quantized_layers", 0) > 0 or summary.get("quantize_nodes", 0) > 0
    if key not in TEXT_MEMBERS:  # a tiny text encoder is its 30522-row embedding table (float)
        assert report["size"]["ratio"] > 1.2


# Fast INT8 on a CNN is the graph engine W8A8 runs above (smooth_quant finds no pair there):
# the two members where its fused attention and smoothing do something are enough for CI.
@pytest.mark.parametrize("key", ["deit_tiny_distilled", "hf_distilbert"])
def test_fast_int8_end_to_end(members, key, tmp_path):
    passes, export = _fast_int8_passes()
    report = _run(members[key], passes, tmp_path, export)
    _fidelity_ok(report, key in TEXT_MEMBERS, 0.75, 0.99)


@pytest.mark.parametrize("key", ["swin_tiny", "convnext_atto"])
def test_int4_weight_only_end_to_end(members, key, tmp_path):
    report = _run(members[key], [{"type": "weight_only", "bits": 4, "block_size": 16}],
                  tmp_path)
    assert report["metrics"]["compressed"]["logits_rel_error"] < 0.5
    assert report["size"]["ratio"] > 2
