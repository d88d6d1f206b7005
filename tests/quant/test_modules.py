import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.functional import sqnr_db
from compress.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, QuantMatMul


def _export_and_run(module, args, path):
    with torch.no_grad():
        prog = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=21,
                                 verbose=False)
    prog.save(str(path))
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=False)}
    return sess.run(None, feed)[0], onnx.load(str(path))


def _calibrated_linear(bits=8):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QuantLinear(lin, bits, ActQuantizer(8))
    q.input_quantizer.start_observing()
    x = torch.randn(16, 64)
    q(x)
    q.input_quantizer.freeze()
    q.quantize_weight()
    return lin, q, x


def test_quant_linear_is_close_to_float():
    lin, q, x = _calibrated_linear()
    assert sqnr_db(lin(x), q(x)) > 30


def test_weight_codes_are_int8_in_narrow_range():
    _, q, _ = _calibrated_linear(bits=4)
    assert q.w_codes.dtype == torch.int8
    assert q.w_codes.min() >= -7 and q.w_codes.max() <= 7
    # per output channel: some row hits the range end
    assert (q.w_codes.abs().amax(1) == 7).all()


def test_quant_linear_exports_qdq_and_ort_matches_torch(tmp_path):
    _, q, x = _calibrated_linear()
    with torch.no_grad():
        ref = q(x).numpy()
    out, proto = _export_and_run(q, (x,), tmp_path / "lin.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    # int8 codes are stored, not float weights
    dtypes = {i.data_type for i in proto.graph.initializer if len(i.dims) == 2}
    assert dtypes == {onnx.TensorProto.INT8}
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_simulated_4bit_activations_export_with_clip(tmp_path):
    lin = nn.Linear(16, 8)
    q = QuantLinear(lin, 8, ActQuantizer(4))
    q.input_quantizer.start_observing()
    x = torch.randn(4, 16)
    q(x)
    q.input_quantizer.freeze()
    q.quantize_weight()
    with torch.no_grad():
        ref = q(x).numpy()
    out, proto = _export_and_run(q, (x,), tmp_path / "lin4.onnx")
    assert "Clip" in [n.op_type for n in proto.graph.node]
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_quant_conv_matches_ort(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    q = QuantConv2d(conv, 8, ActQuantizer(8))
    x = torch.randn(2, 3, 16, 16)
    q.input_quantizer.start_observing()
    q(x)
    q.input_quantizer.freeze()
    q.quantize_weight()
    with torch.no_grad():
        ref = q(x).numpy()
        assert sqnr_db(conv(x), q(x)) > 30
    out, _ = _export_and_run(q, (x,), tmp_path / "conv.onnx")
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_quant_matmul_both_operands(tmp_path):
    mm = QuantMatMul(ActQuantizer(8), ActQuantizer(8))
    a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 5)
    for qz in (mm.a_quantizer, mm.b_quantizer):
        qz.start_observing()
    mm(a, b)
    mm.a_quantizer.freeze()
    mm.b_quantizer.freeze()
    with torch.no_grad():
        ref = mm(a, b).numpy()
        assert sqnr_db(a @ b, mm(a, b)) > 30
    out, _ = _export_and_run(mm, (a, b), tmp_path / "mm.onnx")
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_percentile_observer_clips_outliers():
    q_min, q_pct = ActQuantizer(8, observer="minmax"), ActQuantizer(8, observer="percentile",
                                                                    percentile=99.9)
    x = torch.randn(10_000)
    x[0] = 1000.0  # one outlier
    for q in (q_min, q_pct):
        q.start_observing()
        q(x)
        q.freeze()
    assert q_pct.scale < q_min.scale / 50
    body = x[1:]
    assert sqnr_db(body, q_pct(body)) > sqnr_db(body, q_min(body)) + 20


def test_freeze_without_data_raises():
    q = ActQuantizer(8)
    q.start_observing()
    try:
        q.freeze()
    except RuntimeError as e:
        assert "before any calibration data" in str(e)
    else:
        raise AssertionError("freeze() without data must fail")


@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (2, 3, 17, 8), (1, 4, 65, 16)])
def test_opt_m_softmax_matmul_exports_two_integer_matmuls_matching_torch(tmp_path, shape):
    """probs @ v with a two-region probs quantizer: ORT runs P_fine @ V + P_coarse @ V on
    integer kernels and matches the torch simulation."""
    from compress.export.ort import make_session
    from compress.quant.modules import TwoRegionActQuantizer

    b, h, n, d = shape
    mm = QuantMatMul(TwoRegionActQuantizer(8), ActQuantizer(8))
    for qz in (mm.a_quantizer, mm.b_quantizer):
        qz.start_observing()
    g = torch.Generator().manual_seed(n)
    for _ in range(2):
        probs = torch.softmax(torch.randn(b, h, n, n, generator=g) * 3, -1)
        mm(probs, torch.randn(b, h, n, d, generator=g))
    mm.b_quantizer.freeze()
    best = mm.a_quantizer.search()
    assert best["split"] < 1
    probs = torch.softmax(torch.randn(b, h, n, n, generator=g) * 3, -1)
    v = torch.randn(b, h, n, d, generator=g)
    with torch.no_grad():
        ref = mm(probs, v).numpy()
        assert sqnr_db(probs @ v, mm(probs, v)) > 30
    out, proto = _export_and_run(mm, (probs, v), tmp_path / "mm2.onnx")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert [n.op_type for n in proto.graph.node].count("QuantizeLinear") == 3  # 2 probs + v
    opt = tmp_path / "opt.onnx"
    make_session(tmp_path / "mm2.onnx", threads=1, optimized_path=opt)
    kinds = [node.op_type for node in onnx.load(str(opt)).graph.node]
    assert kinds.count("QLinearMatMul") + kinds.count("MatMulIntegerToFloat") == 2, kinds
    assert "MatMul" not in kinds


