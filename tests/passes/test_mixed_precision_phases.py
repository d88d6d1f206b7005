"""Each phase of the mixed_precision pass alone, on a two-block MLP (no pipeline, no export)."""

import pytest
import torch
from torch import nn

from compress.context import PassContext, PassReport
from compress.data import Dataset
from compress.models.handle import ModelHandle
from compress.passes.mixed_precision import (
    Evaluator,
    LayerBuilder,
    MixedPrecisionConfig,
    fixed_costs,
    layer_choices,
    measure_sensitivities,
    observe_ranges,
    plan_layers,
    report_layers,
    report_summary,
    search,
)
from compress.quant.mixed import LayerChoice
from compress.quant.modules import QuantLinear, TwoRegionActQuantizer
from compress.quant.nbits import NBitsLinear


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = _Mlp(dim)

    def forward(self, x):
        return x + self.mlp(x)


class _Tiny(nn.Module):
    """pixel_values [B, 1, 8, 8] -> 2 residual MLP blocks (width 64) -> 10 logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([_Block(64), _Block(64)])
        self.head = nn.Linear(64, 10)

    def forward(self, pixel_values):
        x = pixel_values.flatten(1)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _setup(tmp_path, **cfg):
    model = ModelHandle("image-classification", "timm", "tiny", module=_Tiny().eval())
    g = torch.Generator().manual_seed(1)
    calib = Dataset({"pixel_values": torch.randn(32, 1, 8, 8, generator=g)})
    config = MixedPrecisionConfig(**{"block_size": 32, "weight_bits": [2, 4, 8],
                                     "method": "rtn", "calibration_samples": 32,
                                     "sensitivity_samples": 16,
                                     "budget": {"avg_weight_bits": 6.0}, **cfg})
    ctx = PassContext(index=0, calib=calib, device=torch.device("cpu"), workdir=tmp_path,
                      out_dir=tmp_path, report=PassReport(0, "mixed_precision"), batch_size=16)
    return model, config, ctx


def test_plan_layers_splits_float_pinned_and_searched(tmp_path):
    model, config, ctx = _setup(tmp_path, overrides={"head": None, "blocks.0.mlp.fc1": 4})
    plan = plan_layers(model.module, config, "passes.0.")
    assert list(plan.floats) == ["head"]
    assert plan.pinned == {"blocks.0.mlp.fc1": (4, 8)}   # activations at the top width
    assert list(plan.search) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert len(plan.layers) == 5


def test_observe_ranges_records_ranges_elements_and_opt_m_on_post_gelu(tmp_path):
    model, config, ctx = _setup(tmp_path, opt_m=True)
    plan = plan_layers(model.module, config, "passes.0.")
    ranges = observe_ranges(model, plan, config, ctx)
    assert set(ranges) == set(plan.layers)
    assert ranges["blocks.0.mlp.fc1"].elements == 64 and ranges["blocks.0.mlp.fc2"].elements == 128
    lo, hi = ranges["blocks.0.mlp.fc2"].obs.range()
    assert -0.2 < float(lo) < 0 < float(hi)                # post-GELU: min near -0.17
    two = {n for n, r in ranges.items() if r.two_region is not None}
    assert two == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}
    row = ctx.report.layers["blocks.0.mlp.fc2"]
    assert row["opt_m_region_bits"] in (7, 8) and "opt_m_m" in row


def test_layer_choices_and_fixed_costs_count_stored_bytes(tmp_path):
    model, config, ctx = _setup(tmp_path, overrides={"head": 8})
    plan = plan_layers(model.module, config, "passes.0.")
    ranges = observe_ranges(model, plan, config, ctx)
    choices = layer_choices(plan, ranges, config)
    fc1 = next(c for c in choices if c.name == "blocks.0.mlp.fc1")
    assert fc1.configs == [(8, 8), (4, 8), (2, 8)] and fc1.params == 64 * 128
    # int8 per channel: 128 x (64 codes + fp32 scale + int8 zero point)
    assert fc1.size_bytes[(8, 8)] == 128 * 64 + 128 * 5
    # block 32, asymmetric: 4-bit codes + fp32 scale + 4-bit zero point per 32 weights
    assert fc1.size_bytes[(4, 8)] == 64 * 128 * (4 + 36 / 32) / 8
    assert fc1.act_bits_cost[(4, 8)] == 64 * 8
    fixed = fixed_costs(model.module, plan, ranges, config)
    assert fixed.params == 640 and fixed.nominal_bits == 640 * 8
    assert fixed.stored_bytes == 640 + 10 * 5                  # head pinned W8A8
    biases = 128 + 64 + 128 + 64 + 10
    assert fixed.other_bytes == 4 * biases


def test_layer_builder_makes_int8_qdq_or_block_layers(tmp_path):
    model, config, ctx = _setup(tmp_path)
    plan = plan_layers(model.module, config, "passes.0.")
    ranges = observe_ranges(model, plan, config, ctx)
    build = LayerBuilder(plan.layers, ranges, {}, config)
    assert isinstance(build("blocks.0.mlp.fc1", (8, 8)), QuantLinear)
    q4 = build("blocks.0.mlp.fc1", (4, 8))
    assert isinstance(q4, NBitsLinear) and q4.bits == 4
    assert build("blocks.0.mlp.fc1", (4, 8)).gq is q4.gq        # weights quantized once


def test_measure_sensitivities_grow_as_bits_fall(tmp_path):
    model, config, ctx = _setup(tmp_path)
    plan = plan_layers(model.module, config, "passes.0.")
    ranges = observe_ranges(model, plan, config, ctx)
    choices = layer_choices(plan, ranges, config)
    build = LayerBuilder(plan.layers, ranges, {}, config)
    ev = Evaluator(model, plan, build, list(ctx.calib.batches(16)), "kl")
    base, n = measure_sensitivities(choices, ev)
    assert n == len(choices) * 2                                # W4 and W2 per layer
    assert 0 <= base < 1e-3
    for c in choices:
        s = c.sensitivity
        assert s[(8, 8)] == 0.0 and 0 < s[(4, 8)] < s[(2, 8)]
    # The model is left at its top configuration.
    assert isinstance(model.module.get_submodule("blocks.0.mlp.fc1"), QuantLinear)


def _choice(name, params, sens4, sens2):
    cfgs = [(8, None), (4, None), (2, None)]
    return LayerChoice(name, params, cfgs, dict.fromkeys(cfgs, 0),
                       {(8, None): params * 9.25 / 8, (4, None): params * 5.125 / 8,
                        (2, None): params * 3.0625 / 8},
                       {(8, None): 0.0, (4, None): sens4, (2, None): sens2})


def test_search_stops_where_the_stored_bits_budget_holds():
    from compress.passes.mixed_precision import Budget
    from compress.quant.mixed import Fixed

    choices = [_choice("a", 1000, 0.01, 0.5), _choice("b", 1000, 0.2, 0.9)]
    measured = []

    def measure(state):
        measured.append(dict(state))
        return sum(c.sensitivity[state[c.name]] for c in choices)

    r = search(choices, 0.0, Fixed(), Budget(avg_weight_bits=7.2), [], measure)
    # 9.25 -> a at 4 bits: (5.125 + 9.25) / 2 = 7.1875 <= 7.2, one step
    assert r.chosen == 1 and r.state == {"a": (4, None), "b": (8, None)}
    assert r.weight_path[1].avg_weight_bits == pytest.approx(7.1875)
    assert r.weight_path[1].avg_weight_bits_nominal == pytest.approx(6.0)
    assert r.measured[1] == pytest.approx(0.01) and not r.act_path
    r = search(choices, 0.0, Fixed(), Budget(max_error=0.25), [], measure)
    assert r.state == {"a": (4, None), "b": (4, None)}          # next step (a at 2) costs 0.5


def test_report_phases_write_stored_and_nominal_bits(tmp_path):
    model, config, ctx = _setup(tmp_path, overrides={"head": None})
    plan = plan_layers(model.module, config, "passes.0.")
    ranges = observe_ranges(model, plan, config, ctx)
    choices = layer_choices(plan, ranges, config)
    fixed = fixed_costs(model.module, plan, ranges, config)
    build = LayerBuilder(plan.layers, ranges, {}, config)
    ev = Evaluator(model, plan, build, list(ctx.calib.batches(16)), "kl")
    base, n = measure_sensitivities(choices, ev)
    result = search(choices, base, fixed, config.budget, config.act_bits, ev.error)
    ev.apply(result.state)
    report_layers(ctx, model.module, plan, choices, result.state, {}, config)
    report_summary(ctx, plan, choices, fixed, result, base_error=base, final_error=ev.error(),
                   metric="kl", measurements=n, opt_m_layers=0, budget=config.budget)
    s = ctx.report.summary
    assert s["avg_weight_bits_stored"] <= 6.0
    rows = [ctx.report.layers[n] for n in plan.search]
    params = [r["params"] for r in rows]
    stored = sum(r["weight_bits_stored"] * p for r, p in zip(rows, params, strict=True))
    nominal = sum(r["weight_bits"] * p for r, p in zip(rows, params, strict=True))
    assert s["avg_weight_bits_stored"] == pytest.approx(stored / sum(params), abs=2e-3)
    assert s["avg_weight_bits_nominal"] == pytest.approx(nominal / sum(params), abs=2e-3)
    assert ctx.report.layers["head"]["weight_bits_stored"] == 32.0
    assert all("avg_weight_bits_stored" in t for t in s["trajectory"])
    assert (tmp_path / ctx.report.plots[0]["file"]).exists()


def test_two_region_copy_is_used_for_8_bit_post_gelu_inputs(tmp_path):
    model, config, ctx = _setup(tmp_path, opt_m=True)
    plan = plan_layers(model.module, config, "passes.0.")
    ranges = observe_ranges(model, plan, config, ctx)
    build = LayerBuilder(plan.layers, ranges, {}, config)
    assert isinstance(build("blocks.0.mlp.fc2", (8, 8)).input_quantizer, TwoRegionActQuantizer)
    assert not isinstance(build("blocks.0.mlp.fc1", (8, 8)).input_quantizer,
                          TwoRegionActQuantizer)
