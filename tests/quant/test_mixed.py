import pytest
import torch

from compress.quant.mixed import LayerChoice, greedy_path, output_error, state_at


def _choice(name, params, sens):
    cfgs = [(8, 8), (4, 8), (2, 8)]
    return LayerChoice(name, cfgs, {c: params * c[0] for c in cfgs}, dict.fromkeys(cfgs, 0),
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
    lc = LayerChoice("x", cfgs, {c: 10 * c[0] for c in cfgs}, dict.fromkeys(cfgs, 0),
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
