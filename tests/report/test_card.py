"""The model card (README.md of an output folder) from a report dict."""

from __future__ import annotations

from compress.report.card import model_card
from compress.report.verdict import verdict


def _report(name: str) -> dict:
    report = {
        "compress_version": "0.1.0", "created_at": "2026-12-07T00:00:00+00:00",
        "recipe": {"name": name, "passes": [{"type": "quantize"}]},
        "model": {"source": "timm", "name": "test_vit", "task": "image-classification",
                  "output": "logits", "params": 1000},
        "size": {"original_bytes": 4_000_000, "compressed_bytes": 1_000_000},
        "latency": {"threads": 2, "original": {"1": 1.0}, "compressed": {"1": 2.5},
                    "speedup": {"1": 0.4}},
        "metrics": {"original": {"top1_agreement": 1.0}, "compressed": {"top1_agreement": 0.9}},
        "gate": {"passed": True, "checks": []},
        "data": {"evaluation": {"samples": 100}},
        "export": {"artifacts": [{"name": "model.onnx", "bytes": 1_000_000, "sha256": "0" * 64}]},
        "warnings": ["file <img src=x onerror=alert(1)>.png skipped"],
    }
    report["verdict"] = verdict(report)
    return report


META = {"io": {"inputs": [{"name": "pixel_values", "dtype": "float32",
                           "shape": ["batch", 3, 32, 32]}],
               "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]},
        "preprocessing": {"kind": "image", "input_size": [3, 32, 32], "mean": [0.5] * 3,
                          "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.9},
        "recipe_sha256": "a" * 64, "source_weights_sha256": "b" * 64, "labels": None}


def test_card_words_a_slowdown_and_names_the_inputs(tmp_path):
    card = model_card(_report("vit-int8"), tmp_path, META)
    assert "**Verdict:** smaller by 4.00×" in card
    assert "slower by 2.50× at batch 1" in card          # the report's own verdict line
    assert "| latency, batch 1 (2 threads) | 1.000 ms | 2.500 ms (2.50× slower) |" in card
    assert "`pixel_values` float32 ['batch', 3, 32, 32]" in card
    assert 'session.run(["logits"], {"pixel_values": pixels})' in card
    assert "interpolation='bicubic', crop_pct=0.9" in card
    assert "## Load the compressed-tensors copy" not in card


def test_card_never_turns_tenant_text_into_markup(tmp_path):
    card = model_card(_report("<script>alert(1)</script>"), tmp_path, META)
    assert card.splitlines()[0].startswith("# &lt;script&gt;alert(1)&lt;/script&gt;")
    assert "<img" not in card and "&lt;img src=x onerror=alert(1)&gt;" in card
