"""INT8 benchmark: our fast INT8 (and plain W8A8) beside ONNX Runtime's and Optimum's
quantizers and fp32, same data, one run, ratios against fp32.

Usage: .venv/bin/python bench/quantization.py [--models digits,deit,minilm] [--repeats 20]
       [--ours fast,w8a8]
Writes bench/results/quantization/{results.json,results.md}; BENCHMARKS.md quotes results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RECIPES,
    Bench,
    Variant,
    _Reader,
    evaluate_variants,
    load_bench,
    optimum_dynamic,
    ort_dynamic,
    ort_static_default,
    run_recipe,
    save,
    table,
    time_variants,
)
from compress.report.builder import cpu_name, environment_info  # noqa: E402

try:  # load average at start, for the BENCHMARKS.md machine line
    LOAD = os.getloadavg()
except OSError:
    LOAD = None

MODELS = {
    # key: (recipes {ours: path}, batch sizes, overrides)
    "digits": ({"fast": RECIPES / "digits_vit_int8_fast.yaml",
                "w8a8": RECIPES / "digits_vit_w8a8.yaml"}, [1, 8, 64], []),
    "deit": ({"fast": RECIPES / "deit_small_int8_fast.yaml",
              "w8a8": RECIPES / "deit_small_w8a8.yaml"}, [8], []),
    "minilm": ({"fast": RECIPES / "minilm_int8_fast.yaml",
                "w8a8": RECIPES / "minilm_w8a8.yaml"}, [1, 8, 32], []),
}
OURS = {"fast": "compress INT8 fast (ours)", "w8a8": "compress W8A8 (ours, attention int8)"}


def ort_static_transformer_safe(bench: Bench, out: Path) -> Variant:
    """ORT quantize_static as onnx-export.md section 2 recommends for transformers: QDQ U8S8
    per-channel, MatMul/Gemm/Conv only, activation x activation MatMuls excluded, MatMul outputs
    not quantized."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    from compress.export.ort import make_session

    pre = out / "ort_pre_safe.onnx"
    dst = out / "ort_static_safe.onnx"
    t = time.perf_counter()
    quant_pre_process(str(bench.fp32), str(pre), skip_symbolic_shape=True)
    m = onnx.load(str(pre), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    excl = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
    reader = _Reader(make_session(pre), list(bench.calib.batches(16)))
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=excl,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    return Variant("ORT quantize_static (QDQ, MatMul/Gemm/Conv, transformer-safe)", dst,
                   build_seconds=time.perf_counter() - t)


PEERS = [ort_static_default, ort_static_transformer_safe, ort_dynamic, optimum_dynamic]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ours", default="fast,w8a8", help="our recipes to include: fast, w8a8")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantization"))
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime threads for timing (default: every core it may use)")
    ap.add_argument("--timing-cores", default=None, help=(
        "comma-separated CPU ids to pin timing to (builds use every core), e.g. 2,3 to time "
        "'2 cores' on a larger machine; threads default to their count"))
    args = ap.parse_args()
    all_cores = os.sched_getaffinity(0)
    timing_cores = {int(c) for c in args.timing_cores.split(",")} if args.timing_cores else None
    if timing_cores and not args.threads:
        args.threads = len(timing_cores)
    results = {"environment": environment_info(), "command": " ".join(sys.argv), "models": {}}
    env = results["environment"]
    md = [f"Machine: {cpu_name()} ({', '.join(env['cpu_int8_features']) or 'no AVX2'}), "
          f"{platform.machine()}, {env['cpu_threads_available']} threads available, "
          f"{args.threads or env['cpu_threads_available']} used by ONNX Runtime"
          f"{f' pinned to cores {args.timing_cores}' if args.timing_cores else ''}; "
          f"onnxruntime {results['environment']['versions']['onnxruntime']}; "
          f"load average at start {LOAD}.\n"]
    for key in args.models.split(","):
        recipes, batch_sizes, overrides = MODELS[key]
        work = args.out / key
        ours = args.ours.split(",")
        bench, ours_path, report, seconds = load_bench(key, recipes[ours[0]], work / ours[0],
                                                       batch_sizes, overrides=overrides)
        bench.variants = [Variant("fp32", bench.fp32),
                          Variant(OURS[ours[0]], ours_path, build_seconds=seconds)]
        for extra in ours[1:]:
            path, _, secs = run_recipe(recipes[extra], work / extra / "ours", overrides)
            bench.variants.append(Variant(OURS[extra], path, build_seconds=secs))
        for peer in PEERS:
            try:
                bench.variants.append(peer(bench, work))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                print(f"{key}: {peer.__name__} failed: {e}", file=sys.stderr)
        t = time.time()
        evaluate_variants(bench)
        if timing_cores:  # ORT's pool threads inherit the affinity of the creating thread
            os.sched_setaffinity(0, timing_cores)
        time_variants(bench, args.repeats, threads=args.threads)
        os.sched_setaffinity(0, all_cores)
        md.append(f"### {key}\n\n{table(bench)}\n")
        results["models"][key] = {v.name: {"path": str(v.path),
                                           "build_s": round(v.build_seconds, 1),
                                           **v.metrics} for v in bench.variants}
        print(md[-1], flush=True)
        print(f"({key}: evaluated and timed in {time.time() - t:.0f} s)", file=sys.stderr)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
