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
from ..quant.mixed import LayerChoice, greedy_path, output_error, state_at
from ..quant.modules import ActQuantizer, QuantLinear, TwoRegionActQuantizer
from ..quant.observers import make_observer
from ..quant.weight_only import container_bits
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
    avg_weight_bits: float | None = Field(None, gt=0, description="parameter-weighted mean")
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
    is lowered, step by step, until the budget holds. Weights below 8 bits are block-quantized
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
          budget: {avg_weight_bits: 4.5}
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
        False, description="OPT-m: two-region 8-bit quantizer on post-GELU inputs (mlp.fc2, BERT "
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

def _layer_size(m: nn.Module, cfg: tuple | None, block: int, symmetric: bool = False) -> float:
    n = m.weight.numel()
    if cfg is None:
        return 4.0 * n
    w, a = cfg
    if isinstance(m, nn.Linear) and w == 8 and a is not None:
        return n + 5.0 * m.out_features            # int8 codes + fp32 scale + zp per channel
    if isinstance(m, nn.Embedding):
        c = w if w in (4, 8) else 8                # GatherBlockQuantized's containers
    else:
        c = container_bits(w)
    # Symmetric zero points equal the operators' default and are dropped at export.
    zero = 0.0 if symmetric else c / 8
    blocks = n / block
    return n * c / 8 + blocks * (4 + zero)


def _searched_widths(m: nn.Module, widths: list[int]) -> list[int]:
    """Weight widths the search may give ``m``. An embedding is stored by GatherBlockQuantized,
    which holds 4- or 8-bit codes only: a 2-bit table would take 8-bit storage and lose
    accuracy for nothing (it looks cheap only to the nominal average), so embeddings are
    searched over 4 and 8 (8 alone when neither is listed). ``overrides`` can still pin any
    width."""
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


