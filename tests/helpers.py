"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

TINY_VIT = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 10}}


def make_tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model(TINY_VIT["name"], pretrained=False, **TINY_VIT["kwargs"]).eval()


def tiny_vit_recipe(files: dict[str, Path], passes: list[dict] | None = None, **extra) -> dict:
    recipe = {
        "version": 1,
        "name": "tiny-vit",
        "model": {"source": "timm", **TINY_VIT, "weights": str(files["weights"])},
        "calibration": {"path": str(files["calib"]), "num_samples": 32, "batch_size": 16},
        "evaluation": {"path": str(files["eval"]), "num_samples": 16, "batch_size": 8,
                       "latency": {"batch_sizes": [1, 2], "repeats": 2, "warmup": 1}},
        "passes": passes if passes is not None else [{"type": "quantize"}],
        "export": {"verify_batch_sizes": [1, 3]},
    }
    recipe.update(extra)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
