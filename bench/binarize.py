"""Binarization levels and ablation (distillation none / output / DMD, softmax / Bi-Attention).

Runs the bundled recipe once per variant through ``compress()`` (the product's own path: binarize,
distil, export, ORT evaluation) and prints one table row per variant. Latency is left to the
pipeline's own interleaved measurement when ``--latency`` is given (off by default: the
distillation dominates and a shared machine makes per-variant timings noisy).

    python bench/binarize.py digits --variants w1a32-dmd,w1a32-none --steps 150
    python bench/binarize.py minilm --variants w1a32-dmd --steps 300 --max-seconds 900
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compress import compress

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"digits": ROOT / "recipes" / "digits_vit_binary.yaml",
           "minilm": ROOT / "recipes" / "minilm_binary.yaml"}

# name -> (level, distillation method, bi_attention)
VARIANTS = {
    "w1a32-none": ("W1A32", "none", False),
    "w1a32-output": ("W1A32", "output", False),
    "w1a32-dmd": ("W1A32", "dmd", False),
    "w1a32-dmd-biattn": ("W1A32", "dmd", True),
    "w1a32-output-biattn": ("W1A32", "output", True),
    "w1a8-dmd": ("W1A8", "dmd", False),
    "w1a1-dmd": ("W1A1", "dmd", False),
    "w1a1-dmd-biattn": ("W1A1", "dmd", True),
    "w1a1-output-biattn": ("W1A1", "output", True),
}


def run_variant(model: str, name: str, args, out: Path) -> dict:
    level, method, bi = VARIANTS[name]
    sets = [f"passes.0.level={level}", f"passes.0.distillation.method={method}",
            f"passes.0.bi_attention={'true' if bi else 'false'}",
            f"passes.0.distillation.steps={args.steps}",
            f"evaluation.latency.enabled={'true' if args.latency else 'false'}"]
    if args.max_seconds:
        sets.append(f"passes.0.distillation.max_seconds={args.max_seconds}")
    if args.batch_size:
        sets.append(f"passes.0.distillation.batch_size={args.batch_size}")
    if args.lr:
        sets.append(f"passes.0.distillation.lr={args.lr}")
    sets += args.set
    t = time.perf_counter()
    result = compress(RECIPES[model], out_dir=out / name, overrides=sets)
    r = result.report
    s = r["passes"][0]["summary"]
    d = s.get("distillation", {})
    row = {"variant": name, "level": level, "distillation": method, "bi_attention": bi,
           "steps": d.get("steps", 0), "distill_seconds": d.get("seconds", 0.0),
           "run_seconds": round(time.perf_counter() - t, 1),
           "metrics": r["metrics"]["compressed"], "original": r["metrics"]["original"],
           "onnx_bytes": r["size"]["compressed_bytes"], "fp32_bytes": r["size"]["original_bytes"],
           "packed_bytes": s.get("packed_weights", {}).get("file_bytes"),
           "bits_per_weight": s["bits_per_weight"], "binary_ops": s["binary_ops"],
           "latency": r["latency"], "parity": r["export"]["parity"],
           "history": d and [d.get("first"), d.get("last")]}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(RECIPES))
    p.add_argument("--variants", default="w1a32-none,w1a32-output,w1a32-dmd")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--set", action="append", default=[], help="extra recipe KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "binarize"))
    args = p.parse_args()
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants.split(","):
        row = run_variant(args.model, name, args, out)
        rows.append(row)
        m = row["metrics"]
        key = "top1" if "top1" in m else "cosine_mean"
        print(f"| {args.model} | {name} | {row['steps']} | {row['distill_seconds']:.0f} s | "
              f"{key} {m[key]:.4f} (fp32 {row['original'].get(key, 1.0):.4f}) | "
              f"ONNX {row['onnx_bytes'] / 1e6:.3f} MB | "
              f"packed {row['packed_bytes'] / 1e6:.3f} MB | "
              f"saving {row['binary_ops']['theoretical_saving']}x |", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
