"""export.ort_cpu_kernels: the lowered graph runs ORT's integer kernels with the bias folded in
and one QAttention per layer, and computes what ORT computes for the Q/DQ graph."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from compress import compress
from compress.export.ort_lowering import lower_file
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe

FAST = {"type": "quantize", "attention_matmuls": False, "fused_attention": True,
        "weights": {"bits": 8, "reduce_range": True}}


def _outputs(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_vit_lowering_matches_qdq_graph_in_ort(tmp_path, tiny_vit_files):
    result = compress(parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=[FAST])),
                      out_dir=tmp_path / "qdq")
    qdq = result.model_path
    low = tmp_path / "low.onnx"
    shutil.copy(qdq, low)
    done = lower_file(low)
    # test_vit: 6 blocks of qkv/proj/fc1/fc2; the 2-D head stays a float Gemm in ORT.
    assert done == {"matmuls": 24, "attention": 6}
    rng = np.random.default_rng(0)
    for bs in (1, 3, 8):
        feed = {"pixel_values": rng.standard_normal((bs, 3, 32, 32)).astype(np.float32)}
        a, b = _outputs(qdq, feed), _outputs(low, feed)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


def test_recipe_option_lowers_and_reports(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[FAST])
    recipe["export"]["ort_cpu_kernels"] = True
    r = compress(parse_recipe(recipe), out_dir=tmp_path / "out").report
    ops = r["export"]["op_histogram"]
    assert ops["com.microsoft::QAttention"] == 6
    assert ops["com.microsoft::MatMulIntegerToFloat"] == 18
    assert "com.microsoft::MultiHeadAttention" not in ops
    # bias Adds are gone: what remains are the 12 residual adds and the position embedding
    assert ops["Add"] <= 14
    assert r["export"]["ort_cpu_kernels"] == {"matmuls": 24, "attention": 6}
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])


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
    assert done["attention"] >= 1 and done["matmuls"] >= 4
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


@pytest.mark.parametrize("reduce,limit", [(True, 63), (False, 127)])
def test_weight_codes_range(tmp_path, tiny_vit_files, reduce, limit):
    """reduce_range keeps |code| <= 63: the AVX2 u8s8 kernel's int16 pair sums cannot saturate."""
    import onnx
    from onnx import numpy_helper

    passes = [dict(FAST, weights={"bits": 8, "reduce_range": reduce})]
    path = compress(parse_recipe(tiny_vit_recipe(tiny_vit_files, passes=passes)),
                    out_dir=tmp_path / "out").model_path
    codes = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert codes and max(int(np.abs(c).max()) for c in codes) == limit
