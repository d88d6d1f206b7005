import pytest
import torch

from compress.quant.functional import fake_quantize, search_weight_scale, symmetric_qparams
from compress.quant.observers import make_observer, quantization_error, search_clip_range


def _long_tail(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    tail = torch.rand(n // 500, generator=g) * 60  # sparse large values (post-GELU-like tail)
    return torch.cat([x, tail])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_search_observer_beats_minmax_on_long_tail(kind):
    x = _long_tail()
    mm, sr = make_observer("minmax"), make_observer(kind)
    for chunk in x.split(50_000):
        mm.observe(chunk)
        sr.observe(chunk)
    lo, hi = sr.range()
    assert hi < mm.max_val  # clipped the tail
    err_search = quantization_error(x, lo, hi, 8, False, "mse")
    err_minmax = quantization_error(x, mm.min_val, mm.max_val, 8, False, "mse")
    assert err_search < 0.97 * err_minmax


def test_search_never_widens_and_keeps_minmax_on_uniform_data():
    x = torch.linspace(-1, 3, 10_000)
    lo, hi = search_clip_range(x, x.min(), x.max(), metric="mse")
    assert x.min() <= lo <= 0 <= hi <= x.max()
    assert hi > 2.9  # nothing to clip on uniform data


def test_four_bit_search_clips_harder_than_eight_bit():
    x = _long_tail()
    _, hi8 = search_clip_range(x, x.min(), x.max(), bits=8)
    _, hi4 = search_clip_range(x, x.min(), x.max(), bits=4)
    assert hi4 < hi8


@pytest.mark.parametrize("metric", ["mse", "cosine", "percentile"])
def test_weight_scale_search_lowers_error_at_4_bits(metric):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 0] *= 12  # an outlier column stretches every row's min-max scale
    base = symmetric_qparams(w.abs().amax(1), 4)[0]
    scale = search_weight_scale(w, 4, metric)
    assert (scale <= base + 1e-8).all()

    def err(s):
        return (fake_quantize(w, s[:, None], torch.zeros(()), -7, 7) - w).pow(2).mean()

    if metric != "percentile":
        assert err(scale) < err(base)


def test_unknown_observer_is_an_error():
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("entropy")
