"""The digits ViT reference ships trained (issue 15, a faster first run): the weights match their
SHA-256, building the reference uses them without training and refuses a damaged copy, and the
training script still reproduces what it trained.

Reproduction is checked on a shortened schedule (4 of the 80 epochs: the full run takes 4 to 5
minutes of one CPU core, longer on a shared machine) against digits_vit_short_run.json, recorded
from `python -m compress.reference.digits_vit --out DIR --epochs 4`: same code, same seed, one
thread. On the machine that recorded it the weights are the same bytes (checked twice); another
CPU's float kernels may sum in another order (this project runs on AMD EPYC and Intel Xeon), so
the test requires the model's logits on 64 test images within 2e-3 of the recorded ones (a change
to the training code, its data or its schedule moves them by tenths) and warns when the bytes
differ. The full schedule against the shipped weights runs with COMPRESS_TEST_FULL_RETRAIN=1
(`python -m compress.reference.digits_vit --out DIR` does the same by hand).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from compress.errors import CompressError
from compress.reference import digits_vit

SHORT_RUN = json.loads((Path(__file__).parent / "digits_vit_short_run.json").read_text())


def test_shipped_weights_match_their_checksum_and_classify_digits():
    assert digits_vit.SHIPPED_WEIGHTS.is_file()
    assert digits_vit.SHIPPED_WEIGHTS.stat().st_size < 1_000_000  # small enough to ship
    assert digits_vit.sha256_file(digits_vit.SHIPPED_WEIGHTS) == digits_vit.SHIPPED_WEIGHTS_SHA256
    model = digits_vit.load_model(digits_vit.SHIPPED_WEIGHTS)
    acc = digits_vit.evaluate_accuracy(model, digits_vit.load_splits())
    assert acc >= 0.975, acc  # the trained model, not an untrained one (10%)


def test_build_uses_the_shipped_weights_without_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("build() trained although the weights ship")

    monkeypatch.setattr(digits_vit, "train", no_training)
    t0 = time.monotonic()
    digits_vit.build(tmp_path, log=lambda msg: None)
    seconds = time.monotonic() - t0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["weights"] == "shipped"
    assert meta["weights_sha256"] == digits_vit.SHIPPED_WEIGHTS_SHA256
    assert digits_vit.sha256_file(tmp_path / "model.safetensors") == \
        digits_vit.SHIPPED_WEIGHTS_SHA256
    assert meta["test_accuracy"] >= 0.975 and meta["test_samples"] == 540
    for name in ("calib.npz", "eval.npz"):
        assert (tmp_path / name).is_file()
    assert len(list((tmp_path / "eval_images").rglob("*.png"))) == 540
    assert seconds < 120, seconds  # seconds, not the minutes of training


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(digits_vit.SHIPPED_WEIGHTS.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(digits_vit, "SHIPPED_WEIGHTS", damaged)
    out = tmp_path / "ref"
    out.mkdir()
    with pytest.raises(CompressError, match="damaged"):
        digits_vit.build(out, log=lambda msg: None)
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_training_reproduces_a_shortened_schedule(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert digits_vit.main(["--out", str(tmp_path), "--epochs", str(SHORT_RUN["epochs"])]) == 0
    assert torch.get_num_threads() == threads  # one thread for training only
    assert "a shortened schedule" in capsys.readouterr().out
    model = digits_vit.load_model(tmp_path / "model.safetensors")
    splits = digits_vit.load_splits()
    with torch.no_grad():
        logits = model(torch.from_numpy(splits["x_test"][:64]))
    recorded = torch.tensor(SHORT_RUN["logits_first_64_test_images"])
    diff = float((logits - recorded).abs().max())
    assert diff < 2e-3, (
        f"{SHORT_RUN['epochs']} epochs of training moved the logits by up to {diff:.4f} from "
        "the recorded run: the training code, its data or its schedule changed")
    assert digits_vit.evaluate_accuracy(model, splits) == pytest.approx(SHORT_RUN["test_top1"],
                                                                        abs=0.01)
    digest = digits_vit.sha256_file(tmp_path / "model.safetensors")
    if digest != SHORT_RUN["sha256"]:
        warnings.warn(f"same logits within {diff:.1e}, other bytes ({digest}) than recorded on "
                      f"{SHORT_RUN['cpu']} with torch {SHORT_RUN['torch']}: this CPU or torch "
                      "rounds differently; the shipped weights are still the reference",
                      stacklevel=1)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COMPRESS_TEST_FULL_RETRAIN"),
                    reason="the full schedule takes 4-5 CPU minutes; COMPRESS_TEST_FULL_RETRAIN=1")
def test_training_reproduces_the_shipped_weights(tmp_path):
    assert digits_vit.main(["--out", str(tmp_path)]) == 0
    assert digits_vit.sha256_file(tmp_path / "model.safetensors") == \
        digits_vit.SHIPPED_WEIGHTS_SHA256
