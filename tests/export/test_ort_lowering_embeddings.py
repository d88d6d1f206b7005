"""export.int8_embeddings: lookup tables stored as int8 per row, dequantized after the Gather,
with outputs that stay within the per-row rounding of the float tables."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from compress import compress
from compress.export.onnx import onnx_size_bytes
from compress.export.ort_lowering import (
    EMBEDDING_KERNELS,
    lower_file,
    per_row_int8,
    quantize_embedding_tables,
    round_embedding_tables,
)
from compress.recipe import parse_recipe
from compress.specs import ExportSpec

FAST = {"type": "quantize", "attention_matmuls": False, "fused_attention": True,
        "weights": {"bits": 8, "reduce_range": True}}


def _lookup_model(words: np.ndarray, types: np.ndarray) -> onnx.ModelProto:
    """word[ids] + type[type_ids] + word[[3]]: two tables, one gathered twice, one index
    constant."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    tids = helper.make_tensor_value_info("tids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Gather", ["word", "ids"], ["w"]),
             helper.make_node("Gather", ["type", "tids"], ["t"]),
             helper.make_node("Gather", ["word", "three"], ["c"]),
             helper.make_node("Sum", ["w", "t", "c"], ["y"])]
    inits = [numpy_helper.from_array(words, "word"), numpy_helper.from_array(types, "type"),
             numpy_helper.from_array(np.array([3], np.int64), "three")]
    graph = helper.make_graph(nodes, "lookup", [ids, tids], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.mark.parametrize("kernel", EMBEDDING_KERNELS)
def test_int8_tables_match_float_lookup_within_row_rounding(kernel):
    rng = np.random.default_rng(0)
    words = rng.standard_normal((3000, 48)).astype(np.float32)
    words[7] = 0.0   # an all-zero row (a padding id) must come back as zeros
    words[11, 5] = 40.0   # an outlier row: its own scale, the others keep theirs
    types = rng.standard_normal((2, 48)).astype(np.float32)
    model = _lookup_model(words, types)
    feed = {"ids": np.array([[0, 7, 11, 2999], [5, 6, 7, 8]]), "tids": np.zeros((2, 4), np.int64)}
    ref = _run(model, feed)

    assert quantize_embedding_tables(model, kernel, min_elements=1000) == 1   # word, not type
    inits = {t.name: t for t in model.graph.initializer}
    assert "word" not in inits and "type" in inits   # the 2 x 48 table stays float
    codes = [t for t in inits.values() if list(t.dims) == [3000, 48]]
    assert len(codes) == 1 and codes[0].data_type in (TensorProto.INT8, TensorProto.UINT8)
    scales = [t for t in inits.values() if list(t.dims) == [3000, 1]]
    assert len(scales) == 1 and scales[0].data_type == TensorProto.FLOAT
    assert not any(n.op_type == "Gather" and n.input[0] == "word" for n in model.graph.node)

    got = _run(model, feed)
    # per row: at most half a step (max |row| / 127 / 2) from each of the two word lookups
    step = np.abs(words).max(axis=1) / 127
    bound = (step[feed["ids"]] / 2 + step[3] / 2)[..., None] + 1e-5
    err = np.abs(got - ref)
    assert (err <= bound).all()
    assert err.max() > 0   # it really is quantized
    assert np.abs(got[0, 1] - ref[0, 1]).max() <= step[3] / 2 + 1e-5   # zero row exact
    # the outlier row's step did not leak into the rows around it
    assert np.abs(got[0, 0] - ref[0, 0]).max() < 0.05


def test_small_tables_and_unknown_kernels_are_refused():
    rng = np.random.default_rng(1)
    model = _lookup_model(rng.standard_normal((100, 8)).astype(np.float32),
                          rng.standard_normal((2, 8)).astype(np.float32))
    assert quantize_embedding_tables(model) == 0   # 800 values < MIN_EMBEDDING_ELEMENTS
    with pytest.raises(ValueError, match="gather_block_quantized"):
        quantize_embedding_tables(model, "int4")


def test_int8_embeddings_need_the_lowering():
    with pytest.raises(ValidationError, match="ort_cpu_kernels"):
        ExportSpec(int8_embeddings=True)
    assert ExportSpec(int8_embeddings=True, ort_cpu_kernels=True).int8_embeddings


def test_bert_int8_embeddings_shrink_the_file_and_keep_outputs(tmp_path, tiny_bert_dir,
                                                               sentences):
    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "latency": {"enabled": False}},
              "passes": [FAST]}
    qdq = compress(parse_recipe(recipe), out_dir=tmp_path / "qdq").model_path
    plain, small = tmp_path / "plain.onnx", tmp_path / "small.onnx"
    shutil.copy(qdq, plain)
    shutil.copy(qdq, small)
    lower_file(plain)
    done = lower_file(small, int8_embeddings=True)
    # the 30522 x 32 word table; position (128 x 32) and token types (2 x 32) are too small
    assert done["int8_embeddings"] == 1 and done["attention"] >= 1

    model = onnx.load(str(small))
    inits = {t.name: t for t in model.graph.initializer}
    gbq = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and inits[gbq[0].input[0]].data_type == TensorProto.UINT8
    assert list(inits[gbq[0].input[0]].dims) == [30522, 32]
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [30522, 32]
                   for t in inits.values())
    # 3 of every 4 bytes of the word table go, less one fp32 scale per row
    saved = onnx_size_bytes(plain) - onnx_size_bytes(small)
    assert saved >= 30522 * (32 * 3 - 4) * 0.99

    rng = np.random.default_rng(2)
    ids = rng.integers(5, 30000, size=(4, 24))
    mask = np.ones_like(ids)
    mask[2, 12:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    names = {i.name for i in ort.InferenceSession(str(small)).get_inputs()}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    a = ort.InferenceSession(str(plain)).run(None, feed)[0]
    b = ort.InferenceSession(str(small)).run(None, feed)[0]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999
    assert np.abs(a - b).max() > 0   # the tables did change


def test_recipe_switch_reaches_the_lowering(tmp_path, tiny_bert_dir, sentences):
    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "latency": {"enabled": False}},
              "passes": [FAST], "export": {"ort_cpu_kernels": True, "int8_embeddings": True}}
    result = compress(parse_recipe(recipe), out_dir=tmp_path / "out")
    assert result.report["export"]["ort_cpu_kernels"]["int8_embeddings"] == 1
    assert result.report["export"]["op_histogram"]["com.microsoft::GatherBlockQuantized"] == 1
    assert result.report["size"]["compressed_bytes"] < 30522 * 32 * 1.5
    # the torch twin was put on the same int8 grid, so ORT still matches it closely
    assert all(p["cosine"] > 0.9999 for p in result.report["export"]["parity"])


def test_rounded_torch_tables_requantize_exactly():
    import torch

    torch.manual_seed(0)
    big, small = torch.nn.Embedding(3000, 48), torch.nn.Embedding(2, 48)
    before = big.weight.detach().clone()
    assert round_embedding_tables(torch.nn.ModuleList([big, small]), min_elements=1000) == 1
    after = big.weight.detach().numpy()
    assert 0 < np.abs(after - before.numpy()).max() <= before.abs().max().item() / 254 + 1e-6
    codes, scale = per_row_int8(after)
    np.testing.assert_array_equal(codes.astype(np.float32) * scale, after)
