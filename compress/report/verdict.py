"""The one-line verdict of a report, and the wording of every speed ratio.

A ratio below 1 is a slowdown and is always worded as one ("2.78× slower", never "0.36×
faster"): readers skim the number and miss the word.
"""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95% normal quantile


def speed_words(ratio: float) -> str:
    """fp32 latency / compressed latency, in words: '1.85× faster' or '2.78× slower'."""
    if ratio >= 1:
        return f"{ratio:.2f}× faster"
    return f"{1 / max(ratio, 1e-12):.2f}× slower"


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` samples."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # p = 1 gives centre + half = 1 up to rounding; clamp so it reads exactly 1.
    return max(0.0, centre - half), min(1.0, round(centre + half, 12))


def paired_difference_ci(lost: int, gained: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Top-1 change in points and its 95% half-width, from the paired outcomes on ``n`` samples.

    ``lost``: samples the original got right and the compressed model wrong; ``gained``: the
    reverse. The normal approximation for paired proportions (the two models see the same
    samples, so only the discordant ones carry information). With no discordant sample at all
    the normal interval would be zero wide; the rule of three (3/n) bounds it instead.
    """
    if n <= 0:
        return 0.0, 100.0
    diff = (gained - lost) / n
    discordant = lost + gained
    if discordant == 0:
        return 0.0, 300.0 / n
    var = max(discordant - (gained - lost) ** 2 / n, 0.0) / (n * n)
    return diff * 100, z * math.sqrt(var) * 100


def _accuracy(report: dict) -> dict | None:
    metrics = report.get("metrics") or {}
    comp = metrics.get("compressed") or {}
    orig = metrics.get("original") or {}
    n = int((report.get("data") or {}).get("evaluation", {}).get("samples") or 0)
    drop = metrics.get("drop") or {}
    if "top1" in comp and "top1" in orig:
        if "lost" in drop and "gained" in drop:
            change, half = paired_difference_ci(drop["lost"], drop["gained"],
                                                drop.get("samples", n))
        else:  # a report from before the paired counts: every disagreement may flip
            change = (comp["top1"] - orig["top1"]) * 100
            flips = (1 - comp.get("top1_agreement", 1.0)) * n
            half = Z95 * math.sqrt(max(flips - (change / 100) ** 2 * n, 0.0)) / max(n, 1) * 100
        sign = "+" if change >= 0 else "-"
        return {"metric": "top1_points", "value": round(change, 4), "ci95": round(half, 4),
                "samples": n, "worse": change < 0,
                "text": f"accuracy change {sign}{abs(change):.2f} ± {half:.2f} points "
                        f"(top-1, 95% CI, n={n})"}
    if "top1_agreement" in comp:
        agree = comp["top1_agreement"]
        lo, hi = wilson_interval(agree, n)
        return {"metric": "top1_agreement", "value": agree, "ci95": [round(lo, 4), round(hi, 4)],
                "samples": n, "worse": False,
                "text": f"top-1 agreement with the original {agree * 100:.2f}% "
                        f"(95% CI {lo * 100:.1f}-{hi * 100:.1f}%, n={n}; no labels)"}
    if "cosine_mean" in comp:
        worst = comp.get("cosine_min")
        return {"metric": "cosine_mean", "value": comp["cosine_mean"], "samples": n,
                "worse": False,
                "text": f"cosine to the original {comp['cosine_mean']:.4f}"
                        + (f" (worst sample {worst:.4f}, n={n})" if worst is not None else "")}
    return None


def verdict(report: dict) -> dict:
    """Size, speed, accuracy and gate in one line (``line``) and in parts for the report page:
    each part has ``text`` and ``bad`` (a slowdown, growth, lost accuracy or a failed gate)."""
    parts = []
    size = report.get("size") or {}
    orig_b, comp_b = size.get("original_bytes"), size.get("compressed_bytes")
    if orig_b and comp_b:
        ratio = orig_b / comp_b
        word = "smaller" if ratio >= 1 else "larger"
        shown = ratio if ratio >= 1 else 1 / ratio
        parts.append({"kind": "size", "bad": ratio < 1,
                      "text": f"{word} by {shown:.2f}× ({orig_b / 1e6:.2f} MB → "
                              f"{comp_b / 1e6:.2f} MB)"})
    speed = []
    for bs, ratio in ((report.get("latency") or {}).get("speedup") or {}).items():
        if ratio is None:
            continue
        words = speed_words(ratio)
        number, _, direction = words.partition(" ")
        speed.append({"batch": str(bs), "ratio": ratio, "words": words, "slower": ratio < 1})
        parts.append({"kind": "speed", "bad": ratio < 1,
                      "text": f"{direction} by {number} at batch {bs}"})
    accuracy = _accuracy(report)
    if accuracy is not None:
        parts.append({"kind": "accuracy", "bad": accuracy["worse"], "text": accuracy["text"]})
    gate = report.get("gate") or {}
    if gate.get("checks"):
        parts.append({"kind": "gate", "bad": not gate.get("passed"),
                      "text": "gate passed" if gate.get("passed") else "gate failed"})
    else:
        parts.append({"kind": "gate", "bad": False, "text": "no gate configured"})
    return {"line": ", ".join(p["text"] for p in parts), "parts": parts, "speed": speed,
            "accuracy": accuracy}
