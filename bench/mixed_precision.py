"""Mixed precision and INT4 benchmark: our Greedy MP and INT4 weight-only beside ONNX Runtime's
4-bit weight quantizer (MatMulNBitsQuantizer), same model and data, one run.

Usage: .venv/bin/python bench/mixed_precision.py [--models minilm,digits] [--skip 2] [--reuse]
ORT's MatMulNBitsQuantizer variants are built from our fp32 export; each size-budgeted variant of
ours gets the file size of the ORT variant it is compared with (same block size) as its budget,
so "better at equal or smaller size" is checked in one run. Sizes and fidelity are
deterministic; ``--repeats N`` adds latency columns (meaningful only on a quiet machine).
Writes bench/results/mixed_precision/{results.json, results.md}; BENCHMARKS.md quotes
results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RECIPES,
    SQB,
    Variant,
    evaluate_variants,
    load_bench,
    onnx_size_bytes,
    run_recipe,
    save,
    table,
    time_variants,
)
from compress.report.builder import cpu_name, environment_info  # noqa: E402

EMBEDDINGS = "re:.*embeddings\\.(word|position|token_type)_embeddings"
MODELS = {
    # key: batch sizes, our variants as (label, recipe, overrides, sized), ORT peers as
    # (bits, block, Gather too, symmetric). Our first variant also provides the fp32 export.
    # "recipe+sqb": the bundled recipe with SQ-b put first (its mixed pass is then passes.1).
    # A sized variant names the ORT peer (index into the peers) whose file size is its budget:
    # passes.N.budget={size_mb: that file less our graph bytes}, so it lands at or under it.
    "minilm": ([1, 8, 32], [
        ("compress INT4 GPTQ b32 sym, all embeddings 4-bit (ours)", "minilm_int4.yaml",
         ["passes.0.symmetric=true", f"passes.0.targets=[Linear, '{EMBEDDINGS}']"], None),
        ("compress Greedy MP 2/4/8-bit b32 at ORT b32's size, sym (ours)", "minilm_mixed.yaml",
         ["passes.0.symmetric=true", f"passes.0.targets=[Linear, '{EMBEDDINGS}']",
          "passes.0.calibration_samples=64"], 0),
        ("compress Greedy MP avg <= 5.65 stored bits, asym (ours, recipes/minilm_mixed.yaml)",
         "minilm_mixed.yaml", ["passes.0.calibration_samples=64"], None),
        ("compress Greedy MP 2/4/8-bit b128 at ORT b128's size, sym (ours)", "minilm_mixed.yaml",
         ["passes.0.symmetric=true", f"passes.0.targets=[Linear, '{EMBEDDINGS}']",
          "passes.0.calibration_samples=64", "passes.0.block_size=128"], 1),
    ], [(4, 32, True, True), (4, 128, True, True), (4, 32, False, False), (8, 32, False, True)]),
    "digits": ([1, 8, 64], [
        ("compress Greedy MP W4A8 avg <= 5.0 stored bits (sym INT4's), sym (ours)",
         "digits_vit_mixed.yaml",
         ["passes.0.symmetric=true", "passes.0.budget={avg_weight_bits: 5.0}"], None),
        ("compress SQ-b + Greedy MP W4A8 at ORT b32's size, sym (ours)",
         "digits_vit_mixed.yaml+sqb", ["passes.1.symmetric=true"], 0),
        ("compress Greedy MP W4A8 avg <= 5.125 stored bits, asym (ours, "
         "recipes/digits_vit_mixed.yaml)",
         "digits_vit_mixed.yaml", [], None),
    ], [(4, 32, False, True), (4, 32, False, False), (4, 128, False, True)]),
}


def recipe_file(name: str, work: Path) -> tuple[Path, int]:
    """A bundled recipe, or with ``+sqb`` the same recipe with SQ-b (``smooth_quant``) put
    before its passes (written under ``work``); returns it and its mixed_precision pass index."""
    import yaml

    base, _, extra = name.partition("+")
    if not extra:
        return RECIPES / base, 0
    recipe = yaml.safe_load((RECIPES / base).read_text())
    recipe["passes"] = [SQB, *recipe["passes"]]
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{Path(base).stem}_{extra}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, 1


def graph_bytes(path: Path) -> int:
    """File size less tensor data: what a size budget on weights does not see."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return onnx_size_bytes(path) - sum(t.ByteSize() for t in proto.graph.initializer)


def size_table(bench) -> str:
    """Sizes and fidelity only (deterministic); latency is measured on a quiet machine."""
    fp32 = onnx_size_bytes(bench.variants[0].path)
    if bench.handle.task == "image-classification":
        lines = ["|variant|top-1|agreement|KL|logit rel. err|MB|x smaller|", "|---" * 7 + "|"]
    else:
        lines = ["|variant|cosine mean/min|top-10 overlap|MB|x smaller|", "|---" * 5 + "|"]
    for v in bench.variants:
        m, size = v.metrics, onnx_size_bytes(v.path)
        if bench.handle.task == "image-classification":
            lines.append(f"|{v.name}|{m['top1'] * 100:.2f}|{m['top1_agreement'] * 100:.2f}%|"
                         f"{m['kl']:.2e}|{m['logits_rel_error']:.4f}|{size / 1e6:.3f}|"
                         f"{fp32 / size:.2f}|")
        else:
            lines.append(f"|{v.name}|{m['cosine_mean']:.4f}/{m['cosine_min']:.4f}|"
                         f"{m['retrieval_top10_overlap']:.3f}|{size / 1e6:.3f}|{fp32 / size:.2f}|")
    return "\n".join(lines)


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


