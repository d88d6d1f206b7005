"""Mixed precision and INT4 benchmark: our Greedy MP and INT4 weight-only beside ONNX Runtime's
4-bit weight quantizer (MatMulNBitsQuantizer), same model and data, one run.

Usage: .venv/bin/python bench/mixed_precision.py [--models minilm,digits] [--repeats 10]
Writes bench/results/mixed_precision/{results.json,results.md}; BENCHMARKS.md quotes results.md.
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
    # key: (Greedy MP recipe, INT4 weight-only recipe or None, batch sizes, INT4 overrides)
    "minilm": (RECIPES / "minilm_mixed.yaml", RECIPES / "minilm_int4.yaml", [1, 8, 32], []),
    "digits": (RECIPES / "digits_vit_mixed.yaml", None, [1, 8, 64], []),
}


def ort_matmul_nbits(bench, out: Path, *, bits: int = 4, block_size: int = 32,
                     gather: bool = True, symmetric: bool = True) -> Variant:
    """ONNX Runtime's own weight quantizer as its docs show it (QOperator MatMulNBits, acc4);
    with ``gather`` the embeddings become GatherBlockQuantized too (its 4-bit Gather path)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    t = time.perf_counter()
    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=4, bits=bits,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)))
    q = MatMulNBitsQuantizer(onnx.load(str(bench.fp32)), algo_config=cfg)
    q.process()
    tag = f"w{bits}_b{block_size}_{'sym' if symmetric else 'asym'}{'_gather' if gather else ''}"
    dst = out / f"ort_{tag}.onnx"
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    what = "MatMul + Gather" if gather else "MatMul"
    kind = "sym" if symmetric else "asym"
    return Variant(f"ORT MatMulNBitsQuantizer {bits}-bit b{block_size} {kind} ({what})", dst,
                   build_seconds=time.perf_counter() - t)


def reuse_bench(key, recipe: Path, out: Path, batch_sizes):
    """Like ``load_bench`` but with our model already built in ``out/ours`` (same recipe)."""
    import json

    from bench.common import Bench
    from compress.api import Pipeline
    from compress.recipe import load_recipe

    r = load_recipe(recipe, overrides=["evaluation.latency.enabled=false"])
    p = Pipeline(r, model=None, calib=None, eval=None, out_dir=out / "ours", progress=None,
                 device="cpu")
    p.load()
    p.load_data()
    p.baseline()
    report = json.loads((out / "ours" / "report.json").read_text())
    bench = Bench(key, p.handle, out / "ours" / "model.fp32.onnx", p.calib, p.eval,
                  p.reference, batch_sizes)
    return bench, out / "ours" / "model.onnx", report, report["stages"]["total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/mixed_precision"))
    ap.add_argument("--reuse", action="store_true",
                    help="reuse our variants already built under --out (ours/, int4/)")
    args = ap.parse_args()
    results = {"environment": environment_info(), "command": " ".join(sys.argv), "models": {}}
    md = [f"Machine: {cpu_name()}, {platform.machine()}, "
          f"{results['environment']['cpu_threads_available']} threads; "
          f"onnxruntime {results['environment']['versions']['onnxruntime']}.\n"]
    for key in args.models.split(","):
        mixed, int4, batch_sizes, int4_overrides = MODELS[key]
        work = args.out / key
        if args.reuse and (work / "ours" / "report.json").exists():
            bench, ours_path, report, seconds = reuse_bench(key, mixed, work, batch_sizes)
        else:
            bench, ours_path, report, seconds = load_bench(key, mixed, work, batch_sizes)
        summary = report["passes"][0]["summary"]
        bench.variants = [Variant("fp32", bench.fp32),
                          Variant(f"compress Greedy MP, avg {summary['avg_weight_bits']} bits "
                                  f"(ours)", ours_path, build_seconds=seconds)]
        if int4 is not None and args.reuse and (work / "int4" / "model.onnx").exists():
            bench.variants.append(Variant("compress INT4 GPTQ b32 (ours)",
                                          work / "int4" / "model.onnx"))
        elif int4 is not None:
            p4, _, s4 = run_recipe(int4, work / "int4", int4_overrides)
            bench.variants.append(Variant("compress INT4 GPTQ b32 (ours)", p4, build_seconds=s4))
        peers = [lambda b, w: ort_matmul_nbits(b, w, gather=key == "minilm"),
                 lambda b, w: ort_matmul_nbits(b, w, gather=False, block_size=32,
                                               symmetric=False)]
        if key == "minilm":
            peers.append(lambda b, w: ort_matmul_nbits(b, w, bits=8, gather=False))
        for peer in peers:
            try:
                bench.variants.append(peer(bench, work))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                print(f"{key}: ORT quantizer failed: {e}", file=sys.stderr)
        t = time.time()
        evaluate_variants(bench)
        time_variants(bench, args.repeats)
        layers = [r for r in report["layers"] if r.get("weight_bits")]
        hist = summary.get("bits_histogram")
        md.append(f"### {key}\n\n{table(bench)}\n\nGreedy MP: {hist}, measured calibration "
                  f"error {summary['final_error']} ({summary['metric']}), "
                  f"{len(layers)} layers, {summary['sensitivities_measured']} sensitivities.\n")
        results["models"][key] = {
            "greedy_mp": {k: v for k, v in summary.items() if k != "trajectory"},
            "layers": layers,
            **{v.name: {"path": str(v.path), "build_s": round(v.build_seconds, 1), **v.metrics}
               for v in bench.variants}}
        print(md[-1], flush=True)
        print(f"({key}: evaluated and timed in {time.time() - t:.0f} s)", file=sys.stderr)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
