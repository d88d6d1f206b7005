import pytest
import torch

from compress.quant.weight_only import (
    dequantize_groups,
    gptq,
    group_qparams,
    hessian,
    hqq,
    matmulnbits_tensors,
    pack_uint,
    rtn,
    unpack_uint,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_uint_round_trips(bits):
    codes = torch.randint(0, 2 ** bits, (5, 3, 64), dtype=torch.uint8)
    packed = pack_uint(codes, bits)
    assert packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack_uint(packed, bits, 64), codes)


def test_pack_uint_puts_low_bits_first():
    assert pack_uint(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21


@pytest.mark.parametrize("bits,symmetric",
                         [(2, False), (3, False), (4, True), (4, False), (8, True)])
def test_rtn_codes_stay_in_range_and_error_shrinks_with_bits(bits, symmetric):
    w = torch.randn(16, 64)
    gq = rtn(w, bits, 32, symmetric)
    assert int(gq.codes.max()) < 2 ** bits and gq.scale.shape == (16, 2)
    # Max error per element is half a step (no clipping at min-max ranges).
    step = gq.scale.repeat_interleave(32, 1)
    assert ((gq.dequantize() - w).abs() <= step * 0.5 + 1e-6).all() or symmetric
    rel = (gq.dequantize() - w).norm() / w.norm()
    assert rel < {2: 0.5, 3: 0.25, 4: 0.15, 8: 0.01}[bits]


def test_symmetric_zero_is_mid_code():
    _, zero = group_qparams(torch.randn(4, 32), 4, 32, symmetric=True)
    assert (zero == 8).all()


def _correlated_layer(k=128, n=64, samples=1024):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, k, generator=g) @ torch.randn(k, k, generator=g) * 0.2
    x += torch.randn(k, generator=g) * 2
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_layer_output_error_vs_rtn(bits):
    x, w = _correlated_layer()
    h = hessian(x)
    y = x @ w.T
    err = {name: float(((x @ gq.dequantize().T) - y).norm() / y.norm()) for name, gq in [
        ("rtn", rtn(w, bits, 32)), ("gptq", gptq(w, h, bits, 32)),
        ("gptq_ao", gptq(w, h, bits, 32, act_order=True))]}
    assert err["gptq"] < 0.7 * err["rtn"], err
    assert err["gptq_ao"] < 0.7 * err["rtn"], err


def test_gptq_codes_match_its_dequantized_weights():
    x, w = _correlated_layer(64, 16, 256)
    gq = gptq(w, hessian(x), 4, 32)
    assert torch.allclose(dequantize_groups(gq.codes, gq.scale, gq.zero, 32), gq.dequantize())


def test_hqq_weight_error_no_worse_than_rtn():
    w = torch.randn(64, 128) * 0.05
    w[:, 5] *= 20  # an outlier column widens every group's range
    e_rtn = (rtn(w, 3, 32).dequantize() - w).abs().mean()
    e_hqq = (hqq(w, 3, 32).dequantize() - w).abs().mean()
    assert e_hqq < e_rtn * 0.95


def test_matmulnbits_tensor_shapes():
    gq = rtn(torch.randn(48, 96), 4, 32)
    b, s, z = matmulnbits_tensors(gq)
    assert b.shape == (48, 3, 16) and s.shape == (48 * 3,) and z.shape == (48 * 2,)
    b2, _, z2 = matmulnbits_tensors(rtn(torch.randn(48, 96), 2, 32))
    assert b2.shape == (48, 3, 8) and z2.shape == (48,)
