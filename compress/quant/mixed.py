"""Greedy mixed-precision search as plain functions over measured per-layer sensitivities.

After MPTQ-ViT's Greedy MP (see docs of the ``mixed_precision`` pass): every layer starts at
its highest width; each step lowers the one layer whose measured sensitivity per bit saved is
smallest, until the budget holds. Sensitivities are measured once per (layer, width) with only
that layer lowered (the rest at the top width) and treated as additive along the path; the
chosen configuration is then measured for real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def output_error(ref: list[torch.Tensor], out: list[torch.Tensor], metric: str) -> float:
    """Error of ``out`` against ``ref`` (lists of per-batch outputs): 0 means identical.

    ``cosine``: 1 - mean per-sample cosine; ``kl``: mean KL(softmax(ref) || softmax(out));
    ``rel_error``: ||ref - out|| / ||ref||; ``top1``: 1 - top-1 agreement.
    """
    r = torch.cat([t.detach().float().flatten(1) for t in ref])
    o = torch.cat([t.detach().float().flatten(1) for t in out])
    if metric == "cosine":
        return float(1 - torch.nn.functional.cosine_similarity(r, o, dim=1).mean())
    if metric == "kl":
        lp, lq = r.log_softmax(-1), o.log_softmax(-1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())
    if metric == "rel_error":
        return float((r - o).norm() / r.norm().clamp_min(1e-12))
    if metric == "top1":
        return float(1 - (r.argmax(-1) == o.argmax(-1)).float().mean())
    raise ValueError(f"unknown metric {metric!r}")


@dataclass
class LayerChoice:
    """One layer's candidate configurations, their sizes, saved bits and sensitivities."""

    name: str
    configs: list[tuple]                # (weight_bits, act_bits) from highest to lowest
    weight_bits_cost: dict[tuple, float]   # params * weight bits
    act_bits_cost: dict[tuple, float]      # activation elements * act bits (0 if none)
    size_bytes: dict[tuple, float]
    sensitivity: dict[tuple, float] = field(default_factory=dict)  # error rise vs the top


@dataclass
class Step:
    layer: str
    config: tuple
    predicted_error: float
    size_bytes: float
    avg_weight_bits: float
    avg_act_bits: float | None


def _averages(choices: list[LayerChoice], state: dict[str, tuple], w_fixed: tuple[float, float],
              a_fixed: tuple[float, float]) -> tuple[float, float | None, float]:
    wb, wn = w_fixed
    ab, an = a_fixed
    size = 0.0
    for c in choices:
        cfg = state[c.name]
        wb += c.weight_bits_cost[cfg]
        ab += c.act_bits_cost[cfg]
        size += c.size_bytes[cfg]
        wn += c.weight_bits_cost[c.configs[0]] / max(c.configs[0][0], 1)
        if cfg[1] is not None:
            an += c.act_bits_cost[cfg] / cfg[1]
    return wb / max(wn, 1), (ab / an if an else None), size


def greedy_path(choices: list[LayerChoice], base_error: float, start: dict[str, tuple], *,
                phase: str = "weight", w_fixed: tuple[float, float] = (0.0, 0.0),
                a_fixed: tuple[float, float] = (0.0, 0.0), fixed_bytes: float = 0.0,
                saving: str = "bits") -> list[Step]:
    """Every greedy step from ``start`` until no layer can be lowered further.

    ``phase`` ``weight`` lowers weight widths only (activation widths stay), ``act`` the
    reverse. Per step, every layer's lower configurations are scored by ``(sensitivity rise) /
    (saving)``, with ``saving`` the weight bits saved (``bits``), bytes saved (``bytes``) or
    activation bits saved (``act_bits``); the smallest score is committed. Moves that save
    nothing are not taken. ``w_fixed``/``a_fixed`` are (bits * count, count) of pinned layers,
    counted in the averages; ``fixed_bytes`` the size of everything not searched.
    """
    state = dict(start)
    err = base_error + sum(c.sensitivity.get(state[c.name], 0.0) for c in choices)
    wavg, aavg, size = _averages(choices, state, w_fixed, a_fixed)
    path = [Step("", (), err, size + fixed_bytes, wavg, aavg)]
    keep = 1 if phase == "weight" else 0
    while True:
        best = None
        for c in choices:
            cur = state[c.name]
            for cand in c.configs:
                if cand == cur or cand[keep] != cur[keep]:
                    continue
                if saving == "bytes":
                    saved = c.size_bytes[cur] - c.size_bytes[cand]
                elif saving == "act_bits":
                    saved = c.act_bits_cost[cur] - c.act_bits_cost[cand]
                else:
                    saved = c.weight_bits_cost[cur] - c.weight_bits_cost[cand]
                if saved <= 0:
                    continue
                rise = c.sensitivity[cand] - c.sensitivity.get(cur, 0.0)
                score = max(rise, 0.0) / saved
                if best is None or score < best[0]:
                    best = (score, c, cand, rise)
        if best is None:
            return path
        _, c, cand, rise = best
        state[c.name] = cand
        err += rise
        wavg, aavg, size = _averages(choices, state, w_fixed, a_fixed)
        path.append(Step(c.name, cand, err, size + fixed_bytes, wavg, aavg))


def state_at(path: list[Step], start: dict[str, tuple], k: int) -> dict[str, tuple]:
    """The configuration after the first ``k`` steps of ``path`` from ``start``."""
    state = dict(start)
    for s in path[1:k + 1]:
        state[s.layer] = s.config
    return state
