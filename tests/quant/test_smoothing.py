import torch

from compress.quant.smoothing import (
    fold_into_layernorm,
    fold_into_linear,
    quantized_linear_error,
    search_alpha,
    smoothing_factors,
)


def _outlier_inputs(n=512, c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, 3] = x[:, 3] * 40 + 25  # one large, off-centre outlier channel (as after LayerNorm)
    return x


def test_fold_keeps_linear_output():
    x = _outlier_inputs()
    w, b = torch.randn(16, 32), torch.randn(16)
    s, z = smoothing_factors(x.amin(0), x.amax(0), [w], alpha=0.5)
    w2, b2 = fold_into_linear(w, b, s, z)
    torch.testing.assert_close((x - z) / s @ w2.T + b2, x @ w.T + b, rtol=1e-4, atol=1e-3)


def test_fold_into_layernorm_then_linear_is_exact():
    torch.manual_seed(0)
    ln, lin = torch.nn.LayerNorm(32), torch.nn.Linear(32, 16)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 3)
        ln.bias.normal_()
    x = torch.randn(64, 32) * 3
    ref = lin(ln(x))
    h = ln(x).detach()
    s, z = smoothing_factors(h.amin(0), h.amax(0), [lin.weight], alpha=0.6)
    with torch.no_grad():
        g, b = fold_into_layernorm(ln.weight, ln.bias, s, z)
        ln.weight.copy_(g)
        ln.bias.copy_(b)
        w2, b2 = fold_into_linear(lin.weight, lin.bias, s, z)
        lin.weight.copy_(w2)
        lin.bias.copy_(b2)
    torch.testing.assert_close(lin(ln(x)), ref, rtol=1e-4, atol=1e-4)


def test_shift_centres_channels_and_scale_balances():
    x = _outlier_inputs()
    w = torch.randn(16, 32)
    s, z = smoothing_factors(x.amin(0), x.amax(0), [w], alpha=0.5, shift=True)
    x2 = (x - z) / s
    assert torch.allclose(x2.amax(0), -x2.amin(0), rtol=1e-4, atol=1e-4)  # centred
    # alpha 0.5 equalizes max|x'| and max|w'| per channel
    w2, _ = fold_into_linear(w, None, s, z)
    torch.testing.assert_close(x2.abs().amax(0), w2.abs().amax(0), rtol=1e-4, atol=1e-5)


def test_smoothing_reduces_w8a8_error_on_outlier_channel():
    x = _outlier_inputs(c=64)
    w, b = torch.randn(48, 64) * 0.1, torch.zeros(48)
    c = x.shape[1]
    plain = quantized_linear_error(x, w, b, torch.ones(c), torch.zeros(c))
    alpha, errors = search_alpha(x, [(w, b)], [0.3, 0.5, 0.7])
    assert errors[alpha] < 0.5 * plain
    shifted = errors[alpha]
    _, no_shift = search_alpha(x, [(w, b)], [alpha], shift=False)
    assert shifted < no_shift[alpha]  # the shift (SQ-b) helps on an off-centre channel
