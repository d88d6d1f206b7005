import copy
import time

import pytest
import torch

from compress.distill import (
    DistillSettings,
    Recorder,
    direction_loss,
    distill,
    dmd_terms,
    find_layers,
)
from compress.quant.binary import BinaryLinear
from tests.helpers import make_tiny_vit


def _binarized_tiny_vit():
    teacher = make_tiny_vit()
    student = copy.deepcopy(teacher)
    for blk in student.blocks:
        blk.attn.qkv = BinaryLinear(blk.attn.qkv)
        blk.mlp.fc1 = BinaryLinear(blk.mlp.fc1)
    return teacher, student


def _forward(m, b):
    return m(b["pixel_values"])


def test_direction_loss_ignores_scale_and_sees_direction():
    a = torch.randn(2, 3, 5, 5)
    assert direction_loss(3.0 * a, a) < 1e-6
    assert direction_loss(-a, a) == pytest.approx(2.0, abs=1e-5)


def test_find_layers_on_timm_and_bert(tiny_bert_dir):
    from transformers import BertModel

    taps = find_layers(make_tiny_vit())
    assert [t.layer for t in taps] == [f"blocks.{i}" for i in range(6)]
    assert taps[0].attn == "blocks.0.attn" and taps[0].kind == "timm"
    bert = find_layers(BertModel.from_pretrained(tiny_bert_dir))
    assert [t.layer for t in bert] == ["encoder.layer.0", "encoder.layer.1"]
    assert bert[0].kind == "bert" and bert[0].heads == 2


def test_dmd_terms_are_zero_for_identical_models_and_positive_after_binarizing():
    teacher, student = _binarized_tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    taps = find_layers(teacher)
    same = copy.deepcopy(teacher)
    r_t, r_s, r_b = (Recorder(m, taps, True, True) for m in (teacher, same, student))
    with torch.no_grad():
        teacher(x), same(x), student(x)
    q0, h0 = dmd_terms(r_s, r_t, None, True, True)
    q1, h1 = dmd_terms(r_b, r_t, None, True, True)
    assert q0 < 1e-5 and h0 < 1e-5
    assert q1 > 0.05 and h1 > 0.05
    assert all(v is not None for v in r_b.hidden) and r_b.q[0].shape == (4, 2, 17, 32)


def test_dmd_loss_decreases_on_a_tiny_model():
    torch.manual_seed(0)
    teacher, student = _binarized_tiny_vit()
    x = torch.randn(64, 3, 32, 32)
    settings = DistillSettings(method="dmd", steps=40, lr=2e-3, batch_size=16, log_every=1)
    res = distill(student, teacher, {"pixel_values": x}, None, _forward, "image-classification",
                  settings, torch.device("cpu"))
    first = sum(h["loss"] for h in res.history[:5]) / 5
    last = sum(h["loss"] for h in res.history[-5:]) / 5
    assert res.steps == 40 and last < 0.8 * first
    assert res.history[-1]["qkv"] < res.history[0]["qkv"]
    assert res.history[-1]["output"] < res.history[0]["output"]
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distillation_trains_models_that_cache_tensors_in_eval_mode():
    """timm LeViT caches its attention biases (trainable) in eval mode; distillation must not
    backpropagate through a previous step's cached graph (it raised 'backward through the graph
    a second time' on the zoo's levit_128s)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = timm.create_model("levit_128s", pretrained=False, num_classes=4, img_size=64).eval()
    student = copy.deepcopy(teacher)
    before = student.stages[0].blocks[0].attn.attention_biases.detach().clone()
    settings = DistillSettings(method="output", steps=3, lr=1e-2, batch_size=2, log_every=1)
    res = distill(student, teacher, {"pixel_values": torch.randn(4, 3, 64, 64)}, None, _forward,
                  "image-classification", settings, torch.device("cpu"))
    assert res.steps == 3
    after = student.stages[0].blocks[0].attn.attention_biases.detach()
    assert not torch.equal(before, after)  # the cached parameter was trained, not frozen


def test_max_seconds_stops_training_early():
    teacher, student = _binarized_tiny_vit()
    settings = DistillSettings(method="output", steps=10_000, batch_size=4, max_seconds=0.5)
    res = distill(student, teacher, {"pixel_values": torch.randn(8, 3, 32, 32)}, None, _forward,
                  "image-classification", settings, torch.device("cpu"))
    assert res.stopped_early and res.steps < 10_000 and res.seconds < 30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distillation_runs_on_cuda_and_is_timed():
    teacher, student = _binarized_tiny_vit()
    x = torch.randn(256, 3, 32, 32)
    settings = DistillSettings(method="dmd", steps=50, lr=2e-3, batch_size=64, log_every=10)
    t = time.perf_counter()
    res = distill(student, teacher, {"pixel_values": x}, None, _forward, "image-classification",
                  settings, torch.device("cuda"))
    seconds = time.perf_counter() - t
    assert res.device.startswith("cuda") and res.steps == 50
    assert next(student.parameters()).is_cuda
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    print(f"cuda distillation: {res.steps} steps in {seconds:.2f} s")