@register_pass(MixedPrecisionConfig, needs_calibration=True)
def mixed_precision(model: ModelHandle, config: MixedPrecisionConfig, ctx: PassContext) -> None:
    prefix = f"passes.{ctx.index}."
    module = model.module
    route_qkv_bias(module)  # BEiT/EVA qkv would otherwise bypass the quantized module
    layers = select_modules(module, config.targets, config.ignore, (nn.Linear, nn.Embedding),
                            field_prefix=prefix)
    named = {n: m for n, m in module.named_modules() if n}
    for pattern in config.overrides:
        if not any(_matches(pattern, n, m) for n, m in named.items() if n in layers):
            raise RecipeError(f"{prefix}overrides key {pattern!r} matches no targeted layer",
                              [(f"{prefix}overrides.{pattern}",
                                f"targeted layers: {', '.join(list(layers)[:30])}")])
    floats, pinned, search = {}, {}, {}
    top_a = config.act_bits[0] if config.act_bits else None
    for n, m in layers.items():
        hit, pin = _pin_for(n, m, config.overrides)
        if hit and pin is None:
            floats[n] = m
        elif hit:
            w = pin if isinstance(pin, int) else (pin.weight_bits or config.weight_bits[0])
            a = None if isinstance(m, nn.Embedding) else (
                top_a if isinstance(pin, int) or pin.act_bits is None else pin.act_bits)
            pinned[n] = (m, (w, a))
        else:
            search[n] = m
    check_block_sizes({n: m for n, m in layers.items() if n not in floats},
                      config.block_size, f"{prefix}block_size")
    metric = config.metric if config.metric != "auto" else (
        "cosine" if model.task == "text-embedding" else "kl")

    # Float statistics: activation ranges and GPTQ Hessians from one calibration pass each.
    opt_m = config.opt_m and bool(config.act_bits)
    ranges = {n: _ActRange(opt_m and bool(POST_GELU.fullmatch(n)))
              for n, m in layers.items() if isinstance(m, nn.Linear)}
    hooks = [layers[n].register_forward_pre_hook(r) for n, r in ranges.items()]
    with torch.no_grad():
        try:
            for batch in ctx.calib_batches(config.calibration_samples):
                model.forward(batch)
        finally:
            for h in hooks:
                h.remove()
    # Layers the calibration data never reaches have no activation range: they stay float.
    unreached = [n for n, r in ranges.items() if r.obs.empty]
    for n in unreached:
        del ranges[n], layers[n]
        search.pop(n, None)
        pinned.pop(n, None)
    if unreached:
        ctx.report.summary["skipped"] = [
            f"{len(unreached)} layer(s) never ran on the calibration data and stay float: "
            f"{', '.join(unreached[:8])}"]
    opt_m_layers = {}
    for n, r in ranges.items():
        if r.two_region is not None:
            best = r.two_region.search(layers[n].weight.T)
            opt_m_layers[n] = best
            ctx.report.add_layer(n, opt_m_split=round(float(best["split"]), 4),
                                 opt_m_m=best["m"])
    ctx.progress(0.05, "activation ranges observed")

    gq_cache: dict[tuple[str, int], object] = {}

    def build(name: str, cfg: tuple) -> nn.Module:
        m = layers[name]
        w, a = cfg
        if isinstance(m, nn.Linear) and w == 8 and a is not None:
            q = QuantLinear(m, 8, _act_quantizer(a, ranges[name]))
            q.quantize_weight()
            return q
        key = (name, w)
        if key not in gq_cache:
            method = config.method if w < 8 and isinstance(m, nn.Linear) else "rtn"
            gq_cache[key] = quantize_weight(m.weight, w, config.block_size, config.symmetric,
                                            method, hessians.get(name),
                                            mse_grid=config.mse_grid)
        aq = _act_quantizer(a, ranges.get(name)) if isinstance(m, nn.Linear) else None
        return make_nbits(m, gq_cache[key], aq, config.accuracy_level)

    # Every layer's candidate configurations (weight x activation widths).
    a_list = config.act_bits or [None]
    choices: list[LayerChoice] = []
    for n, m in search.items():
        acts = [None] if isinstance(m, nn.Embedding) else a_list
        cfgs = [(w, a) for w in _searched_widths(m, config.weight_bits) for a in acts]
        cfgs.sort(key=lambda c: (-c[0], -(c[1] or 32)))
        params = m.weight.numel()
        elements = ranges[n].elements if n in ranges else 0
        choices.append(LayerChoice(
            n, cfgs, {c: params * c[0] for c in cfgs},
            {c: elements * (c[1] or 0) for c in cfgs},
            {c: _layer_size(m, c, config.block_size, config.symmetric) for c in cfgs}))

    # Fixed contributions to the averages and the size.
    w_fixed = [0.0, 0.0]
    a_fixed = [0.0, 0.0]
    fixed_bytes = 0.0
    for n, (m, (w, a)) in pinned.items():
        w_fixed[0] += m.weight.numel() * w
        w_fixed[1] += m.weight.numel()
        if a is not None and n in ranges:
            a_fixed[0] += ranges[n].elements * a
            a_fixed[1] += ranges[n].elements
        fixed_bytes += _layer_size(m, (w, a), config.block_size, config.symmetric)
    # Buffers are exported too (BERT's position_ids and token_type_ids: 8 kB of int64).
    total_param_bytes = sum(p.numel() * 4.0 for p in _float_params(module, layers)) + sum(
        b.numel() * b.element_size() for b in module.buffers())
    fixed_bytes += total_param_bytes + sum(4.0 * m.weight.numel() for m in floats.values())
    b = config.budget
    _check_feasible(config, choices, pinned, ranges, w_fixed, a_fixed, fixed_bytes, prefix)

    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear) and n not in floats}
    hessians = collect_hessians(model, linears, ctx, config.calibration_samples) \
        if config.method == "gptq" else {}
    ctx.progress(0.15, "Hessians collected")

    # The starting model: searched layers at their top config, pinned layers at theirs.
    top = {c.name: c.configs[0] for c in choices}
    for n, (_, cfg) in pinned.items():
        set_submodule(module, n, build(n, cfg))
    top_modules = {n: build(n, cfg) for n, cfg in top.items()}
    for n, q in top_modules.items():
        set_submodule(module, n, q)

    batches = list(ctx.calib.take(config.sensitivity_samples).batches(ctx.batch_size, ctx.device))
    reference = []
    with torch.no_grad():
        for n, m in layers.items():
            set_submodule(module, n, m)
        reference = [model.forward(b) for b in batches]
        for n, (_, cfg) in pinned.items():
            set_submodule(module, n, build(n, cfg))
        for n, q in top_modules.items():
            set_submodule(module, n, q)
        base_error = output_error(reference, [model.forward(b) for b in batches], metric)

    # Sensitivity of each single-axis lowering (weight or activation), others at the top.
    tasks = []
    for c in choices:
        tw, ta = c.configs[0]
        cands = {cfg: build(c.name, cfg) for cfg in c.configs
                 if cfg != c.configs[0] and (cfg[0] == tw or cfg[1] == ta)}
        tasks.append(SensitivityTask(c.name, cands))
    ctx.progress(0.3, f"measuring {sum(len(t.candidates) for t in tasks)} sensitivities")
    results = map_tasks(measure_layer, tasks, description="mixed_precision sensitivities",
                        shared=SensitivityShared(module, model.task, batches, reference, metric))
    for c, res in zip(choices, results, strict=True):
        tw, ta = c.configs[0]
        sw = {cfg[0]: e - base_error for cfg, e in res.items() if cfg[1] == ta}
        sa = {cfg[1]: e - base_error for cfg, e in res.items() if cfg[0] == tw}
        sw[tw], sa[ta] = 0.0, 0.0
        # Additive model across the two axes (measured separately, as in Greedy MP).
        c.sensitivity = {cfg: sw[cfg[0]] + sa[cfg[1]] for cfg in c.configs}

    saving = "bytes" if b.size_mb is not None and b.avg_weight_bits is None else "bits"
    wpath = greedy_path(choices, base_error, top, phase="weight", w_fixed=tuple(w_fixed),
                        a_fixed=tuple(a_fixed), fixed_bytes=fixed_bytes, saving=saving)

    def measure(state: dict) -> float:
        for n, cfg in state.items():
            set_submodule(module, n, build(n, cfg))
        with torch.no_grad():
            return output_error(reference, [model.forward(bt) for bt in batches], metric)

    def meets(s) -> bool:
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
    if config.act_bits and len(config.act_bits) > 1 and (b.avg_act_bits is not None or
                                                         not size_targets):
        apath = greedy_path(choices, base_error, state, phase="act", w_fixed=tuple(w_fixed),
                            a_fixed=tuple(a_fixed), fixed_bytes=fixed_bytes, saving="act_bits")
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
    final_error = measure(state)
    ctx.progress(0.95, "final configuration applied")

    # Apply the final configuration and report.
    for n, cfg in state.items():
        set_submodule(module, n, build(n, cfg))
    sens = {c.name: c.sensitivity for c in choices}
    final = _averages_report(choices, state, w_fixed, a_fixed, fixed_bytes)
    for n, m in layers.items():
        if n in floats:
            ctx.report.add_layer(n, kind=type(m).__name__, params=m.weight.numel(),
                                 weight_bits=None, act_bits=None, simulated=False, pinned=True)
            continue
        cfg = state[n] if n in state else pinned[n][1]
        q = module.get_submodule(n)
        w, a = cfg
        simulated = w not in (2, 4, 8) or (a is not None and a != 8)
        ctx.report.add_layer(n, sqnr_db=_weight_sqnr(m, q, hessians.get(n)))
        ctx.report.add_layer(
            n, kind=type(m).__name__, params=m.weight.numel(), weight_bits=w, act_bits=a,
            simulated=simulated, pinned=n in pinned, onnx=type(q).__name__,
            sensitivity=round(sens[n][cfg], 6) if n in sens else None,
            # Error rise with only this layer lowered to each width (activations at the top).
            sensitivity_by_bits={f"W{c[0]}A{c[1] if c[1] is not None else 'f'}": round(v, 6)
                                 for c, v in sens[n].items()} if n in sens else None)
    summary = {
        "metric": metric, "base_error": round(base_error, 6), "final_error": round(final_error, 6),
        "predicted_error": round(wpath[k].predicted_error, 6), "steps": k + max(len(apath) - 1, 0),
        "avg_weight_bits": round(final[0], 3),
        "avg_act_bits": None if final[1] is None else round(final[1], 3),
        "estimated_size_mb": round(final[2] / 1e6, 3), "searched_layers": len(search),
        "pinned_layers": len(pinned), "float_layers": len(floats),
        "sensitivities_measured": sum(len(t.candidates) for t in tasks),
        "opt_m_layers": len(opt_m_layers),
        "bits_histogram": _histogram(state, pinned)}
    if b.max_error is not None and final_error > b.max_error:
        ctx.report.warn(f"measured {metric} error {final_error:.4g} exceeds budget.max_error "
                        f"{b.max_error} at the size budget")
        summary["max_error_met"] = False
    ctx.report.summary.update(summary)
    ctx.report.summary["trajectory"] = [
        {"step": i, "size_mb": round(s.size_bytes / 1e6, 4), "avg_weight_bits":
         round(s.avg_weight_bits, 3), "predicted_error": round(s.predicted_error, 6),
         "measured_error": round(measured[i], 6) if i in measured else None}
        for i, s in enumerate(wpath) if i in measured or i % max(len(wpath) // 40, 1) == 0]
    _plot(ctx, wpath, measured, k, metric)


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


def _averages_report(choices, state, w_fixed, a_fixed, fixed_bytes):
    from ..quant.mixed import _averages

    w, a, size = _averages(choices, state, tuple(w_fixed), tuple(a_fixed))
    return w, a, size + fixed_bytes


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


def _histogram(state, pinned) -> dict[str, int]:
    h: dict[str, int] = {}
    for cfg in list(state.values()) + [c for _, c in pinned.values()]:
        key = f"W{cfg[0]}A{cfg[1] if cfg[1] is not None else 'f'}"
        h[key] = h.get(key, 0) + 1
    return dict(sorted(h.items()))


def _check_feasible(config, choices, pinned, ranges, w_fixed, a_fixed, fixed_bytes, prefix):
    from ..quant.mixed import _averages

    b = config.budget
    lowest = {c.name: min(c.configs, key=lambda x: (x[0], x[1] or 0)) for c in choices}
    w_min, a_min, size_min = _averages(choices, lowest, tuple(w_fixed), tuple(a_fixed))
    size_min += fixed_bytes
    if b.avg_weight_bits is not None and w_min > b.avg_weight_bits + 1e-9:
        raise RecipeError(
            f"{prefix}budget.avg_weight_bits={b.avg_weight_bits} is unreachable: with every "
            f"searchable layer at {min(config.weight_bits)} bits and the pinned layers as set, "
            f"the average is {w_min:.3f}",
            [(f"{prefix}budget.avg_weight_bits", f"lowest reachable average is {w_min:.3f}")])
    if b.avg_act_bits is not None:
        if not config.act_bits:
            raise RecipeError(f"{prefix}budget.avg_act_bits needs act_bits candidates",
                              [(f"{prefix}budget.avg_act_bits", "act_bits is empty")])
        if a_min is None or a_min > b.avg_act_bits + 1e-9:
            raise RecipeError(
                f"{prefix}budget.avg_act_bits={b.avg_act_bits} is unreachable (lowest "
                f"average {a_min})", [(f"{prefix}budget.avg_act_bits", "unreachable")])
    if b.size_mb is not None and size_min / 1e6 > b.size_mb:
        raise RecipeError(
            f"{prefix}budget.size_mb={b.size_mb} is unreachable: the smallest configuration "
            f"is {size_min / 1e6:.2f} MB (float layers and pinned layers included)",
            [(f"{prefix}budget.size_mb", f"smallest reachable size is {size_min / 1e6:.2f} MB")])
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
