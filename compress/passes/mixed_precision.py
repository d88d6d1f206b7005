"""Greedy mixed-precision PTQ (after MPTQ-ViT's Greedy MP): per-layer weight/activation bits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..context import PassContext
from ..errors import RecipeError
from ..models.handle import ModelHandle
from ..parallel import map_tasks
from ..patch.attention import route_qkv_bias
from ..quant.mixed import (
    Fixed,
    LayerChoice,
    Step,
    averages,
    greedy_path,
    output_error,
    state_at,
    stored_bits,
    weight_storage_bytes,
)
from ..quant.modules import ActQuantizer, QuantLinear, TwoRegionActQuantizer
from ..quant.observers import make_observer
from ..registry import PassConfig, register_pass
from ..targeting import LayerPatterns, _matches, check_patterns, select_modules, set_submodule
from .quantize import POST_GELU
from .weight_only import BlockSize, check_block_sizes, collect_hessians, make_nbits, quantize_weight

WBits = Literal[2, 3, 4, 5, 6, 8]
ABits = Literal[4, 6, 8]


class Budget(BaseModel):
    """What the search must reach. Size targets (avg_weight_bits, avg_act_bits, size_mb) are all
    met; ``max_error`` alone lowers widths as long as the measured error stays below it, and
    with size targets it is checked (a warning when missed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    avg_weight_bits: float | None = Field(
        None, gt=0, description="stored bits per weight, parameter-weighted mean: codes plus "
        "scales and zero points (block-32 INT4 with fp32 scales = 5, asymmetric 5.125; "
        "per-channel int8 = 8 + 40/in_features)")
    avg_act_bits: float | None = Field(None, gt=0, description="element-weighted mean")
    size_mb: float | None = Field(None, gt=0, description="estimated ONNX size")
    max_error: float | None = Field(None, gt=0, description="in the pass's metric")

    @model_validator(mode="after")
    def _one(self):
        if all(v is None for v in (self.avg_weight_bits, self.avg_act_bits, self.size_mb,
                                   self.max_error)):
            raise ValueError("set at least one of avg_weight_bits, avg_act_bits, size_mb, "
                             "max_error")
        return self


class Pin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weight_bits: WBits | None = None
    act_bits: ABits | None = None


class MixedPrecisionConfig(PassConfig):
    """Greedy mixed precision: per-layer weight and activation bits chosen by measured sensitivity.

    After MPTQ-ViT's Greedy MP (Tai et al., https://arxiv.org/abs/2401.14895). Every targeted
    layer starts at the highest width; each (layer, lower width) is measured alone on
    calibration data (model output error against the float model, fanned out with
    ``compress.parallel.map_tasks``); then the layer with the smallest error rise per bit saved
    is lowered, step by step, until the budget holds. Bits are stored bits: a weight's codes
    plus its share of scales and zero points (block-32 INT4 with fp32 scales is 5 bits, 5.125
    with zero points; per-channel int8 is 8 + 40/in_features), so ``budget.avg_weight_bits``
    and the size budget rank layers alike and 3/5/6-bit weights (8-bit containers) never pay;
    the report shows the nominal code widths beside. Weights below 8 bits are block-quantized
    (GPTQ by default) and exported as ``MatMulNBits`` (2, 4, 8 bits native; 3, 5, 6 simulated in
    the 8-bit container); W8A8 layers as INT8 Q/DQ; 4/6-bit activations are simulated with a
    clipped int8 range. ``overrides`` pin layers (``null`` keeps a layer float). The report
    lists each layer's bits and sensitivity and plots the search path. Needs calibration data.

    Recipe:
        - type: mixed_precision
          targets: [Linear]
          ignore: [head]
          weight_bits: [2, 4, 8]
          act_bits: [8]
          budget: {avg_weight_bits: 5.5}   # stored bits per weight
          overrides: {'re:blocks\\.0\\..*': 8}
    """

    type: Literal["mixed_precision"] = "mixed_precision"
    targets: LayerPatterns = Field(default_factory=lambda: ["Linear"],
                                   description="Linear/Embedding: class, name or re:<regex>")
    ignore: LayerPatterns = Field(default_factory=list, description="layers kept in float")
    weight_bits: list[WBits] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8],
                                     description="candidate weight widths")
    act_bits: list[ABits] = Field(default_factory=lambda: [8],
                                  description="candidate activation widths; [] = weight-only")
    budget: Budget
    overrides: dict[str, int | Pin | None] = Field(
        default_factory=dict, description="{layer pattern: weight bits | {weight_bits, "
                                          "act_bits} | null (float)}")
    metric: Literal["auto", "cosine", "kl", "rel_error", "top1"] = Field(
        "auto", description="output error; auto: cosine for embeddings, kl for logits")
    block_size: BlockSize = Field(32, description="weight block size below 8 bits (power of two)")
    symmetric: bool = False
    method: Literal["rtn", "gptq", "hqq"] = "gptq"
    mse_grid: int = Field(0, ge=0, le=100, description="weight scale search: range-shrink steps "
                                                        "per block by MSE (0: min-max)")
    opt_m: bool = Field(
        False, description="OPT-m: two-region quantizer, 8 bits in all (iso-bit: two 7-bit "
        "regions, or one 8-bit region where no tail pays), on post-GELU inputs (mlp.fc2, BERT "
        "output.dense), split and m searched by output error; needs act_bits")
    accuracy_level: Literal[0, 1, 4] = 4
    calibration_samples: int = Field(128, ge=1, le=100_000,
                                     description="Hessians and activation ranges")
    sensitivity_samples: int = Field(32, ge=1, le=100_000, description="samples per sensitivity")

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _sorted(cls, v, info):
        if info.field_name == "weight_bits" and not v:
            raise ValueError("weight_bits needs at least one width")
        return sorted(set(v), reverse=True)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v):
        check_patterns(list(v), "overrides")
        for k, pin in v.items():
            if isinstance(pin, int) and not 2 <= pin <= 8 or pin == 7:
                raise ValueError(f"overrides[{k!r}]: weight bits must be one of 2,3,4,5,6,8")
        return v


