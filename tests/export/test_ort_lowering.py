"""export.ort_cpu_kernels: the lowered graph runs ORT's integer kernels with the bias folded in
and one QAttention per layer, and computes what ORT computes for the Q/DQ graph."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from compress import compress
from compress.export.ort_lowering import lower_file, ort_optimized_graph
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe

FAST = {"type": "quantize", "attention_matmuls": False, "fused_attention": True,
        "weights": {"bits": 8, "reduce_range": True}}


def _outputs(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _ort_ops(path):
    """Op histogram of the graph ORT actually runs after its own fusions."""
    import collections

    graph = ort_optimized_graph(onnx.load(str(path)))
    return collections.Counter(n.op_type for n in graph.node)


def test_vit_lowering_matches_qdq_graph_in_ort(tmp_path, tiny_vit_files):
    from compress.export.onnx import op_histogram

    result = compress(parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[FAST])),
                      out_dir=tmp_path / "qdq")
    qdq = result.model_path
    # every weight code within +-63: the AVX2 u8s8 kernel's int16 pair sums cannot saturate
    codes = [numpy_helper.to_array(t) for t in onnx.load(str(qdq)).graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert codes and max(int(np.abs(c).max()) for c in codes) == 63
    low = tmp_path / "low.onnx"
    shutil.copy(qdq, low)
    done = lower_file(low)
    # test_vit: 6 blocks of qkv/proj/fc1/fc2; the 2-D head stays a float Gemm in ORT.
    # 12 residual adds feed a LayerNorm (norm1/norm2 of the next block, the final norm)
    assert done == {"matmuls": 24, "attention": 6, "residual_sums": 12}
    ops = op_histogram(low)
    assert ops["com.microsoft::QAttention"] == 6
    assert ops["com.microsoft::MatMulIntegerToFloat"] == 18
    assert "com.microsoft::MultiHeadAttention" not in ops
    # bias Adds are gone; the residual adds are Sums, the position embedding an Add
    assert ops["Sum"] == 12 and ops["Add"] <= 2
    rng = np.random.default_rng(0)
    for bs in (1, 3, 8):
        feed = {"pixel_values": rng.standard_normal((bs, 3, 32, 32)).astype(np.float32)}
        a, b = _outputs(qdq, feed), _outputs(low, feed)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


def test_reduce_range_is_on_exactly_where_int8_saturates(monkeypatch):
    from compress.passes import quantize as q

    assert q.effective_weight_bits(q.WeightQuant(bits=8, reduce_range=True)) == 7
    assert q.effective_weight_bits(q.WeightQuant(bits=8, reduce_range=False)) == 8
    assert q.effective_weight_bits(q.WeightQuant(bits=4, reduce_range=True)) == 4
    for saturates, bits in ((True, 7), (False, 8)):
        monkeypatch.setattr(q, "u8s8_saturates", lambda s=saturates: s)
        assert q.effective_weight_bits(q.WeightQuant(bits=8)) == bits


def test_bert_lowering_keeps_padding_mask(tmp_path, tiny_bert_dir, sentences):
    recipe = {"version": 1, "model": {"source": "hf", "path": str(tiny_bert_dir)},
              "calibration": {"path": str(sentences["calib"]), "batch_size": 16},
              "evaluation": {"path": str(sentences["eval"]), "batch_size": 16,
                             "latency": {"enabled": False}},
              "passes": [FAST]}
    qdq = compress(parse_recipe(recipe), out_dir=tmp_path / "qdq").model_path
    low = tmp_path / "low.onnx"
    shutil.copy(qdq, low)
    done = lower_file(low)
    assert done["attention"] >= 1 and done["matmuls"] >= 4 and done["residual_sums"] >= 2
    # ORT fuses no residual add into its slower SkipLayerNormalization kernel any more
    assert _ort_ops(qdq)["SkipLayerNormalization"] >= 2
    assert "SkipLayerNormalization" not in _ort_ops(low)
    names = {i.name for i in ort.InferenceSession(str(low)).get_inputs()}
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 90, size=(4, 24))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0  # padded rows: the mask must survive the rewrite
    mask[3, 3:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    a, b = _outputs(qdq, feed), _outputs(low, feed)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.9999
    # and the mask matters: dropping it changes the padded rows
    feed_nomask = dict(feed, attention_mask=np.ones_like(ids))
    c = _outputs(low, feed_nomask)
    assert np.abs(c[1] - b[1]).max() > 1e-3