def reuse_bench(key, recipe: Path, out: Path, batch_sizes, overrides):
    """Like ``load_bench`` with our first variant already built in ``out/ours``."""
    from bench.common import Bench
    from compress.api import Pipeline
    from compress.recipe import load_recipe

    r = load_recipe(recipe, overrides=["evaluation.latency.enabled=false", *overrides])
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
    ap.add_argument("--repeats", type=int, default=0,
                    help="latency rounds (0: sizes and fidelity only, as in BENCHMARKS.md)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/mixed_precision"))
    ap.add_argument("--skip", default="", help="comma-separated indices of our variants to skip")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse our variants already built under --out/<model>/ours<i>")
    args = ap.parse_args()
    skip = {int(i) for i in args.skip.split(",") if i}
    results = {"environment": environment_info(), "command": " ".join(sys.argv), "models": {}}
    md = [f"Machine: {cpu_name()}, {platform.machine()}; "
          f"onnxruntime {results['environment']['versions']['onnxruntime']}. Command: "
          f"`{results['command']}`.\n"]
    for key in args.models.split(","):
        batch_sizes, ours, peers = MODELS[key]
        work = args.out / key
        label, recipe, overrides, _ = ours[0]
        if args.reuse and (work / "ours" / "model.onnx").exists():
            bench, path0, report0, s0 = reuse_bench(key, RECIPES / recipe, work, batch_sizes,
                                                    overrides)
        else:
            bench, path0, report0, s0 = load_bench(key, RECIPES / recipe, work, batch_sizes,
                                                   overrides=overrides)
        ours_built = [Variant(label, path0, build_seconds=s0)]
        reports = {label: report0}
        peer_variants = []
        for bits, block, gather, sym in peers:
            try:
                peer_variants.append(ort_matmul_nbits(bench, work, bits=bits, block_size=block,
                                                      gather=gather, symmetric=sym))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                print(f"{key}: ORT quantizer failed: {e}", file=sys.stderr)
        # Our graph bytes (nodes, names, shapes) come on top of the pass's tensor-size estimate,
        # and so do each quantized layer's tensor headers (names, dims: ~300 bytes; 3% of the
        # digits ViT's 0.15 MB, nothing on MiniLM).
        n_quantized = sum(1 for row in report0["layers"] if row.get("weight_bits"))
        budgets = {}
        for i, (label, recipe, overrides, sized) in enumerate(ours[1:], start=1):
            if i in skip:
                continue
            path_i, mp_index = recipe_file(recipe, work)
            extra = []
            if sized is not None:
                target = onnx_size_bytes(peer_variants[sized].path)
                budget_mb = (target - graph_bytes(path0) - 300 * n_quantized) / 1e6 - 0.001
                budgets[label] = {"peer": peer_variants[sized].name,
                                  "peer_mb": round(target / 1e6, 4), "budget_mb": budget_mb}
                extra = [f"passes.{mp_index}.budget={{size_mb: {budget_mb:.4f}}}"]
            out = work / f"ours{i}"
            t = time.perf_counter()
            if args.reuse and (out / "model.onnx").exists():
                path = out / "model.onnx"
                reports[label] = json.loads((out / "report.json").read_text())
            else:
                path, reports[label], _ = run_recipe(path_i, out, [*overrides, *extra])
            ours_built.append(Variant(label, path, build_seconds=time.perf_counter() - t))
        bench.variants = [Variant("fp32", bench.fp32), *ours_built, *peer_variants]
        evaluate_variants(bench)
        if args.repeats:
            time_variants(bench, args.repeats)
        notes = []
        for label, r in reports.items():
            p = r["passes"][-1]
            s = p["summary"]
            if p["type"] == "mixed_precision":
                notes.append(f"- {label}: {s['bits_histogram']}, avg "
                             f"{s['avg_weight_bits_stored']} stored bits per weight (nominal "
                             f"{s['avg_weight_bits_nominal']}), estimated "
                             f"{s['estimated_size_mb']} MB")
        sized_md = "".join(f"- {k}: budget {b['budget_mb']:.4f} MB of tensors, to land at or "
                           f"under {b['peer']} ({b['peer_mb']:.3f} MB)\n"
                           for k, b in budgets.items())
        md.append(f"### {key}\n\n{sized_md}\n"
                  f"{table(bench) if args.repeats else size_table(bench)}\n\n"
                  + "\n".join(notes) + "\n")
        results["models"][key] = {
            "size_budgets": budgets,
            "summaries": {k: {kk: vv for kk, vv in r["passes"][-1]["summary"].items()
                              if kk != "trajectory"} for k, r in reports.items()},
            **{v.name: {"path": str(v.path), "build_s": round(v.build_seconds, 1),
                        "mb": onnx_size_bytes(v.path) / 1e6, **v.metrics}
               for v in bench.variants}}
        print(md[-1], flush=True)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
