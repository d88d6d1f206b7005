"""The compressed-tensors copy loads with the consumers' own code (transformers,
sentence-transformers, compressed-tensors) and computes what model.onnx computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.api import compress
from compress.export.compressed_tensors import (
    compressed_layer_tensors,
    packed_zero_point,
    zero_point_rows_at_load,
)
from compress.export.ort import make_session
from compress.quant.weight_only import rtn
from compress.recipe import parse_recipe

TEXTS = ["A man is playing a guitar on the street.", "The stock market fell sharply today.",
         "Quantized encoders keep most of their accuracy."]


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_points_unpack_to_the_codes_we_stored(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    zero = torch.randint(0, 2 ** bits, (48, 6), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int32).to(torch.uint8)
    packed = packed_zero_point(zero, bits, 16, 96)
    # The rows compressed-tensors' load path allocates, whatever its packer writes.
    assert packed.shape == (zero_point_rows_at_load(48, 96, bits, 16), 6)
    assert packed.dtype == torch.int32
    back = unpack_from_int32(packed, bits, torch.Size((48, 6)), packed_dim=0)
    assert torch.equal(back.to(torch.int32) + 2 ** (bits - 1), zero.to(torch.int32))


@pytest.mark.parametrize("bits", [4, 8])
def test_decompress_matches_our_dequantized_weights_when_asymmetric(bits):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    gq = rtn(w, bits, 16, False)
    state = compressed_layer_tensors(gq, symmetric=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, symmetric=False, strategy="group", group_size=16))
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    torch.testing.assert_close(theirs.float(), gq.dequantize(), rtol=0, atol=1e-5)


def _int_recipe(model_dir, sentences, bits: int, symmetric: bool) -> dict:
    return {"version": 1, "model": {"source": "hf", "path": str(model_dir)},
            "calibration": {"path": str(sentences["calib"]), "batch_size": 16,
                            "num_samples": 32},
            "evaluation": {"path": str(sentences["eval"]), "batch_size": 16, "num_samples": 16,
                           "latency": {"enabled": False}},
            "export": {"verify_batch_sizes": [2]},
            "passes": [{"type": "weight_only", "targets": ["Linear", "Embedding"],
                        "bits": bits, "block_size": 16, "method": "rtn",
                        "symmetric": symmetric, "safetensors": True, "accuracy_level": 0}]}


def _ort_embeddings(model_path, tokenizer, texts) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    out = make_session(model_path).run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                              "attention_mask": enc["attention_mask"]
                                              .astype(np.int64)})[0]
    return torch.from_numpy(out)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_compressed_tensors_loads_in_transformers_and_sentence_transformers(
        tmp_path, tiny_bert_dir, sentences, bits, symmetric):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    result = compress(parse_recipe(_int_recipe(tiny_bert_dir, sentences, bits, symmetric)),
                      out_dir=tmp_path / "out")
    # model.onnx is our simulated model: ORT and torch agree before we compare with theirs.
    assert all(p["cosine"] > 0.9999 for p in result.report["export"]["parity"])
    folder = tmp_path / "out" / "compressed-tensors"
    cfg = json.loads((folder / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    assert {g["weights"]["symmetric"] for g in groups.values()} == {symmetric}
    assert {g["weights"]["num_bits"] for g in groups.values()} == {bits}

    tokenizer = AutoTokenizer.from_pretrained(folder)   # tokenizer files travel with it
    ours = _ort_embeddings(result.model_path, tokenizer, TEXTS)

    # transformers as a user calls it (its default dtype for compressed-tensors is float16).
    hf = AutoModel.from_pretrained(folder).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"]).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    theirs = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (_cosines(ours, theirs) >= 0.999).all(), _cosines(ours, theirs)

    # sentence-transformers: pooling and normalization from the modules we wrote.
    st = SentenceTransformer(str(folder), device="cpu")
    st_out = torch.from_numpy(st.encode(TEXTS))
    assert (_cosines(ours, st_out) >= 0.999).all(), _cosines(ours, st_out)
    assert torch.allclose(st_out.float().norm(dim=1), torch.ones(len(TEXTS)), atol=1e-3)


@pytest.mark.slow
def test_bundled_minilm_int4_loads_in_transformers_and_sentence_transformers(tmp_path):
    """The bundled recipe (asymmetric INT4, GPTQ) on all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from compress.bundled import bundled_recipe_path

    result = compress(bundled_recipe_path("minilm_int4"), out_dir=tmp_path / "out",
                      overrides=["evaluation.latency.enabled=false",
                                 "evaluation.num_samples=64", "calibration.num_samples=64"])
    folder = tmp_path / "out" / "compressed-tensors"
    cfg = json.loads((folder / "config.json").read_text())
    assert not next(iter(cfg["quantization_config"]["config_groups"].values()))[
        "weights"]["symmetric"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = _ort_embeddings(result.model_path, tokenizer, TEXTS)

    hf = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    theirs = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (_cosines(ours, theirs) >= 0.999).all(), _cosines(ours, theirs)

    st = SentenceTransformer(str(folder), device="cpu")
    st_out = torch.from_numpy(st.encode(TEXTS))
    assert (_cosines(ours, st_out) >= 0.999).all(), _cosines(ours, st_out)

    # The output folder itself opens in optimum (config and tokenizer copied from the input).
    from optimum.onnxruntime import ORTModelForCustomTasks

    batch = tokenizer(TEXTS, padding=True, return_tensors="np")
    ort_model = ORTModelForCustomTasks.from_pretrained(tmp_path / "out")
    got = ort_model(input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"]).sentence_embedding
    np.testing.assert_allclose(np.asarray(got), ours.numpy(), rtol=1e-4, atol=1e-5)
