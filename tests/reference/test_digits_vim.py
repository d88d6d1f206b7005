"""The digits Vim reference: deterministic training, its files, and (slow) the cached model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.reference import digits_vim


def _small_splits(n_train: int = 96, n_test: int = 64) -> dict[str, np.ndarray]:
    from compress.reference import digits_vit

    splits = digits_vit.load_splits()
    return {"x_train": splits["x_train"][:n_train], "y_train": splits["y_train"][:n_train],
            "x_test": splits["x_test"][:n_test], "y_test": splits["y_test"][:n_test]}


def test_training_is_deterministic_on_one_thread():
    splits = _small_splits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, acc_a = digits_vim.train(splits, log=lambda m: None, epochs=1)
        b, acc_b = digits_vim.train(splits, log=lambda m: None, epochs=1)
    finally:
        torch.set_num_threads(threads)
    assert acc_a == acc_b
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    # one epoch moved the weights away from the seeded initialization
    init = digits_vim.create_model().state_dict()
    assert not torch.equal(a.state_dict()["layers.0.mixer.in_proj.weight"],
                           init["layers.0.mixer.in_proj.weight"])


@pytest.mark.slow
def test_cached_reference_reaches_95_percent_through_the_loader():
    from compress import reference
    from compress.models import load_model
    from compress.specs import ModelSpec

    folder = reference.ensure("digits-vim")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["config"] == digits_vim.CONFIG and meta["test_accuracy"] >= 0.95
    spec = ModelSpec(source="vim", vim=digits_vim.CONFIG, weights="model.safetensors")
    handle = load_model(spec, folder / "model.safetensors")
    data = np.load(folder / "eval.npz")
    with torch.no_grad():
        pred = handle.module(torch.from_numpy(data["x"])).argmax(1).numpy()
    assert float((pred == data["labels"]).mean()) == pytest.approx(meta["test_accuracy"])
    assert len(np.load(folder / "calib.npz")["x"]) == meta["train_samples"]


def test_build_uses_the_shipped_weights(tmp_path):
    digits_vim.build(tmp_path, log=lambda msg: None)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["weights"] == "shipped"
    assert meta["weights_sha256"] == digits_vim.SHIPPED_WEIGHTS_SHA256
    assert meta["test_accuracy"] >= 0.95


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    from compress.errors import CompressError

    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(digits_vim.SHIPPED_WEIGHTS.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(digits_vim, "SHIPPED_WEIGHTS", damaged)
    out = tmp_path / "ref"
    out.mkdir()
    with pytest.raises(CompressError, match="digits-vim weights .* are damaged"):
        digits_vim.build(out, log=lambda msg: None)
    assert not (out / "model.safetensors").exists()
