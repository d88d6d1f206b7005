import json

import numpy as np
import onnx
import pytest
import torch

from compress import compress
from compress.errors import RecipeError
from compress.export.ort import make_session
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe


def _run(recipe_dict, out):
    return compress(parse_recipe(recipe_dict), out_dir=out)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("bits,method", [(2, "gptq"), (3, "rtn"), (4, "gptq"), (4, "hqq"),
                                         (8, "rtn")])
def test_weight_only_exports_matmulnbits_matching_torch(tmp_path, tiny_vit_files, bits, method):
    # accuracy_level 0: ORT dequantizes the same codes and computes in float, so its output
    # must equal the torch simulation up to float rounding, at every bit width.
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{
        "type": "weight_only", "bits": bits, "block_size": 16, "method": method,
        "accuracy_level": 0}])
    result = _run(recipe, tmp_path / "out")
    r = result.report
    assert _ops(result.model_path).count("MatMulNBits") == 25  # 6 blocks x 4 + head
    for p in r["export"]["parity"]:
        assert p["cosine"] > 0.99999, p
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["blocks.0.mlp.fc1"]["weight_bits"] == bits
    assert layers["blocks.0.mlp.fc1"]["simulated"] is (bits == 3)
    assert layers["blocks.0.mlp.fc1"]["sqnr_db"] > {2: 3, 3: 10, 4: 15, 8: 35}[bits]


def test_weight_only_int4_accuracy_level_4_is_close_and_small(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only", "bits": 4,
                                                      "block_size": 32}])
    r = _run(recipe, tmp_path / "out").report
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert r["size"]["ratio"] > 3.5


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
    ours = result.handle.module if hasattr(result, "handle") else None
    from compress.models.loaders import load_model  # noqa: F401  (import path sanity)
    assert w.shape == (64, 32)
    # Float model weights vs read-back: 4-bit error only.
    from safetensors.torch import load_file as lf
    orig = lf(str(tiny_bert_dir / "model.safetensors"))
    key = next(k for k in orig if k.endswith(name + ".weight"))
    rel = float((w.float() - orig[key]).norm() / orig[key].norm())
    assert 0.005 < rel < 0.15
