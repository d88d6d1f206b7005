import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.quant.binary import (
    BiMatMulAV,
    BiMatMulQK,
    BinaryLinear,
    BoolAttention,
    binarize_weight,
    binary_ops_flops,
    bool_ste,
    matmulnbits_2bit,
    pack_signs,
    sign_ste,
    unpack_signs,
    weight_signs_alpha,
)


def test_binary_weights_take_exactly_two_values_per_row():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * 0.1 + torch.linspace(-1, 1, 24)[:, None]  # rows with offsets
    b = binarize_weight(w, ste=False)
    wc = w - w.mean(1, keepdim=True)
    alpha = wc.abs().mean(1)
    for i in range(w.shape[0]):
        values = torch.unique(b[i])
        assert len(values) == 2
        torch.testing.assert_close(values, torch.stack([-alpha[i], alpha[i]]))
    # the sign follows the centred weight, not the raw one
    assert torch.equal(b > 0, wc >= 0)


def test_weight_ste_forward_is_exact_and_gradient_follows_clip():
    w = torch.tensor([[0.5, -2.5, 2.9, -0.9]], requires_grad=True)  # mean 0: W_c = W
    b = binarize_weight(w)
    torch.testing.assert_close(b.detach(), binarize_weight(w.detach(), ste=False), rtol=0, atol=0)
    b.sum().backward()
    # d clamp(W - mean W)/dW: 1 inside the clip range, minus the mean of that (BiBERT's STE)
    inside = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(w.grad, inside - inside.mean())


def test_sign_ste_passes_gradients_only_inside_clip_range():
    x = torch.tensor([-3.0, -0.999, -0.5, 0.0, 0.25, 0.99, 1.5, 7.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 0, 1, 1, 1, 1]
    (y * torch.arange(1.0, 9.0)).sum().backward()
    inside = (x.detach().abs() <= 1).float()
    assert torch.equal(x.grad, inside * torch.arange(1.0, 9.0))
    assert x.grad[[0, 6, 7]].abs().sum() == 0 and (x.grad[1:6] != 0).all()


def test_bool_ste_is_zero_one_with_clipped_gradient():
    x = torch.tensor([-10000.0, -0.3, 0.0, 0.2, 4.0], requires_grad=True)
    y = bool_ste(x)
    assert y.tolist() == [0, 0, 0, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_pack_unpack_roundtrip_is_one_bit_per_weight():
    signs = torch.rand(5, 37) > 0.5
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 5)
    assert torch.equal(unpack_signs(packed, 37), signs)
    assert pack_signs(torch.tensor([[True, False, True] + [False] * 5]))[0, 0] == 0b101


def test_matmulnbits_layout_decodes_to_plus_minus_alpha():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    signs, alpha = weight_signs_alpha(w)
    q, scales = matmulnbits_2bit(signs, alpha, 32)
    assert q.shape == (6, 2, 8) and scales.shape == (12,)
    codes = torch.stack([(q.to(torch.int32) >> s) & 3 for s in (0, 2, 4, 6)], -1).reshape(6, 64)
    values = (codes - 2).float() * scales.reshape(6, 2).repeat_interleave(32, 1)
    torch.testing.assert_close(values[:, :40], binarize_weight(w, ste=False))
    assert (codes[:, 40:] == 2).all()  # padding decodes to 0


def _export_run(module, x, path, dynamic=True):
    shapes = ({0: torch.export.Dim("b"), 1: torch.export.Dim("t", min=2)},) if dynamic else None
    with torch.no_grad():
        prog = torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=21,
                                 verbose=False, dynamic_shapes=shapes)
    prog.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("act", ["none", "sign"])
def test_binary_linear_export_runs_in_ort_and_matches_torch(tmp_path, act):
    torch.manual_seed(0)
    layer = BinaryLinear(nn.Linear(64, 48), act=act)
    layer.freeze()
    sess = _export_run(layer, torch.randn(2, 5, 64), tmp_path / "b.onnx")
    proto = onnx.load(str(tmp_path / "b.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops
    # no float weight matrix left in the file: 2-bit codes and one scale per row and block
    init = {i.name: i for i in proto.graph.initializer}
    assert init["qweight"].data_type == onnx.TensorProto.UINT8
    assert all(len(i.dims) < 2 or i.data_type == onnx.TensorProto.UINT8 for i in init.values())
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        ref = layer(x).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    # accuracy_level 4 quantizes float inputs to int8 per block (exact for ±1 inputs)
    tol = 1e-4 if act == "sign" else 0.02 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=tol)


def test_bi_attention_modules_export_like_torch(tmp_path):
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.qk, self.sm, self.av = BiMatMulQK(0.25), BoolAttention(), BiMatMulAV()

        def forward(self, x):
            return self.av(self.sm(self.qk(x, x.transpose(-1, -2))), x)

    torch.manual_seed(0)
    m = Att()
    sess = _export_run(m, torch.randn(2, 6, 16), tmp_path / "a.onnx")
    x = torch.randn(3, 9, 16)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # context entries are averages of ±1 over the attended keys
    assert np.all(np.abs(ref) <= 1 + 1e-6)


def test_binary_ops_are_counted_at_one_64th():
    assert binary_ops_flops(100.0, 6400.0) == 200.0
