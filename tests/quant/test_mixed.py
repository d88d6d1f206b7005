import pytest
import torch

from compress.quant.mixed import (
    Fixed,
    LayerChoice,
    averages,
    greedy_path,
    output_error,
    state_at,
    stored_bits,
    weight_storage_bytes,
)


def _choice(name, params, sens):
    cfgs = [(8, 8), (4, 8), (2, 8)]
    return LayerChoice(name, params, cfgs, dict.fromkeys(cfgs, 0),
                       {c: params * c[0] / 8 for c in cfgs},
                       {(8, 8): 0.0, (4, 8): sens[0], (2, 8): sens[1]})


def test_greedy_lowers_cheapest_error_per_bit_first():
    a = _choice("a", 100, (0.01, 0.5))   # insensitive at 4 bits
    b = _choice("b", 100, (0.2, 0.9))    # sensitive
    c = _choice("c", 1000, (0.05, 0.6))  # big: more bits saved per unit of error
    top = {x.name: x.configs[0] for x in (a, b, c)}
    path = greedy_path([a, b, c], 0.0, top)
    assert [s.layer for s in path[1:3]] == ["c", "a"]
    assert path[-1].avg_weight_bits == pytest.approx(2.0)
    # Monotone: each step lowers the average.
    assert all(p.avg_weight_bits > q.avg_weight_bits for p, q in zip(path, path[1:], strict=False))
    assert state_at(path, top, 1) == {"a": (8, 8), "b": (8, 8), "c": (4, 8)}
    assert path[2].predicted_error == pytest.approx(0.06)


def test_byte_saving_skips_widths_that_save_no_bytes():
    cfgs = [(8, None), (6, None), (4, None)]
    lc = LayerChoice("x", 10, cfgs, dict.fromkeys(cfgs, 0),
                     {(8, None): 10, (6, None): 10, (4, None): 5},
                     {(8, None): 0, (6, None): 0.0, (4, None): 0.1})
    path = greedy_path([lc], 0.0, {"x": (8, None)}, saving="bytes")
    assert [s.config for s in path[1:]] == [(4, None)]


def test_output_error_metrics():
    r = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    assert output_error(r, r, "cosine") == pytest.approx(0, abs=1e-7)
    assert output_error(r, r, "kl") == pytest.approx(0, abs=1e-7)
    o = [torch.tensor([[0.0, 1.0], [0.0, 2.0]])]
    assert output_error(r, o, "top1") == 0.5
    assert output_error(r, o, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        output_error(r, o, "bogus")


@pytest.mark.parametrize("cfg, kw, bits", [
    ((4, None), {"symmetric": True}, 4 + 32 / 32),             # block-32 INT4, fp32 scale
    ((4, None), {}, 4 + (32 + 4) / 32),                        # + a packed 4-bit zero point
    ((4, 8), {"block": 128}, 4 + (32 + 4) / 128),
    ((2, None), {}, 2 + (32 + 2) / 32),
    ((3, None), {"symmetric": True}, 8 + 32 / 32),             # 3 bits live in 8-bit containers
    ((6, None), {}, 8 + (32 + 8) / 32),
    ((4, None), {"float_zero": True}, 4 + (32 + 32) / 32),     # HQQ: fp32 zero points
    ((8, 8), {}, 8 + (32 + 8) / 64),                           # per-channel int8 Q/DQ, K = 64
    ((2, None), {"embedding": True}, 8 + (32 + 8) / 32),       # GatherBlockQuantized: 4/8 only
    (None, {}, 32.0),
])
def test_stored_bits_of_a_64x16_layer(cfg, kw, bits):
    """A Linear with 16 outputs and 64 inputs: exact stored bits per weight."""
    kw = {"block": 32, **kw}
    size = weight_storage_bytes(64 * 16, 16, cfg, **kw)
    assert stored_bits(size, 64 * 16) == pytest.approx(bits, abs=1e-12)


def test_averages_report_stored_and_nominal_bits():
    a = LayerChoice("a", 1024, [(8, None), (4, None)], {(8, None): 0, (4, None): 0},
                    {c: weight_storage_bytes(1024, 16, c, block=32, symmetric=True)
                     for c in [(8, None), (4, None)]})
    pinned = Fixed(nominal_bits=1024 * 8, stored_bytes=1024 + 4 * 16, params=1024,
                   other_bytes=100.0)
    avg = averages([a], {"a": (4, None)}, pinned)
    assert avg.weight_bits_nominal == pytest.approx(6.0)
    # (4 + 1) bits for a, (8 + 32 / 64) for the pinned per-channel layer
    assert avg.weight_bits_stored == pytest.approx((5 + 8.5) / 2)
    assert avg.size_bytes == pytest.approx(1024 * 5 / 8 + 1024 + 64 + 100)
