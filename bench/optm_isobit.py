"""OPT-m at equal bits: digits ViT W8A4 and W4A4 with the iso-bit two-region quantizer on
post-GELU inputs and/or the softmax probabilities, against uniform A4 and A5.

Usage: .venv/bin/python bench/optm_isobit.py [--out DIR] [--only 0,3]
Each row runs recipes/digits_vit_w8a8.yaml (``quantize``: per-channel int8 or simulated 4-bit
weights, every Linear input and both attention-product operands at the row's activation width)
with latency off; metrics are ORT's, from each report. results.md is rewritten from every
report present, so rows can be rerun one at a time (``--only``).

OPT-m is iso-bit: a 4-bit OPT-m activation has two regions of 3 bits (2^4 levels in all) or,
where no tail pays, one region of 4 bits; the A5 rows show what one more bit of uniform buys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import compress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_vit_w8a8.yaml"
# (label, weight bits, activation bits, opt_m)
ROWS = [(f"W{w}A{a}" + (f" + OPT-m {'+'.join(o)}" if o else " uniform"), w, a, o)
        for w in (8, 4)
        for a, o in ((4, []), (5, []), (4, ["gelu"]), (4, ["softmax"]), (4, ["gelu", "softmax"]))]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else None


def row_markdown(label: str, r: dict) -> str:
    m = r["metrics"]
    c = m["compressed"]
    layers = r["layers"]
    fc2 = _mean([row["sqnr_db"] for row in layers if row["name"].endswith("mlp.fc2")])
    av = _mean([row["sqnr_db"] for row in layers if row["name"].endswith("matmul_av")])
    two = [row for row in layers if "opt_m_m" in row]
    forms = ", ".join(f"{row['name'].split('.')[1]}.{row['name'].split('.')[-1]}:"
                      f"{'2x' if row['opt_m_region_bits'] < row['act_bits'] else '1x'}"
                      f"{row['opt_m_region_bits']}b m{row['opt_m_m']}" for row in two) or "-"
    return (f"|{label}|{c['top1'] * 100:.2f}|{m['drop']['top1_points']:.2f}|"
            f"{c['top1_agreement'] * 100:.2f}%|{c['kl']:.3g}|{fc2:.1f}|{av:.1f}|{forms}|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results/optm_isobit"))
    ap.add_argument("--only", default="", help="comma-separated row indices to (re)run")
    args = ap.parse_args()
    only = {int(i) for i in args.only.split(",") if i}
    rows, original = [], None
    for i, (label, w, a, opt_m) in enumerate(ROWS):
        out = args.out / f"r{i}"
        if (i in only) if only else not (out / "report.json").exists():
            compress(RECIPE, out_dir=out, overrides=[
                "evaluation.latency.enabled=false", f"passes.0.weights.bits={w}",
                f"passes.0.activations.bits={a}", f"passes.0.activations.opt_m={opt_m}"])
        if not (out / "report.json").exists():
            continue
        r = json.loads((out / "report.json").read_text())
        original = r["metrics"]["original"]
        rows.append(row_markdown(label, r))
        print(rows[-1], flush=True)
    head = [f"digits ViT (fp32 ONNX top-1 {original['top1'] * 100:.2f}%, 540 eval images), "
            "`quantize` on recipes/digits_vit_w8a8.yaml, attention products quantized; ORT "
            "metrics. SQNR: local output SQNR in dB, mean over the 4 blocks. OPT-m forms: "
            "block.layer:regions x region bits, m (2x3b = iso-bit two regions at A4; 1x4b = "
            "one uniform region kept).\n",
            "|variant|top-1|drop (points)|agreement|KL vs fp32|fc2 SQNR|probs@v SQNR|OPT-m forms|",
            "|---|---|---|---|---|---|---|---|"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join([*head, *rows]) + "\n")
    print("\n".join([*head, *rows]))


if __name__ == "__main__":
    main()
