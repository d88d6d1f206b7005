"""ONNX metadata, timm's config.json and the model card of an output folder, read back with
the consumers' own code (onnxruntime, timm) and the card's snippet run as written."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from compress.api import compress
from compress.export.metadata import canonical_json, recipe_sha256, source_weights_sha256
from compress.export.ort import make_session
from compress.recipe import parse_recipe
from compress.report.card import FOLDER
from tests.helpers import TINY_VIT, tiny_vit_recipe

KEYS = {"producer", "compress_version", "recipe_sha256", "source_weights_sha256", "task",
        "inputs", "outputs", "preprocessing"}


def _write_class_folders(root: Path, n: int = 6) -> Path:
    """An image-folder evaluation set with class folders named after digits (10 classes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(n // 6 + 1):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, tiny_vit_files):
    tmp = tmp_path_factory.mktemp("timm_meta")
    eval_dir = _write_class_folders(tmp / "eval")
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only", "method": "rtn",
                                                      "block_size": 16}])
    recipe["evaluation"] = {"path": str(eval_dir), "batch_size": 8,
                            "latency": {"batch_sizes": [1], "repeats": 2, "warmup": 1}}
    result = compress(parse_recipe(recipe), out_dir=tmp / "out")
    return result, tmp


def test_every_onnx_file_carries_the_metadata(timm_run, tiny_vit_files):
    result, _ = timm_run
    out = result.out_dir
    recipe_shown = yaml.safe_load((out / "recipe.yaml").read_text())
    expected_sha = hashlib.sha256(tiny_vit_files["weights"].read_bytes()).hexdigest()
    for name in ("model.onnx", "model.fp32.onnx"):
        sess = make_session(out / name)
        meta = sess.get_modelmeta().custom_metadata_map
        assert KEYS <= set(meta), name
        assert meta["producer"] == "compress"
        assert meta["recipe_sha256"] == hashlib.sha256(
            canonical_json(recipe_shown).encode()).hexdigest()
        assert meta["source_weights_sha256"] == expected_sha
        inputs = json.loads(meta["inputs"])
        assert [i["name"] for i in inputs] == [i.name for i in sess.get_inputs()]
        assert inputs[0]["shape"] == ["batch", 3, 32, 32]
        assert json.loads(meta["outputs"])[0]["name"] == sess.get_outputs()[0].name
        # The class folders of the evaluation set, in the order the loader numbered them.
        assert json.loads(meta["labels"]) == [f"class_{c}" for c in range(10)]


def test_preprocessing_and_config_json_match_timm(timm_run):
    import timm
    import timm.data
    from timm.models._hub import load_model_config_from_path

    result, _ = timm_run
    out = result.out_dir
    meta = make_session(out / "model.onnx").get_modelmeta().custom_metadata_map
    pre = json.loads(meta["preprocessing"])
    reference = timm.data.resolve_data_config(
        model=timm.create_model(TINY_VIT["name"], **TINY_VIT["kwargs"]))
    assert pre["input_size"] == [3, 32, 32]
    assert pre["mean"] == list(reference["mean"]) and pre["std"] == list(reference["std"])
    assert pre["interpolation"] == reference["interpolation"]

    # config.json in timm's layout: timm reads it and rebuilds the same preprocessing.
    pretrained_cfg, name, model_args = load_model_config_from_path(out)
    assert name == TINY_VIT["name"] and pretrained_cfg["num_classes"] == 10
    model = timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg,
                              **model_args)
    cfg = timm.data.resolve_data_config(model=model)
    assert list(cfg["input_size"]) == pre["input_size"]
    assert list(cfg["mean"]) == pre["mean"] and cfg["crop_pct"] == pre["crop_pct"]
    assert pretrained_cfg["label_names"] == [f"class_{c}" for c in range(10)]


def _snippet(card: str, heading: str) -> str:
    section = card.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_model_card_reuses_the_verdict_and_its_snippet_runs(timm_run, monkeypatch,
                                                            tiny_vit_files):
    from PIL import Image

    from compress.data import load_dataset
    from compress.export.ort import predict_onnx
    from compress.models import load_model
    from compress.specs import EvaluationSpec, ModelSpec

    result, tmp = timm_run
    out = result.out_dir
    card = (out / "README.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert f"**Verdict:** {report['verdict']['line']}" in card
    assert "| ONNX size |" in card and "latency, batch 1" in card
    assert f"`{report['export']['metadata']['recipe_sha256']}`" in card
    assert "## Run with optimum" not in card   # timm models: onnxruntime only

    # The snippet, as written, on one image; compress's own loader gives the same pixels.
    work = tmp / "snippet"
    (work / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 40, 3), dtype=np.uint8)
                    ).save(work / "image.png")
    (work / "imgs" / "a" / "image.png").write_bytes((work / "image.png").read_bytes())
    monkeypatch.chdir(work)
    namespace: dict = {}
    exec(_snippet(card, "Run with ONNX Runtime").replace(FOLDER, str(out)), namespace)
    handle = load_model(ModelSpec(source="timm", **TINY_VIT,
                                  weights=str(tiny_vit_files["weights"])),
                        tiny_vit_files["weights"])
    data = load_dataset(EvaluationSpec(path=str(work / "imgs")), work / "imgs", handle, "eval")
    expected = predict_onnx(make_session(out / "model.onnx"), data, 1)
    np.testing.assert_allclose(namespace["out"], expected, rtol=1e-5, atol=1e-5)
    assert namespace["labels"] == [f"class_{c}" for c in range(10)]


def test_recipe_and_source_hashes_are_stable(tmp_path):
    assert recipe_sha256({"b": 1, "a": [1, 2]}) == recipe_sha256({"a": [1, 2], "b": 1})
    assert recipe_sha256({"a": 1}) != recipe_sha256({"a": 2})
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")   # not weights: not hashed
    line = f"{hashlib.sha256(b'weights').hexdigest()}  model.safetensors\n"
    assert source_weights_sha256(folder) == hashlib.sha256(line.encode()).hexdigest()
    assert source_weights_sha256(folder / "model.safetensors") == \
        hashlib.sha256(b"weights").hexdigest()
    assert source_weights_sha256(tmp_path / "missing") is None
