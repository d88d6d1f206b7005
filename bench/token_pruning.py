"""Token pruning/merging benchmark: ToMe (and text token pruning) beside fp32 and W8A8, one run.

Usage: .venv/bin/python bench/token_pruning.py [--models digits,deit,minilm] [--repeats 20]
Every variant is a bundled recipe run through ``compress()``; all ONNX files are then evaluated
on the same data and timed together in interleaved rounds (bench/common.py), ratios against the
unpruned fp32 export. Writes bench/results/token_pruning/{results.json,results.md}.
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
    run_recipe,
    save,
    table,
    time_variants,
)
from compress.report.builder import cpu_name, environment_info  # noqa: E402

MODELS = {
    # key: (batch sizes, [(variant name, recipe)]); the first recipe also provides fp32.
    "digits": ([8, 64], [("ToMe (r=[24, 8, 0, 0])", "digits_vit_tome.yaml"),
                         ("ToMe + W8A8", "digits_vit_tome_int8.yaml"),
                         ("W8A8 only", "digits_vit_w8a8.yaml")]),
    "deit": ([8], [("ToMe (r=16)", "deit_small_tome.yaml"),
                   ("ToMe (r=16, decreasing) + W8A8", "deit_small_tome_int8.yaml"),
                   ("W8A8 only", "deit_small_w8a8.yaml")]),
    "minilm": ([8, 32], [("text token pruning", "minilm_token_prune.yaml"),
                         ("text token pruning + W8A8", "minilm_token_prune_int8.yaml")]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/token_pruning"))
    ap.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    args = ap.parse_args()
    results = {"environment": environment_info(), "command": " ".join(sys.argv), "models": {}}
    md = [f"Machine: {cpu_name()}, {platform.machine()}, "
          f"{results['environment']['cpu_threads_available']} threads; "
          f"onnxruntime {results['environment']['versions']['onnxruntime']}.\n"]
    for key in args.models.split(","):
        batch_sizes, recipes = MODELS[key]
        recipes = [v for v in recipes if v[0] not in args.skip.split(",")]
        work = args.out / key
        (name, first), rest = recipes[0], recipes[1:]
        bench, path, report, seconds = load_bench(key, RECIPES / first, work / "v0", batch_sizes)
        bench.variants = [Variant("fp32", bench.fp32), Variant(name, path, build_seconds=seconds)]
        summaries = {name: report["passes"][0]["summary"]}
        for i, (name, recipe) in enumerate(rest, 1):
            path, report, seconds = run_recipe(RECIPES / recipe, work / f"v{i}")
            bench.variants.append(Variant(name, path, build_seconds=seconds))
            summaries[name] = report["passes"][0]["summary"]
        t = time.time()
        evaluate_variants(bench)
        time_variants(bench, args.repeats)
        md.append(f"### {key}\n\n{table(bench)}\n")
        results["models"][key] = {v.name: {"path": str(v.path),
                                           "build_s": round(v.build_seconds, 1),
                                           "pass_summary": summaries.get(v.name), **v.metrics}
                                  for v in bench.variants}
        print(md[-1], flush=True)
        print(f"({key}: evaluated and timed in {time.time() - t:.0f} s)", file=sys.stderr)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