def test_two_region_search_without_right_operand_raises():
    from compress.quant.modules import TwoRegionActQuantizer

    q = TwoRegionActQuantizer(8)
    q.start_observing()
    q(torch.rand(4, 8))
    with pytest.raises(RuntimeError, match="right operand"):
        q.search()


def test_channel_affine_without_shift_exports_no_sub(tmp_path):
    import onnx

    from compress.quant.modules import ChannelAffine

    x = torch.randn(2, 5, 8)
    s = torch.rand(8) + 0.5
    for shift, subs in ((torch.zeros(8), 0), (torch.randn(8), 1)):
        m = ChannelAffine(shift, 1 / s)
        torch.testing.assert_close(m(x), (x - shift) / s)
        path = tmp_path / f"a{subs}.onnx"
        torch.onnx.export(m, (x,), str(path), dynamo=False)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("Sub") == subs and ops.count("Mul") == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_opt_m_saturated_tail_exports_as_simulated(tmp_path, bits):
    """Inputs far beyond the calibrated tail saturate the tail region at its (bits - 1)-bit top
    code: ORT must clip there as the torch simulation does (without the narrowed Clip the uint8
    QuantizeLinear would saturate at 255 instead)."""
    from compress.quant.modules import TwoRegionActQuantizer

    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    q = QuantLinear(lin, 8, TwoRegionActQuantizer(bits))
    q.input_quantizer.start_observing()
    x = F.gelu(torch.randn(64, 32))
    x[::5, 3] += 8.0  # a long tail: the two-region form wins
    q(x)
    best = q.input_quantizer.search(q.weight.T)
    q.quantize_weight()
    assert best["tail"] and best["region_bits"] == bits - 1
    test = F.gelu(torch.randn(8, 32))
    test[:, 3] += 200.0  # far beyond the calibrated tail
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        x1, x2 = q.input_quantizer.parts(test)
        assert torch.allclose(x2[:, 3], q.input_quantizer.scale2 * qmax)  # saturated
        ref = q(test).numpy()
    out, proto = _export_and_run(q, (test,), tmp_path / "sat.onnx")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    assert [n.op_type for n in proto.graph.node].count("Clip") == 2  # one per region
