"""Ablation: what SQ-b (smooth_quant) and Greedy MP each add to W4A8 on the digits ViT.

Usage: .venv/bin/python bench/ablation_mixed.py [--out bench/results/ablation_mixed]
Runs the digits mixed recipe with its pass list swapped per variant (same data, same eval set,
ORT metrics from each report) and writes results.md. OPT-m is not on main yet: not included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from compress import compress  # noqa: E402
from compress.export.onnx import onnx_size_bytes  # noqa: E402
from compress.recipe import parse_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_vit_mixed.yaml"
SQB = {"type": "smooth_quant", "alpha": "search", "shift": True}


def variants(mp: dict) -> dict[str, list[dict]]:
    uniform = {**mp, "weight_bits": [4], "budget": {"avg_weight_bits": 4.0}}
    return {"W4A8 uniform (GPTQ)": [uniform],
            "+ SQ-b": [SQB, uniform],
            "+ Greedy MP (avg <= 4 bits)": [mp],
            "+ SQ-b + Greedy MP": [SQB, mp]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ablation_mixed"))
    ap.add_argument("--only", default="", help="comma-separated variant indices to run")
    args = ap.parse_args()
    base = yaml.safe_load(RECIPE.read_text())
    rows = []
    only = {int(i) for i in args.only.split(",") if i}
    for i, (name, passes) in enumerate(variants(base["passes"][0]).items()):
        out = args.out / f"v{i}"
        if only and i not in only and (out / "report.json").exists():
            r = json.loads((out / "report.json").read_text())
        else:
            recipe = {**base, "passes": passes}
            recipe["evaluation"] = {**base["evaluation"], "latency": {"enabled": False}}
            r = compress(parse_recipe(recipe), out_dir=out).report
        m = r["metrics"]
        mp = next((p["summary"] for p in r["passes"] if p["type"] == "mixed_precision"), {})
        rows.append(f"|{name}|{m['compressed']['top1'] * 100:.2f}|{m['drop']['top1_points']:.2f}|"
                    f"{m['compressed']['top1_agreement'] * 100:.2f}%|{m['compressed']['kl']:.2e}|"
                    f"{mp.get('avg_weight_bits')}|{onnx_size_bytes(out / 'model.onnx') / 1e6:.3f}|")
        print(rows[-1], flush=True)
    fp = r["metrics"]["original"]["top1"] * 100
    md = [f"digits ViT (fp32 ONNX top-1 {fp:.2f}), W4A8: weights GPTQ b32, uint8 activations.\n",
          "|variant|top-1|drop (points)|agreement|KL|avg weight bits|MB|",
          "|---|---|---|---|---|---|---|",
          *rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
