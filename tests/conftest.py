"""Shared fixtures: tiny models on the production path, their data, and the reference models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_tiny_vit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vit_files(tmp_path_factory) -> dict[str, Path]:
    """A timm test_vit (random weights) with safetensors weights and npz calib/eval data."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_vit")
    model = make_tiny_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"))
    torch.save(model.state_dict(), d / "model.pt")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(d / "calib.npz", x=x[:32])
    np.savez(d / "eval.npz", x=x[32:], labels=labels[32:].astype(np.int64))
    return {"dir": d, "weights": d / "model.safetensors", "pt": d / "model.pt",
            "calib": d / "calib.npz", "eval": d / "eval.npz"}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compress.reference.minilm import package_model_dir

    return package_model_dir()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer BERT (random weights) saved as a Hugging Face folder with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, d / f)
    return d


@pytest.fixture(scope="session")
def sentences(tmp_path_factory) -> dict[str, Path]:
    from compress.reference import minilm

    d = tmp_path_factory.mktemp("sentences")
    from importlib import resources

    texts = resources.files("compress.reference") / "texts"
    calib = (texts / "calib.txt").read_text().splitlines()
    evals = (texts / "eval.txt").read_text().splitlines()
    (d / "calib.txt").write_text("\n".join(calib[:48]))
    (d / "eval.txt").write_text("\n".join(evals[:32]))
    assert minilm.VERSION
    return {"calib": d / "calib.txt", "eval": d / "eval.txt"}


@pytest.fixture(scope="session")
def digits_reference() -> Path:
    from compress import reference

    return reference.ensure("digits-vit")
