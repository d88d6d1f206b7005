"""INT8 benchmark: our W8A8 beside ONNX Runtime's and Optimum's quantizers, same data, one run.

Usage: .venv/bin/python bench/quantization.py [--models digits,deit,minilm] [--repeats 20]
Writes bench/results/quantization/{results.json,results.md}; BENCHMARKS.md quotes results.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RECIPES,
    Variant,
    evaluate_variants,
    load_bench,
    optimum_dynamic,
    ort_dynamic,
    ort_static_default,
    save,
    table,
    time_variants,
)
from compress.report.builder import cpu_name, environment_info  # noqa: E402

MODELS = {
    # key: (recipe, batch sizes, overrides)
    "digits": (RECIPES / "digits_vit_w8a8.yaml", [1, 8, 64], []),
    "deit": (RECIPES / "deit_small_w8a8.yaml", [1, 8], []),
    "minilm": (RECIPES / "minilm_w8a8.yaml", [1, 8, 32], []),
}
PEERS = [ort_static_default, ort_dynamic, optimum_dynamic]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantization"))
    args = ap.parse_args()
    results = {"environment": environment_info(), "command": " ".join(sys.argv), "models": {}}
    md = [f"Machine: {cpu_name()}, {platform.machine()}, "
          f"{results['environment']['cpu_threads_available']} threads; "
          f"onnxruntime {results['environment']['versions']['onnxruntime']}.\n"]
    for key in args.models.split(","):
        recipe, batch_sizes, overrides = MODELS[key]
        work = args.out / key
        bench, ours_path, report, seconds = load_bench(key, recipe, work, batch_sizes,
                                                       overrides=overrides)
        bench.variants = [Variant("fp32", bench.fp32),
                          Variant("compress W8A8 (ours)", ours_path, build_seconds=seconds)]
        for peer in PEERS:
            try:
                bench.variants.append(peer(bench, work))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                print(f"{key}: {peer.__name__} failed: {e}", file=sys.stderr)
        t = time.time()
        evaluate_variants(bench)
        time_variants(bench, args.repeats)
        md.append(f"### {key}\n\n{table(bench)}\n")
        results["models"][key] = {v.name: {"path": str(v.path), "build_s": round(v.build_seconds, 1),
                                           **v.metrics} for v in bench.variants}
        print(md[-1], flush=True)
        print(f"({key}: evaluated and timed in {time.time() - t:.0f} s)", file=sys.stderr)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
