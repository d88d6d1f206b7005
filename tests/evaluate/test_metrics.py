import numpy as np

from compress.evaluate.gate import gate_checks
from compress.evaluate.metrics import (
    classification_fidelity,
    embedding_fidelity,
    output_agreement,
    parity_problem,
    retrieval_overlap,
    top1_accuracy,
)
from compress.specs import GateSpec


def test_identical_outputs_are_perfect():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20, 10))
    m = classification_fidelity(z, z)
    assert m["top1_agreement"] == 1.0 and abs(m["kl"]) < 1e-12
    e = embedding_fidelity(z, z, k=5)
    assert abs(e["cosine_mean"] - 1) < 1e-12 and e["retrieval_top5_overlap"] == 1.0


def test_top1_and_agreement_count_flips():
    ref = np.eye(4)
    out = np.eye(4)[[0, 1, 2, 0]]
    assert classification_fidelity(ref, out)["top1_agreement"] == 0.75
    assert top1_accuracy(out, np.array([0, 1, 2, 3])) == 0.75


def test_retrieval_overlap_detects_shuffled_space():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 16))
    assert retrieval_overlap(a, a + 1e-6, 5) == 1.0
    assert retrieval_overlap(a, rng.standard_normal((50, 16)), 5) < 0.3


def test_gate_reports_each_limit():
    gate = GateSpec(max_accuracy_drop=0.5, min_top1_agreement=0.99)
    checks = gate_checks(gate, "image-classification", {"top1": 0.97},
                         {"top1": 0.962, "top1_agreement": 0.995, "kl": 0.01}, 10)
    assert checks[0]["metric"] == "accuracy_drop_points"
    assert abs(checks[0]["value"] - 0.8) < 1e-9 and not checks[0]["passed"]
    assert checks[1]["passed"]


def test_token_map_fidelity_is_per_token_cosine():
    from compress.evaluate.metrics import task_metrics

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5, 8))
    out = ref.copy()
    out[1, 2] = -ref[1, 2]            # one flipped token in sample 1: cosine -1 there
    m = task_metrics("image-classification", ref, out, labels=np.zeros(3, int))
    assert "top1" not in m and "kl" not in m          # token maps are not logits
    assert m["token_cosine_min"] == -1.0
    assert abs(m["cosine_min"] - (4 - 1) / 5) < 1e-12  # sample 1: mean over its 5 tokens
    assert abs(m["cosine_mean"] - (1 + 0.6 + 1) / 3) < 1e-12
    rel = np.linalg.norm(2 * ref[1, 2]) / np.linalg.norm(ref)
    assert abs(m["rel_error"] - rel) < 1e-12
    gate = GateSpec(min_cosine=0.8, min_sample_cosine=0.7)
    checks = gate_checks(gate, "image-classification", {}, m, 10)
    assert [c["metric"] for c in checks] == ["cosine_mean", "cosine_min"]
    assert checks[0]["passed"] and not checks[1]["passed"]


def test_parity_treats_nan_and_inf_as_failure():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 10)).astype(np.float32)
    assert parity_problem(ref, ref + 1e-4, 0.99) is None
    for bad in (np.nan, np.inf):
        out = ref.copy()
        out[1, 2] = bad
        # The old check was `cosine < min_cosine`, which is False for NaN: the export passed.
        assert not output_agreement(ref, out)["cosine"] < 0.99
        assert parity_problem(ref, out, 0.99) == (
            "outputs hold NaN or Inf (torch 0, ONNX Runtime 1 of 30 values)")
    assert parity_problem(np.full_like(ref, np.nan), np.full_like(ref, np.nan), 0.99) == (
        "outputs hold NaN or Inf (torch 30, ONNX Runtime 30 of 30 values)")
    assert parity_problem(ref, -ref, 0.99) == "cosine -1.0000 < export.parity_min_cosine 0.99"
