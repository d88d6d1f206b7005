import json

import onnx
import pytest
import torch

from compress import compress
from compress.recipe import parse_recipe
from tests.archs import arch_recipe, build_arch_files
from tests.helpers import tiny_vit_recipe


def _run(recipe_dict, out):
    return compress(parse_recipe(recipe_dict), out_dir=out)


@pytest.fixture(scope="session")
def arch_files(tmp_path_factory):
    return build_arch_files(tmp_path_factory)


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


def test_layer_block_size_falls_back_to_a_power_of_two_that_divides():
    from compress.passes.weight_only import layer_block_size

    assert layer_block_size(384, 128) == 128
    assert layer_block_size(368, 32) == 16      # regnetx_002's classifier head
    assert layer_block_size(96, 64) == 32
    assert layer_block_size(100, 32) is None    # no power of two >= 16 divides 100


def test_block_size_that_does_not_divide_a_layer_uses_smaller_blocks(tmp_path, tiny_vit_files):
    # test_vit is 64 wide (MLP 192): 128 divides no layer, 64 divides all (was exit 2)
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only",
                                                      "block_size": 128}])
    recipe["evaluation"]["latency"] = {"enabled": False}
    r = _run(recipe, tmp_path / "out").report
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["blocks.0.attn.qkv"]["block_size"] == 64
    assert layers["blocks.0.mlp.fc2"]["block_size"] == 64
    assert all(row["weight_bits"] == 4 for row in layers.values())
    assert any("block_size=128 does not divide" in w for w in r["warnings"])
    assert r["metrics"]["compressed"]["logits_rel_error"] < 0.3


def test_block_size_must_be_power_of_two(tiny_vit_files):
    with pytest.raises(Exception, match="block_size"):
        parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[{"type": "weight_only",
                                                              "block_size": 24}]))


@pytest.mark.slow
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
                          "bits": 4, "block_size": 16, "safetensors": True, "symmetric": True,
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

    # Hugging Face transformers loads it (compressed-tensors quantizer, decompressed on CPU)
    # and computes what our ONNX model computes (mean-pooled, normalized embeddings).
    from transformers import AutoModel

    from compress.export.ort import make_session

    hf = AutoModel.from_pretrained(d).eval()
    ids = torch.randint(1000, 30000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = torch.nn.functional.normalize(h.mean(1), dim=-1)
    sess = make_session(result.model_path)
    ours = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(),
                                            "attention_mask": mask.numpy()})[0])
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert (cos > 0.9999).all(), cos


@pytest.mark.parametrize("arch", ["resnet", "swin"])
def test_int4_weight_only_on_convnets_and_windowed_transformers(tmp_path, arch_files, arch):
    """Conv kernels are block-quantized too (blocked DequantizeLinear -> Conv, 4-bit codes in
    the file), so a CNN's file shrinks like a transformer's."""
    r = _run(arch_recipe(arch_files[arch], [{"type": "weight_only", "bits": 4, "method": "rtn",
                                             "block_size": 16}]), tmp_path / "out").report
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])  # ORT == torch simulation
    m = r["metrics"]["compressed"]
    assert m["logits_rel_error"] < 0.2
    layers = {row["name"]: row for row in r["layers"]}
    convs = [row for row in layers.values() if row["kind"] == "Conv2d"]
    assert convs and all(row["weight_bits"] == 4 for row in convs)
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    int4 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT4]
    assert len(int4) == 2 * len(convs)  # codes and zero points of every Conv
    if arch == "resnet":
        assert r["size"]["ratio"] > 4  # tiny ResNet: almost every parameter is a Conv weight
    else:
        assert r["size"]["ratio"] > 2.5  # tiny Swin: norms, biases, position tables stay float
