import json

import onnx
import pytest
import torch

from compress import compress
from compress.errors import RecipeError
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe


def _run(recipe_dict, out):
    return compress(parse_recipe(recipe_dict), out_dir=out)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_weight_only_int4_gptq_tiny_vit(tmp_path, tiny_vit_files):
    # Every width's ORT parity is in tests/quant/test_nbits.py; this runs the pipeline once.
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only", "bits": 4,
                                                      "block_size": 32, "ignore": ["head"]}])
    recipe["evaluation"]["latency"] = {"enabled": False}
    result = _run(recipe, tmp_path / "out")
    r = result.report
    assert _ops(result.model_path).count("MatMulNBits") == 24  # 6 blocks x 4
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert r["size"]["ratio"] > 3.5
    layers = {row["name"]: row for row in r["layers"]}
    assert "head" not in layers
    fc1 = layers["blocks.0.mlp.fc1"]
    assert fc1["weight_bits"] == 4 and fc1["method"] == "gptq" and not fc1["simulated"]
    assert fc1["sqnr_db"] > 15


def test_block_size_must_divide_layer_widths(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only",
                                                      "block_size": 128}])
    with pytest.raises(RecipeError, match=r"passes\.0\.block_size=128 does not divide"):
        _run(recipe, tmp_path / "out")


def test_block_size_must_be_power_of_two(tiny_vit_files):
    with pytest.raises(Exception, match="block_size"):
        parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only",
                                                              "block_size": 24}]))


def test_int4_bert_with_embeddings_and_packed_safetensors(tmp_path, tiny_bert_dir, sentences):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import load_file

    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "latency": {"enabled": False}},
              "export": {"verify_batch_sizes": [2]},
              "passes": [{"type": "weight_only", "targets": ["Linear", "Embedding"],
                          "bits": 4, "block_size": 16, "safetensors": True,
                          "accuracy_level": 0}]}
    result = _run(recipe, tmp_path / "out")
    r = result.report
    ops = _ops(result.model_path)
    assert ops.count("GatherBlockQuantized") == 3 and ops.count("MatMulNBits") >= 12
    assert all(p["cosine"] > 0.9999 for p in r["export"]["parity"])

    # The safetensors file reads back through compressed-tensors to the weights we simulated.
    d = tmp_path / "out" / "compressed-tensors"
    cfg = json.loads((d / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qc.format == "pack-quantized"
    tensors = load_file(str(d / "model.safetensors"))
    name = "encoder.layer.0.intermediate.dense"
    group = next(g for g in qc.config_groups.values() if name in g.targets)
    scheme = QuantizationScheme(targets=group.targets, weights=group.weights)
    state = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
    assert state["weight_packed"].dtype == torch.int32
    w = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert w.shape == (64, 32)
    # Float model weights vs read-back: 4-bit error only.
    orig = load_file(str(tiny_bert_dir / "model.safetensors"))
    key = next(k for k in orig if k.endswith(name + ".weight"))
    rel = float((w.float() - orig[key]).norm() / orig[key].norm())
    assert 0.005 < rel < 0.15