# ---- sensitivity tasks (module-level, self-contained: a backend may run them elsewhere) ------

@dataclass
class SensitivityTask:
    """One layer's candidate replacements (an item of ``map_tasks``)."""

    layer: str
    candidates: dict[tuple, nn.Module]


@dataclass
class SensitivityShared:
    """What every task reads: the model at its top configuration, batches, float outputs."""

    module: nn.Module
    task: str
    batches: list[dict]
    reference: list[torch.Tensor]
    metric: str


def _forward(module: nn.Module, task: str, batch: dict) -> torch.Tensor:
    if task == "image-classification":
        return module(batch["pixel_values"])
    return module(batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def measure_layer(t: SensitivityTask, s: SensitivityShared) -> dict[tuple, float]:
    """Swap the layer for each candidate in turn, run the batches, measure the output error."""
    original = s.module.get_submodule(t.layer)
    out = {}
    try:
        for cfg, cand in t.candidates.items():
            set_submodule(s.module, t.layer, cand)
            outs = [_forward(s.module, s.task, b) for b in s.batches]
            out[cfg] = output_error(s.reference, outs, s.metric)
    finally:
        set_submodule(s.module, t.layer, original)
    return out


# ---- helpers ----------------------------------------------------------------------------------

def _layer_size(m: nn.Module, cfg: tuple | None, block: int, symmetric: bool = False,
                float_zero: bool = False) -> float:
    """Stored bytes of ``m``'s weight at ``cfg`` (``compress.quant.mixed.weight_storage_bytes``)."""
    return weight_storage_bytes(m.weight.numel(), m.weight.shape[0], cfg, block=block,
                                symmetric=symmetric, embedding=isinstance(m, nn.Embedding),
                                float_zero=float_zero)


def _searched_widths(m: nn.Module, widths: list[int]) -> list[int]:
    """Weight widths the search may give ``m``. An embedding is stored by GatherBlockQuantized,
    which holds 4- or 8-bit codes only: a 2-bit table would take 8-bit storage and lose
    accuracy for nothing, so embeddings are searched over 4 and 8 (8 alone when neither is
    listed). ``overrides`` can still pin any width."""
    if not isinstance(m, nn.Embedding):
        return widths
    return [w for w in widths if w in (4, 8)] or [8]


def _pin_for(name: str, module: nn.Module, overrides: dict) -> tuple[bool, object]:
    for pattern, pin in overrides.items():
        if _matches(pattern, name, module):
            return True, pin
    return False, None


class _ActRange:
    """Observe a layer input's range (and element count per sample) on the float model."""

    def __init__(self, opt_m: bool = False):
        self.obs = make_observer("minmax", 99.99)
        self.elements = 0
        # OPT-m: keep a sample of input rows for the two-region search.
        self.two_region = TwoRegionActQuantizer(8) if opt_m else None
        if opt_m:
            self.two_region.start_observing()

    def __call__(self, mod, args):
        x = args[0]
        self.obs.observe(x)
        self.elements = x[0].numel()
        if self.two_region is not None:
            self.two_region(x)


def _act_quantizer(bits: int | None, rng: _ActRange | None) -> ActQuantizer | None:
    if bits is None:
        return None
    if bits == 8 and rng.two_region is not None and rng.two_region.mode == "quant":
        import copy

        return copy.deepcopy(rng.two_region)
    q = ActQuantizer(bits, symmetric=False)
    lo, hi = rng.obs.range()
    q.set_range(lo, hi)
    return q


# ---- phase 0: which layers, and what the float model looks like -------------------------------

@dataclass
class LayerPlan:
    """The targeted layers split by what the recipe asks of them."""

    layers: dict[str, nn.Module]            # every targeted layer (float modules)
    floats: dict[str, nn.Module]            # pinned to float (``null``)
    pinned: dict[str, tuple]                # pinned to a (weight bits, act bits)
    search: dict[str, nn.Module]            # searched

    def drop(self, names: list[str]) -> None:
        for n in names:
            for d in (self.layers, self.pinned, self.search):
                d.pop(n, None)


def plan_layers(module: nn.Module, config: MixedPrecisionConfig, prefix: str) -> LayerPlan:
    """Select the targeted layers and split them into float, pinned and searched ones."""
    layers = select_modules(module, config.targets, config.ignore, (nn.Linear, nn.Embedding),
                            field_prefix=prefix)
    for pattern in config.overrides:
        if not any(_matches(pattern, n, m) for n, m in layers.items()):
            raise RecipeError(f"{prefix}overrides key {pattern!r} matches no targeted layer",
                              [(f"{prefix}overrides.{pattern}",
                                f"targeted layers: {', '.join(list(layers)[:30])}")])
    plan = LayerPlan(layers, {}, {}, {})
    top_a = config.act_bits[0] if config.act_bits else None
    for n, m in layers.items():
        hit, pin = _pin_for(n, m, config.overrides)
        if hit and pin is None:
            plan.floats[n] = m
        elif hit:
            w = pin if isinstance(pin, int) else (pin.weight_bits or config.weight_bits[0])
            a = None if isinstance(m, nn.Embedding) else (
                top_a if isinstance(pin, int) or pin.act_bits is None else pin.act_bits)
            plan.pinned[n] = (w, a)
        else:
            plan.search[n] = m
    check_block_sizes({n: m for n, m in layers.items() if n not in plan.floats},
                      config.block_size, f"{prefix}block_size")
    return plan


@torch.no_grad()
def observe_ranges(model: ModelHandle, plan: LayerPlan, config: MixedPrecisionConfig,
                   ctx: PassContext) -> dict[str, _ActRange]:
    """Input ranges of the targeted Linear layers on the float model (one calibration pass),
    with OPT-m's two-region search on post-GELU inputs. Layers the data never reaches are
    dropped from ``plan`` (they stay float) and named in the report."""
    opt_m = config.opt_m and bool(config.act_bits)
    ranges = {n: _ActRange(opt_m and bool(POST_GELU.fullmatch(n)))
              for n, m in plan.layers.items() if isinstance(m, nn.Linear)}
    hooks = [plan.layers[n].register_forward_pre_hook(r) for n, r in ranges.items()]
    try:
        for batch in ctx.calib_batches(config.calibration_samples):
            model.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    unreached = [n for n, r in ranges.items() if r.obs.empty]
    for n in unreached:
        del ranges[n]
    plan.drop(unreached)
    if unreached:
        ctx.report.summary["skipped"] = [
            f"{len(unreached)} layer(s) never ran on the calibration data and stay float: "
            f"{', '.join(unreached[:8])}"]
    for n, r in ranges.items():
        if r.two_region is not None:
            best = r.two_region.search(plan.layers[n].weight.T)
            ctx.report.add_layer(n, opt_m_split=round(float(best["split"]), 4),
                                 opt_m_m=best["m"], opt_m_region_bits=best["region_bits"])
    return ranges


class LayerBuilder:
    """A targeted layer's quantized replacement for a (weight bits, act bits) configuration.

    W8 with activations is an int8 Q/DQ ``QuantLinear``; anything else block-quantized
    (``make_nbits``), its weight quantized once per (layer, width) and cached. ``hessians``
    (GPTQ) are collected before the builder exists."""

    def __init__(self, layers: dict[str, nn.Module], ranges: dict[str, _ActRange],
                 hessians: dict[str, torch.Tensor], config: MixedPrecisionConfig):
        self.layers, self.ranges, self.hessians, self.config = layers, ranges, hessians, config
        self._weights: dict[tuple[str, int], object] = {}

    def __call__(self, name: str, cfg: tuple) -> nn.Module:
        m, c = self.layers[name], self.config
        w, a = cfg
        if isinstance(m, nn.Linear) and w == 8 and a is not None:
            q = QuantLinear(m, 8, _act_quantizer(a, self.ranges[name]))
            q.quantize_weight()
            return q
        key = (name, w)
        if key not in self._weights:
            method = c.method if w < 8 and isinstance(m, nn.Linear) else "rtn"
            self._weights[key] = quantize_weight(m.weight, w, c.block_size, c.symmetric, method,
                                                 self.hessians.get(name), mse_grid=c.mse_grid)
        aq = _act_quantizer(a, self.ranges.get(name)) if isinstance(m, nn.Linear) else None
        return make_nbits(m, self._weights[key], aq, c.accuracy_level)


def _float_zero(m: nn.Module, cfg: tuple, config: MixedPrecisionConfig) -> bool:
    """HQQ keeps fp32 zero points (in the block-quantized Linear layers below 8 bits)."""
    return config.method == "hqq" and isinstance(m, nn.Linear) and cfg[0] < 8


def layer_choices(plan: LayerPlan, ranges: dict[str, _ActRange],
                  config: MixedPrecisionConfig) -> list[LayerChoice]:
    """Every searched layer's candidate (weight x activation) widths, highest first, with
    their activation cost and stored weight bytes."""
    a_list = config.act_bits or [None]
    choices = []
    for n, m in plan.search.items():
        acts = [None] if isinstance(m, nn.Embedding) else a_list
        cfgs = [(w, a) for w in _searched_widths(m, config.weight_bits) for a in acts]
        cfgs.sort(key=lambda c: (-c[0], -(c[1] or 32)))
        elements = ranges[n].elements if n in ranges else 0
        choices.append(LayerChoice(
            n, m.weight.numel(), cfgs, {c: elements * (c[1] or 0) for c in cfgs},
            {c: _layer_size(m, c, config.block_size, config.symmetric,
                            _float_zero(m, c, config)) for c in cfgs}))
    return choices


def fixed_costs(module: nn.Module, plan: LayerPlan, ranges: dict[str, _ActRange],
                config: MixedPrecisionConfig) -> Fixed:
    """Pinned layers' bits and everything not searched, for the averages and the size."""
    nominal = stored = params = a_bits = a_elems = 0.0
    for n, (w, a) in plan.pinned.items():
        m = plan.layers[n]
        nominal += m.weight.numel() * w
        stored += _layer_size(m, (w, a), config.block_size, config.symmetric,
                              _float_zero(m, (w, a), config))
        params += m.weight.numel()
        if a is not None and n in ranges:
            a_bits += ranges[n].elements * a
            a_elems += ranges[n].elements
    # Buffers are exported too (BERT's position_ids and token_type_ids: 8 kB of int64).
    other = sum(p.numel() * 4.0 for p in _float_params(module, plan.layers)) + sum(
        b.numel() * b.element_size() for b in module.buffers())
    other += sum(4.0 * m.weight.numel() for m in plan.floats.values())
    return Fixed(nominal, stored, params, a_bits, a_elems, other)


# ---- phase 1: sensitivities ---------------------------------------------------------------------

class Evaluator:
    """Measures the model's output error against the float outputs on fixed batches, for any
    configuration of the targeted layers."""

    def __init__(self, model: ModelHandle, plan: LayerPlan, build: LayerBuilder,
                 batches: list[dict], metric: str):
        self.model, self.plan, self.build = model, plan, build
        self.batches, self.metric = batches, metric
        with torch.no_grad():
            for n, m in plan.layers.items():
                set_submodule(model.module, n, m)
            self.reference = [model.forward(b) for b in batches]

    def apply(self, state: dict[str, tuple]) -> None:
        for n, cfg in state.items():
            set_submodule(self.model.module, n, self.build(n, cfg))

    @torch.no_grad()
    def error(self, state: dict[str, tuple] | None = None) -> float:
        if state:
            self.apply(state)
        outs = [self.model.forward(b) for b in self.batches]
        return output_error(self.reference, outs, self.metric)


def measure_sensitivities(choices: list[LayerChoice], ev: Evaluator) -> tuple[float, int]:
    """Set the model at its top configuration (pinned layers as pinned) and measure each
    single-axis lowering (weight or activation) of each layer alone; fills
    ``choice.sensitivity`` (additive across the two axes, as in Greedy MP). Returns the top
    configuration's error and the number of measurements."""
    ev.apply(ev.plan.pinned)
    ev.apply({c.name: c.configs[0] for c in choices})
    base_error = ev.error()
    tasks = []
    for c in choices:
        tw, ta = c.configs[0]
        cands = {cfg: ev.build(c.name, cfg) for cfg in c.configs
                 if cfg != c.configs[0] and (cfg[0] == tw or cfg[1] == ta)}
        tasks.append(SensitivityTask(c.name, cands))
    shared = SensitivityShared(ev.model.module, ev.model.task, ev.batches, ev.reference,
                               ev.metric)
    results = map_tasks(measure_layer, tasks, description="mixed_precision sensitivities",
                        shared=shared)
    for c, res in zip(choices, results, strict=True):
        tw, ta = c.configs[0]
        sw = {cfg[0]: e - base_error for cfg, e in res.items() if cfg[1] == ta}
        sa = {cfg[1]: e - base_error for cfg, e in res.items() if cfg[0] == tw}
        sw[tw], sa[ta] = 0.0, 0.0
        c.sensitivity = {cfg: sw[cfg[0]] + sa[cfg[1]] for cfg in c.configs}
    return base_error, sum(len(t.candidates) for t in tasks)


# ---- phase 2: search ----------------------------------------------------------------------------

@dataclass
class SearchResult:
    state: dict[str, tuple]          # chosen configuration of the searched layers
    weight_path: list[Step]
    act_path: list[Step]
    chosen: int                      # index on weight_path
    measured: dict[int, float]       # measured error at points of weight_path


def search(choices: list[LayerChoice], base_error: float, fixed: Fixed, budget: Budget,
           act_bits: list[int], measure) -> SearchResult:
    """Greedy MP: lower weight widths along the greedy path until the size targets hold (or,
    with ``max_error`` alone, as far as the measured error allows), then activation widths
    the same way. ``measure(state) -> error`` runs the model at a configuration."""
    b = budget
    top = {c.name: c.configs[0] for c in choices}
    wpath = greedy_path(choices, base_error, top, phase="weight", fixed=fixed)

    def meets(s: Step) -> bool:
        return ((b.avg_weight_bits is None or s.avg_weight_bits <= b.avg_weight_bits + 1e-9) and
                (b.size_mb is None or s.size_bytes / 1e6 <= b.size_mb))

    size_targets = b.avg_weight_bits is not None or b.size_mb is not None
    if size_targets:
        k = next(i for i, s in enumerate(wpath) if meets(s))
    elif b.max_error is not None:
        k = _longest_within(wpath, top, b.max_error, measure)
    else:
        k = 0
    state = state_at(wpath, top, k)
    measured = {0: base_error, k: measure(state)}
    apath = []
    if len(act_bits) > 1 and (b.avg_act_bits is not None or not size_targets):
        apath = greedy_path(choices, base_error, state, phase="act", fixed=fixed,
                            saving="act_bits")
        if b.avg_act_bits is not None:
            ka = next(i for i, s in enumerate(apath)
                      if s.avg_act_bits is not None and s.avg_act_bits <= b.avg_act_bits + 1e-9)
        else:
            ka = _longest_within(apath, state, b.max_error, measure)
        state = state_at(apath, state, ka)
        apath = apath[:ka + 1]
    # Trajectory: measure a handful of points along the weight path for the plot.
    for i in sorted({round(j * (len(wpath) - 1) / 6) for j in range(7)} - set(measured)):
        measured[i] = measure(state_at(wpath, top, i))
    return SearchResult(state, wpath, apath, k, measured)


# ---- phase 4: report ----------------------------------------------------------------------------

def report_layers(ctx: PassContext, module: nn.Module, plan: LayerPlan, choices, state,
                  hessians: dict, config: MixedPrecisionConfig) -> None:
    """Per layer: nominal and stored weight bits, activation bits, sensitivities, SQNR."""
    sens = {c.name: c.sensitivity for c in choices}
    for n, m in plan.layers.items():
        params = m.weight.numel()
        if n in plan.floats:
            ctx.report.add_layer(n, kind=type(m).__name__, params=params, weight_bits=None,
                                 weight_bits_stored=32.0, act_bits=None, simulated=False,
                                 pinned=True)
            continue
        cfg = state[n] if n in state else plan.pinned[n]
        q = module.get_submodule(n)
        w, a = cfg
        # OPT-m's iso-bit 8-bit input is two 7-bit regions: clipped uint8 codes, simulated too
        aq = getattr(q, "input_quantizer", None)
        simulated = w not in (2, 4, 8) or (a is not None and a != 8) or (
            isinstance(aq, TwoRegionActQuantizer) and aq.simulated)
        size = _layer_size(m, cfg, config.block_size, config.symmetric,
                           _float_zero(m, cfg, config))
        ctx.report.add_layer(n, sqnr_db=_weight_sqnr(m, q, hessians.get(n)))
        ctx.report.add_layer(
            n, kind=type(m).__name__, params=params, weight_bits=w,
            weight_bits_stored=round(stored_bits(size, params), 3), act_bits=a,
            simulated=simulated, pinned=n in plan.pinned, onnx=type(q).__name__,
            sensitivity=round(sens[n][cfg], 6) if n in sens else None,
            # Error rise with only this layer lowered to each width (activations at the top).
            sensitivity_by_bits={f"W{c[0]}A{c[1] if c[1] is not None else 'f'}": round(v, 6)
                                 for c, v in sens[n].items()} if n in sens else None)


def report_summary(ctx: PassContext, plan: LayerPlan, choices, fixed: Fixed,
                   result: SearchResult, *, base_error: float, final_error: float, metric: str,
                   measurements: int, opt_m_layers: int, budget: Budget) -> None:
    """Pass summary (averages, errors, counts), the search trajectory and its plot."""
    final = averages(choices, result.state, fixed)
    wpath, k = result.weight_path, result.chosen
    summary = {
        "metric": metric, "base_error": round(base_error, 6), "final_error": round(final_error, 6),
        "predicted_error": round(wpath[k].predicted_error, 6),
        "steps": k + max(len(result.act_path) - 1, 0),
        # Stored: codes plus scales and zero points per weight (what budget.avg_weight_bits
        # counts); nominal: the code widths alone.
        "avg_weight_bits_stored": round(final.weight_bits_stored, 3),
        "avg_weight_bits_nominal": round(final.weight_bits_nominal, 3),
        "avg_act_bits": None if final.act_bits is None else round(final.act_bits, 3),
        "estimated_size_mb": round(final.size_bytes / 1e6, 3),
        "searched_layers": len(plan.search), "pinned_layers": len(plan.pinned),
        "float_layers": len(plan.floats), "sensitivities_measured": measurements,
        "opt_m_layers": opt_m_layers,
        "bits_histogram": _histogram(result.state, plan.pinned)}
    if budget.max_error is not None and final_error > budget.max_error:
        ctx.report.warn(f"measured {metric} error {final_error:.4g} exceeds budget.max_error "
                        f"{budget.max_error} at the size budget")
        summary["max_error_met"] = False
    ctx.report.summary.update(summary)
    measured = result.measured
    ctx.report.summary["trajectory"] = [
        {"step": i, "size_mb": round(s.size_bytes / 1e6, 4),
         "avg_weight_bits_stored": round(s.avg_weight_bits, 3),
         "avg_weight_bits_nominal": round(s.avg_weight_bits_nominal, 3),
         "predicted_error": round(s.predicted_error, 6),
         "measured_error": round(measured[i], 6) if i in measured else None}
        for i, s in enumerate(wpath) if i in measured or i % max(len(wpath) // 40, 1) == 0]
    _plot(ctx, wpath, measured, k, metric)


# ---- the pass ---------------------------------------------------------------------------------

@register_pass(MixedPrecisionConfig, needs_calibration=True)
def mixed_precision(model: ModelHandle, config: MixedPrecisionConfig, ctx: PassContext) -> None:
    prefix = f"passes.{ctx.index}."
    module = model.module
    route_qkv_bias(module)  # BEiT/EVA qkv would otherwise bypass the quantized module
    plan = plan_layers(module, config, prefix)
    metric = config.metric if config.metric != "auto" else (
        "cosine" if model.task == "text-embedding" else "kl")
    ranges = observe_ranges(model, plan, config, ctx)
    ctx.progress(0.05, "activation ranges observed")
    choices = layer_choices(plan, ranges, config)
    fixed = fixed_costs(module, plan, ranges, config)
    _check_feasible(config, choices, fixed, prefix)

    linears = {n: m for n, m in plan.layers.items()
               if isinstance(m, nn.Linear) and n not in plan.floats}
    hessians = collect_hessians(model, linears, ctx, config.calibration_samples) \
        if config.method == "gptq" else {}
    ctx.progress(0.15, "Hessians collected")
    build = LayerBuilder(plan.layers, ranges, hessians, config)

    batches = list(ctx.calib.take(config.sensitivity_samples).batches(ctx.batch_size, ctx.device))
    ev = Evaluator(model, plan, build, batches, metric)
    ctx.progress(0.3, "measuring sensitivities")
    base_error, measurements = measure_sensitivities(choices, ev)

    result = search(choices, base_error, fixed, config.budget, config.act_bits, ev.error)
    ev.apply(result.state)  # phase 3: apply the chosen configuration
    final_error = ev.error()
    ctx.progress(0.95, "final configuration applied")

    report_layers(ctx, module, plan, choices, result.state, hessians, config)
    report_summary(ctx, plan, choices, fixed, result, base_error=base_error,
                   final_error=final_error, metric=metric, measurements=measurements,
                   opt_m_layers=sum(r.two_region is not None for r in ranges.values()),
                   budget=config.budget)


def _weight_sqnr(float_layer: nn.Module, q: nn.Module, h: torch.Tensor | None) -> float:
    """Weight-error SQNR in dB, weighted by the input Hessian when there is one (output SQNR
    of the layer on the calibration inputs, activation rounding aside)."""
    import math

    w = float_layer.weight.detach().float().cpu()
    e = w - q.dequantized_weight().detach().float().cpu()
    if h is not None:
        hf = h.float()
        sig, noise = float((w @ hf * w).sum()), float((e @ hf * e).sum())
    else:
        sig, noise = float(w.pow(2).sum()), float(e.pow(2).sum())
    return round(10 * math.log10(max(sig, 1e-30) / max(noise, 1e-30)), 2)


def _float_params(module: nn.Module, layers: dict[str, nn.Module]):
    """Parameters outside the targeted weights (biases, norms, other layers): stay float."""
    skip = {id(m.weight) for m in layers.values()}
    seen = set()
    for p in module.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        yield p


def _longest_within(path, start, max_error, measure) -> int:
    """Largest prefix of ``path`` whose measured error is within ``max_error`` (binary search
    on the predicted-monotone path)."""
    lo, hi = 0, len(path) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(state_at(path, start, mid)) <= max_error:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _histogram(state: dict[str, tuple], pinned: dict[str, tuple]) -> dict[str, int]:
    h: dict[str, int] = {}
    for cfg in [*state.values(), *pinned.values()]:
        key = f"W{cfg[0]}A{cfg[1] if cfg[1] is not None else 'f'}"
        h[key] = h.get(key, 0) + 1
    return dict(sorted(h.items()))


def _check_feasible(config: MixedPrecisionConfig, choices: list[LayerChoice], fixed: Fixed,
                    prefix: str) -> None:
    """Refuse budgets that even the lowest configuration misses (a RecipeError naming the
    lowest reachable value)."""
    b = config.budget
    lowest = {c.name: min(c.configs, key=lambda x: (x[0], x[1] or 0)) for c in choices}
    low = averages(choices, lowest, fixed)
    if b.avg_weight_bits is not None and low.weight_bits_stored > b.avg_weight_bits + 1e-9:
        raise RecipeError(
            f"{prefix}budget.avg_weight_bits={b.avg_weight_bits} is unreachable: with every "
            f"searchable layer at {min(config.weight_bits)} bits and the pinned layers as set, "
            f"the average is {low.weight_bits_stored:.3f} stored bits per weight (codes, "
            f"scales and zero points; {low.weight_bits_nominal:.3f} nominal)",
            [(f"{prefix}budget.avg_weight_bits",
              f"lowest reachable average is {low.weight_bits_stored:.3f} stored bits")])
    if b.avg_act_bits is not None:
        if not config.act_bits:
            raise RecipeError(f"{prefix}budget.avg_act_bits needs act_bits candidates",
                              [(f"{prefix}budget.avg_act_bits", "act_bits is empty")])
        if low.act_bits is None or low.act_bits > b.avg_act_bits + 1e-9:
            raise RecipeError(
                f"{prefix}budget.avg_act_bits={b.avg_act_bits} is unreachable (lowest "
                f"average {low.act_bits})", [(f"{prefix}budget.avg_act_bits", "unreachable")])
    if b.size_mb is not None and low.size_bytes / 1e6 > b.size_mb:
        raise RecipeError(
            f"{prefix}budget.size_mb={b.size_mb} is unreachable: the smallest configuration "
            f"is {low.size_bytes / 1e6:.2f} MB (float layers and pinned layers included)",
            [(f"{prefix}budget.size_mb",
              f"smallest reachable size is {low.size_bytes / 1e6:.2f} MB")])
    if not choices and (b.avg_weight_bits or b.size_mb or b.avg_act_bits):
        raise RecipeError(f"{prefix}overrides pin every targeted layer; nothing to search",
                          [(f"{prefix}overrides", "no layer left to search")])


def _plot(ctx: PassContext, path, measured: dict, chosen: int, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([s.size_bytes / 1e6 for s in path], [s.predicted_error for s in path], "-",
            color="#888", label="predicted (sum of sensitivities)")
    xs = sorted(measured)
    ax.plot([path[i].size_bytes / 1e6 for i in xs], [measured[i] for i in xs], "o-",
            color="#1f77b4", label="measured")
    ax.axvline(path[chosen].size_bytes / 1e6, color="#d62728", ls="--", label="chosen")
    ax.set_xlabel("estimated model size (MB)")
    ax.set_ylabel(f"output error ({metric})")
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Greedy mixed precision: error against size")
    ctx.save_plot(fig, "mixed_precision_trajectory", "Greedy MP search trajectory")
