"""Cost model and strength search for token reduction schedules.

The speed-up of a schedule is estimated from token counts with the transformer's multiply-adds
(attention projections 4NC², scores and mixing 2N²C, MLP 2·ratio·MC²), which tracks measured
ONNX Runtime speed-ups closely enough to pick a strength; the benchmark measures the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def block_macs(n_attn: int, n_mlp: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of one pre-norm transformer block: attention on ``n_attn`` tokens, MLP on
    ``n_mlp`` (token reduction happens between the two)."""
    return 4 * n_attn * dim * dim + 2 * n_attn * n_attn * dim + 2 * mlp_ratio * n_mlp * dim * dim


def estimated_speedup(counts: Sequence[int], dim: int, mlp_ratio: float = 4.0) -> float:
    """Speed-up of the blocks when ``counts[i]`` tokens enter block i and ``counts[i+1]`` its MLP.

    ``counts`` has one entry more than there are blocks (the tokens leaving the last block).
    """
    depth = len(counts) - 1
    base = depth * block_macs(counts[0], counts[0], dim, mlp_ratio)
    ours = sum(block_macs(counts[i], counts[i + 1], dim, mlp_ratio) for i in range(depth))
    return base / ours


def search_strength(candidates: Sequence, speedup: Callable[[object], float],
                    fidelity_ok: Callable[[object], bool] | None, target_speedup: float | None
                    ) -> tuple[object, list[dict]]:
    """Pick a strength from ``candidates`` (ordered weakest -> strongest).

    With only ``target_speedup``: the weakest candidate whose estimated speed-up reaches it.
    With ``fidelity_ok``: the strongest candidate that passes it (binary search, fidelity is
    assumed to fall as strength rises), but no stronger than needed for ``target_speedup``.
    Returns ``(choice, trials)``; ``trials`` lists every evaluated candidate for the report.
    """
    trials: list[dict] = []
    cands = list(candidates)
    hi = len(cands) - 1
    if target_speedup is not None:
        reach = [i for i, c in enumerate(cands) if speedup(c) >= target_speedup]
        hi = reach[0] if reach else hi
        if fidelity_ok is None:
            c = cands[hi]
            trials.append({"strength": c, "speedup": round(speedup(c), 3)})
            return c, trials
    lo, best = 0, 0
    # Invariant: cands[best] passes (the weakest candidate, no reduction, passes by definition).
    while lo <= hi:
        mid = (lo + hi) // 2
        ok = fidelity_ok(cands[mid])
        trials.append({"strength": cands[mid], "speedup": round(speedup(cands[mid]), 3),
                       "passes": ok})
        if ok:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return cands[best], trials
