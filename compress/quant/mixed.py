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

from .weight_only import container_bits


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


def weight_storage_bytes(params: int, out_features: int, cfg: tuple | None, *, block: int,
                         symmetric: bool = False, embedding: bool = False,
                         float_zero: bool = False) -> float:
    """Bytes a layer's weight takes in the exported model: codes plus scales and zero points.

    ``cfg`` (weight bits, activation bits) or None (fp32). W8 with activations is a per-channel
    int8 Q/DQ layer: int8 codes, an fp32 scale and an int8 zero point per output channel.
    Otherwise block-quantized (MatMulNBits, GatherBlockQuantized for embeddings): codes in their
    container (2/4/8 bits; 3/5/6 take 8; embeddings 4/8, other widths 8), an fp32 scale per
    block and, unless symmetric (the operators' default zero point is then dropped at export),
    a packed zero point of the container's width per block (fp32 for HQQ's float zero points).
    """
    if cfg is None:
        return 4.0 * params
    w, a = cfg
    if not embedding and w == 8 and a is not None:
        return params + 5.0 * out_features
    c = (w if w in (4, 8) else 8) if embedding else container_bits(w)
    zero = 0.0 if symmetric else (4.0 if float_zero else c / 8)
    return params * c / 8 + params / block * (4 + zero)


def stored_bits(size_bytes: float, params: int) -> float:
    """Stored bits per weight: every byte of the weight's codes, scales and zero points."""
    return 8.0 * size_bytes / max(params, 1)


@dataclass
class LayerChoice:
    """One layer's candidate configurations, their sizes, saved bits and sensitivities."""

    name: str
    params: int
    configs: list[tuple]                # (weight_bits, act_bits) from highest to lowest
    act_bits_cost: dict[tuple, float]      # activation elements * act bits (0 if none)
    size_bytes: dict[tuple, float]         # stored weight bytes (codes, scales, zero points)
    sensitivity: dict[tuple, float] = field(default_factory=dict)  # error rise vs the top


@dataclass(frozen=True)
class Fixed:
    """What the search does not choose: pinned layers' weights and activations (counted in the
    averages) and the bytes of everything not searched (counted in the size)."""

    nominal_bits: float = 0.0      # sum of params * nominal width, pinned layers
    stored_bytes: float = 0.0      # their stored weight bytes
    params: float = 0.0
    act_bits: float = 0.0          # sum of activation elements * width
    act_elements: float = 0.0
    other_bytes: float = 0.0       # float layers, biases, norms, buffers


@dataclass
class Averages:
    weight_bits_stored: float      # per weight, codes + scales + zero points
    weight_bits_nominal: float     # per weight, code width only
    act_bits: float | None
    size_bytes: float              # estimated model size


@dataclass
class Step:
    layer: str
    config: tuple
    predicted_error: float
    size_bytes: float
    avg_weight_bits: float          # stored bits per weight
    avg_weight_bits_nominal: float
    avg_act_bits: float | None


def averages(choices: list[LayerChoice], state: dict[str, tuple], fixed: Fixed = Fixed()
             ) -> Averages:
    """Parameter-weighted weight bits (stored and nominal), element-weighted activation bits and
    the estimated size of configuration ``state``."""
    nominal, stored, params = fixed.nominal_bits, fixed.stored_bytes, fixed.params
    ab, an = fixed.act_bits, fixed.act_elements
    for c in choices:
        cfg = state[c.name]
        nominal += c.params * cfg[0]
        stored += c.size_bytes[cfg]
        params += c.params
        ab += c.act_bits_cost[cfg]
        if cfg[1] is not None:
            an += c.act_bits_cost[cfg] / cfg[1]
    return Averages(stored_bits(stored, params), nominal / max(params, 1),
                    ab / an if an else None, stored + fixed.other_bytes)


def greedy_path(choices: list[LayerChoice], base_error: float, start: dict[str, tuple], *,
                phase: str = "weight", fixed: Fixed = Fixed(), saving: str = "bytes"
                ) -> list[Step]:
    """Every greedy step from ``start`` until no layer can be lowered further.

    ``phase`` ``weight`` lowers weight widths only (activation widths stay), ``act`` the
    reverse. Per step, every layer's lower configurations are scored by ``(sensitivity rise) /
    (saving)``, with ``saving`` the stored bytes saved (``bytes``: codes, scales and zero
    points, so stored bits and size budgets rank moves alike) or the activation bits saved
    (``act_bits``); the smallest score is committed. Moves that save nothing are not taken
    (3/5/6-bit weights stored in 8-bit containers save nothing over 8). ``fixed``: pinned
    layers and everything not searched, counted in the averages and the size.
    """
    state = dict(start)
    err = base_error + sum(c.sensitivity.get(state[c.name], 0.0) for c in choices)

    def step(layer: str, cfg: tuple) -> Step:
        avg = averages(choices, state, fixed)
        return Step(layer, cfg, err, avg.size_bytes, avg.weight_bits_stored,
                    avg.weight_bits_nominal, avg.act_bits)

    path = [step("", ())]
    keep = 1 if phase == "weight" else 0
    while True:
        best = None
        for c in choices:
            cur = state[c.name]
            for cand in c.configs:
                if cand == cur or cand[keep] != cur[keep]:
                    continue
                if saving == "act_bits":
                    saved = c.act_bits_cost[cur] - c.act_bits_cost[cand]
                else:
                    saved = c.size_bytes[cur] - c.size_bytes[cand]
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
        path.append(step(c.name, cand))


def state_at(path: list[Step], start: dict[str, tuple], k: int) -> dict[str, tuple]:
    """The configuration after the first ``k`` steps of ``path`` from ``start``."""
    state = dict(start)
    for s in path[1:k + 1]:
        state[s.layer] = s.config
    return state
