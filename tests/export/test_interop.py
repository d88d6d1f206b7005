"""Output folders of Hugging Face models open with optimum's ORTModel classes (config.json,
tokenizer and preprocessor files copied from the input folder) and compute what ONNX Runtime
computes on our file."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from compress.api import compress
from compress.export.ort import make_session
from compress.recipe import parse_recipe
from compress.report.card import FOLDER

TEXTS = ["A man is playing a guitar on the street.", "The stock market fell sharply today."]
LABELS = {0: "cat", 1: "dog", 2: "bird"}


def test_text_encoder_folder_loads_in_optimum(tmp_path, tiny_bert_dir, sentences):
    from optimum.onnxruntime import ORTModelForCustomTasks
    from transformers import AutoTokenizer

    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16,
                              "num_samples": 32},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "num_samples": 16, "latency": {"enabled": False}},
              "export": {"verify_batch_sizes": [2]},
              "passes": [{"type": "quantize"}]}
    out = tmp_path / "out"
    result = compress(parse_recipe(recipe), out_dir=out)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (out / name).read_bytes() == (tiny_bert_dir / name).read_bytes(), name
    # optimum picks model.onnx (its standard name) among the two ONNX files of the folder.
    model = ORTModelForCustomTasks.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(TEXTS, padding=True, return_tensors="np")
    theirs = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).sentence_embedding
    ours = make_session(result.model_path).run(None, {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    np.testing.assert_allclose(np.asarray(theirs), ours, rtol=1e-5, atol=1e-6)

    # The card's snippets, as written, give our embeddings.
    card = (out / "README.md").read_text()
    for heading in ("Run with ONNX Runtime", "Run with optimum"):
        section = card.split(f"## {heading}", 1)[1]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        namespace: dict = {}
        exec(code.replace(FOLDER, str(out)), namespace)
        expected = make_session(result.model_path).run(None, {
            k: v.astype(np.int64) for k, v in
            tokenizer(["A sentence to embed."], return_tensors="np").items()
            if k in ("input_ids", "attention_mask")})[0]
        np.testing.assert_allclose(np.asarray(namespace["embeddings"]), expected, rtol=1e-5,
                                   atol=1e-6)


@pytest.fixture(scope="module")
def tiny_hf_vit(tmp_path_factory):
    """A 2-layer ViT classifier with named classes and a saved image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("tiny_hf_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                    id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ViTForImageClassification(cfg).eval().save_pretrained(d, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(d)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 3, 32, 32)).astype(np.float32)
    np.savez(d / "calib.npz", x=x[:16])
    np.savez(d / "eval.npz", x=x[16:])
    return d


def test_image_classifier_folder_loads_in_optimum(tmp_path, tiny_hf_vit):
    from optimum.onnxruntime import ORTModelForImageClassification

    recipe = {"version": 1,
              "model": {"source": "hf", "path": str(tiny_hf_vit),
                        "task": "image-classification"},
              "calibration": {"path": str(tiny_hf_vit / "calib.npz"), "batch_size": 8},
              "evaluation": {"path": str(tiny_hf_vit / "eval.npz"), "batch_size": 8,
                             "latency": {"enabled": False}},
              "export": {"verify_batch_sizes": [2]},
              "passes": [{"type": "quantize"}]}
    out = tmp_path / "out"
    result = compress(parse_recipe(recipe), out_dir=out)
    assert (out / "preprocessor_config.json").is_file()
    model = ORTModelForImageClassification.from_pretrained(out)
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    theirs = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    ours = make_session(result.model_path).run(None, {"pixel_values": pixels})[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    assert model.config.id2label[int(ours[0].argmax())] in LABELS.values()

    meta = make_session(result.model_path).get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == ["cat", "dog", "bird"]
    pre = json.loads(meta["preprocessing"])
    assert pre["mean"] == [0.5, 0.4, 0.3] and pre["std"] == [0.2, 0.25, 0.3]
    assert pre["input_size"] == [3, 32, 32]
    assert pre["preprocessor_config"]["image_processor_type"] == "ViTImageProcessor"
    assert "ORTModelForImageClassification.from_pretrained(folder)" in \
        (out / "README.md").read_text()
