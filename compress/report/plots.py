"""Plots shared by every report: per-layer SQNR and bit-widths, latency."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def layer_plot(layers: list[dict], path: Path) -> bool:
    """SQNR per quantized layer (bars) with weight/activation bits (steps) on a second axis."""
    rows = [r for r in layers if r.get("sqnr_db") is not None]
    if not rows:
        return False
    names = [r["name"] for r in rows]
    sqnr = [min(r["sqnr_db"], 80.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), sqnr, color="#4C78A8", label="SQNR (dB)")
    ax.set_ylabel("local output SQNR (dB)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax2 = ax.twinx()
    # Stored bits (codes plus scales and zero points) where the pass reports them, beside the
    # nominal code width.
    for key, color, label in (("weight_bits", "#E45756", "weight bits (nominal)"),
                              ("weight_bits_stored", "#B279A2", "weight bits stored"),
                              ("act_bits", "#54A24B", "act bits")):
        bits = [r.get(key) for r in rows]
        if any(b is not None for b in bits):
            ax2.step(range(len(rows)), [b if b is not None else float("nan") for b in bits],
                     where="mid", color=color, label=label)
    ax2.set_ylabel("bits")
    ax2.set_ylim(0, 17)
    fig.legend(loc="upper right", fontsize=7)
    ax.set_title("Per-layer SQNR and bit-width")
    _save(fig, path)
    return True


def latency_plot(latency: dict, path: Path) -> bool:
    original, compressed = latency.get("original"), latency.get("compressed")
    if not original or not compressed:
        return False
    sizes = list(original)
    x = range(len(sizes))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [original[s] for s in sizes], w, label="original (fp32)",
           color="#9D9D9D")
    ax.bar([i + w / 2 for i in x], [compressed[s] for s in sizes], w, label="compressed",
           color="#4C78A8")
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"batch {s}" for s in sizes])
    ax.set_ylabel("ORT latency, median (ms)")
    ax.legend(fontsize=8)
    ax.set_title(f"ONNX Runtime latency, {latency.get('threads')} threads")
    _save(fig, path)
    return True
