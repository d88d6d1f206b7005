"""Every weight width exports to ONNX Runtime kernels whose output matches the torch simulation."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.quant.modules import ActQuantizer
from compress.quant.nbits import NBitsEmbedding, NBitsLinear
from compress.quant.weight_only import hqq, rtn


class _Stack(nn.Module):
    def __init__(self, embs, linears):
        super().__init__()
        self.embs = nn.ModuleList(embs)
        self.linears = nn.ModuleList(linears)

    def forward(self, ids):
        x = sum(e(ids) for e in self.embs)
        for lin in self.linears:
            x = torch.tanh(lin(x))
        return x


def _export_and_run(model, ids, path):
    prog = torch.onnx.export(model, (ids,), dynamo=True, opset_version=21, verbose=False,
                             dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},),
                             report=False)
    prog.save(str(path))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids2 = torch.randint(0, 50, (3, 5))
    out = sess.run(None, {sess.get_inputs()[0].name: ids2.numpy()})[0]
    with torch.no_grad():
        ref = model(ids2).numpy()
    return out, ref, onnx.load(str(path))


def _model(accuracy_level, act_bits=None):
    torch.manual_seed(0)
    embs = [NBitsEmbedding(nn.Embedding(50, 64), rtn(torch.randn(50, 64), b, 16))
            for b in (2, 4, 8)]
    linears = []
    for b in (2, 3, 4, 5, 6, 8):
        lin = nn.Linear(64, 64)
        aq = None
        if act_bits is not None:
            aq = ActQuantizer(act_bits)
            aq.set_range(torch.tensor(-1.0), torch.tensor(1.0))
        linears.append(NBitsLinear(lin, rtn(lin.weight.data, b, 32), aq, accuracy_level))
    lin = nn.Linear(64, 64)
    linears.append(NBitsLinear(lin, hqq(lin.weight.data, 4, 32), None, accuracy_level))
    return _Stack(embs, linears).eval()


def test_every_width_runs_in_ort_exactly_like_torch(tmp_path):
    out, ref, proto = _export_and_run(_model(0), torch.randint(0, 50, (2, 7)), tmp_path / "m.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 7 and ops.count("GatherBlockQuantized") == 3
    bits = sorted(a.i for n in proto.graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "bits")
    assert bits == [2, 4, 4, 8, 8, 8, 8]  # 3, 5, 6 ride in the 8-bit container
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("act_bits,level,min_cos", [(8, 4, 0.999), (4, 0, 0.9999)])
def test_quantized_inputs_stay_close(tmp_path, act_bits, level, min_cos):
    # accuracy_level 4 quantizes the input to int8 per block inside ORT: close, not exact.
    # 4-bit inputs (simulated: Q -> Clip -> DQ) with float compute match up to rare rounding
    # flips at code boundaries.
    out, ref, proto = _export_and_run(_model(level, act_bits), torch.randint(0, 50, (2, 7)),
                                      tmp_path / "m.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 6 and (ops.count("Clip") == 6) == (act_bits == 4)
    cos = float(torch.nn.functional.cosine_similarity(
        torch.from_numpy(out).flatten(), torch.from_numpy(ref).flatten(), dim=0))
    assert cos > min_cos


def test_simulated_flags():
    lin = nn.Linear(32, 8)
    assert NBitsLinear(lin, rtn(lin.weight.data, 3, 16)).simulated
    assert not NBitsLinear(lin, rtn(lin.weight.data, 4, 16)).simulated
    emb = nn.Embedding(10, 32)
    assert NBitsEmbedding(emb, rtn(emb.weight.data, 2, 16)).simulated
