"""Ablation: what scale search, SQ-b (smooth_quant), OPT-m and Greedy MP each add to a uniform
4-bit baseline, on the digits ViT (W4A8) and all-MiniLM-L6-v2 (W4A16, weight-only as in
recipes/minilm_mixed.yaml: 8-bit activations cost MiniLM more than they save).

Usage: .venv/bin/python bench/ablation_mixed.py --model digits|minilm [--only 0,2] [--set k=v]
Each row runs the model's mixed recipe with its pass list swapped (same data, same eval set,
ORT metrics from each report); results.md is rewritten from every report present, so rows can
be run one at a time (``--only``). ``--set`` overrides the recipe for every row (e.g.
``--set passes.0.calibration_samples=64``; written into results.md).

A row is one entry of ``ROWS``: (label, models it applies to, function of the recipe's
mixed_precision pass -> pass list). Adding a variant is one line, e.g. when OPT-m for
post-Softmax lands: ("+ OPT-m softmax", ("digits",), lambda mp: [{**uniform(mp), ...}]).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import SQB  # noqa: E402
from compress import compress  # noqa: E402
from compress.export.onnx import onnx_size_bytes  # noqa: E402
from compress.recipe import parse_recipe, set_dotted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"digits": ROOT / "recipes" / "digits_vit_mixed.yaml",
           "minilm": ROOT / "recipes" / "minilm_mixed.yaml"}
SCALE_SEARCH = {"mse_grid": 20}          # per-block range shrink searched by weight MSE


# Stored bits per weight of plain block-32 asymmetric INT4: 4-bit codes, an fp32 scale and a
# 4-bit zero point per 32 weights.
INT4_STORED = 4 + (32 + 4) / 32


def uniform(mp: dict) -> dict:
    """Every searched layer at 4 bits: the plain INT4 baseline, same pass and export."""
    return {**mp, "weight_bits": [4], "budget": {"avg_weight_bits": INT4_STORED}}


def greedy(mp: dict) -> dict:
    """Greedy MP at the baseline's size (plain INT4's stored bits per weight)."""
    return {**mp, "budget": {"avg_weight_bits": INT4_STORED}}


BOTH, DIGITS = ("digits", "minilm"), ("digits",)
ROWS = [
    ("uniform 4-bit (GPTQ b32)", BOTH, lambda mp: [uniform(mp)]),
    ("+ scale search (mse_grid 20)", BOTH, lambda mp: [{**uniform(mp), **SCALE_SEARCH}]),
    ("+ SQ-b (smooth_quant, alpha search)", BOTH, lambda mp: [SQB, uniform(mp)]),
    ("+ OPT-m (post-GELU two-region)", DIGITS, lambda mp: [{**uniform(mp), "opt_m": True}]),
    ("+ Greedy MP (avg <= 5.125 stored bits, INT4's)", BOTH, lambda mp: [greedy(mp)]),
    ("all together (SQ-b + scale search + OPT-m + Greedy MP)", DIGITS,
     lambda mp: [SQB, {**greedy(mp), **SCALE_SEARCH, "opt_m": True}]),
    ("all together (SQ-b + scale search + Greedy MP)", ("minilm",),
     lambda mp: [SQB, {**greedy(mp), **SCALE_SEARCH}]),
    ("Greedy MP at the recipe's avg <= 5.65 stored bits (not equal size)", ("minilm",),
     lambda mp: [mp]),
]


def row_markdown(model: str, name: str, r: dict, path: Path) -> str:
    m = r["metrics"]
    mp = next((p["summary"] for p in r["passes"] if p["type"] == "mixed_precision"), {})
    mb = onnx_size_bytes(path) / 1e6
    if model == "digits":
        return (f"|{name}|{m['compressed']['top1'] * 100:.2f}|{m['drop']['top1_points']:.2f}|"
                f"{m['compressed']['top1_agreement'] * 100:.2f}%|{m['compressed']['kl']:.2e}|"
                f"{_bits(mp)}|{mb:.3f}|")
    c = m["compressed"]
    return (f"|{name}|{c['cosine_mean']:.4f}/{c['cosine_min']:.4f}|"
            f"{c['retrieval_top10_overlap']:.3f}|{_bits(mp)}|{mb:.3f}|")


def _bits(summary: dict) -> str:
    """Stored bits per weight (codes, scales, zero points), nominal code width beside; reports
    from before stored bits hold the nominal average alone."""
    if "avg_weight_bits_stored" in summary:
        return f"{summary['avg_weight_bits_stored']} ({summary['avg_weight_bits_nominal']})"
    return f"? ({summary.get('avg_weight_bits')})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=list(RECIPES), default="digits")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/ablation_mixed/<model>")
    ap.add_argument("--only", default="", help="comma-separated row indices to (re)run")
    ap.add_argument("--set", action="append", default=[], help="recipe override for every row")
    args = ap.parse_args()
    out_root = args.out or Path("bench/results/ablation_mixed") / args.model
    base = yaml.safe_load(RECIPES[args.model].read_text())
    for kv in args.set:
        key, _, raw = kv.partition("=")
        set_dotted(base, key, yaml.safe_load(raw))
    only = {int(i) for i in args.only.split(",") if i}
    rows, original = [], None
    for i, (name, models, make) in enumerate(ROWS):
        if args.model not in models:
            continue
        out = out_root / f"v{i}"
        run = i in only if only else not (out / "report.json").exists()
        if run:
            recipe = {**base, "passes": make(base["passes"][0])}
            recipe["evaluation"] = {**base["evaluation"], "latency": {"enabled": False}}
            compress(parse_recipe(recipe), out_dir=out)
        if not (out / "report.json").exists():
            continue
        r = json.loads((out / "report.json").read_text())
        original = r["metrics"]["original"]
        rows.append(row_markdown(args.model, name, r, out / "model.onnx"))
        print(rows[-1], flush=True)
    sets = f" Overrides: `{' '.join(args.set)}`." if args.set else ""
    if args.model == "digits":
        head = [f"digits ViT (fp32 ONNX top-1 {original['top1'] * 100:.2f}), W4A8: weights GPTQ "
                f"b32, uint8 activations.{sets}\n",
                "|variant|top-1|drop (points)|agreement|KL|avg weight bits stored (nominal)|MB|",
                "|---|---|---|---|---|---|---|"]
    else:
        head = [f"all-MiniLM-L6-v2, W4A16 (weight-only, as recipes/minilm_mixed.yaml), cosine "
                f"of the sentence embeddings against fp32.{sets}\n",
                "|variant|cosine mean/min|top-10 overlap|avg weight bits stored (nominal)|MB|",
                "|---|---|---|---|---|"]
    md = [*head, *rows]
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
