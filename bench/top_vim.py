"""ToP-ViM on the digits Vim, training-free: ORT speed-up and top-1, plus the alignment ablation.

Usage: .venv/bin/python bench/top_vim.py [--repeats 20] [--out bench/results/top_vim]

1. Bundled recipes through ``compress()``: ToP-ViM (digits_vim_top_vim.yaml) and ToP-ViM + W8A8
   (digits_vim_top_vim_int8.yaml); all ONNX files (with the unpruned fp32 export of the first
   recipe) are evaluated on the same images and timed together in interleaved rounds
   (bench/common.py), ratios against the unpruned fp32 export.
2. Ablation in torch at equal keep schedules (the recipe's and stronger ones): random tokens,
   unsorted top-k, sorted top-k (the released code), sorted + gap_decay (ours), and mask
   (pruned tokens zeroed in place: upper bound, no speed-up); top-1 and KL to the unpruned
   model on the evaluation images. Also the score variants (clipped sum, both directions, the
   released code's mirrored indexing) at the recipe's schedule.
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

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
from compress.evaluate.metrics import task_metrics  # noqa: E402
from compress.report.builder import cpu_name, environment_info  # noqa: E402
from compress.tokens.top_vim import (  # noqa: E402
    TopVimPruner,
    estimated_speedup,
    layer_token_counts,
)

ABLATION = [
    # (name, pruner keyword arguments)
    ("random tokens (sorted, gather)", {"score": "random"}),
    ("unsorted top-k (gather)", {"order": "score"}),
    ("sorted top-k (gather, released code)", {}),
    ("sorted top-k + gap_decay (ours)", {"alignment": "gap_decay"}),
    ("mask in place (upper bound, no speed-up)", {"alignment": "mask"}),
]
SCORES = [
    ("sum, bwd (released code)", {}),
    ("clipped sum, bwd (paper)", {"score": "clipped_sum"}),
    ("sum, fwd + bwd", {"direction": "both"}),
    ("sum, fwd", {"direction": "fwd"}),
    ("sum, bwd, mirrored (released indexing)", {"mirrored": True}),
]


def predict(module, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def ablation(handle, eval_x, labels, reference, schedules, rows) -> list[dict]:
    module = handle.module
    n = module.patch_embed.num_patches + 1
    depth = len(module.layers)
    out = []
    for locs, keep in schedules:
        counts = layer_token_counts(n, depth, locs, [keep] * len(locs))
        for name, kw in rows:
            t = time.time()
            module.token_pruner = TopVimPruner(locs, [keep] * len(locs), **kw)
            m = task_metrics(handle.task, reference, predict(module, eval_x), labels)
            out.append({"after_layers": locs, "keep": keep, "variant": name,
                        "estimated_speedup": 1.0 if kw.get("alignment") == "mask"
                        else round(estimated_speedup(counts), 3),
                        "top1": m.get("top1"), "agreement": m["top1_agreement"], "kl": m["kl"],
                        "seconds": round(time.time() - t, 1)})
            print(out[-1], flush=True)
    module.token_pruner = None
    return out


def ablation_table(rows: list[dict], base_top1: float | None) -> str:
    lines = ["|after layers (1-based)|keep|variant|est. speed-up|top-1|drop (points)|"
             "agreement|KL to fp32|", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}"
        drop = "-" if r["top1"] is None or base_top1 is None else \
            f"{100 * (base_top1 - r['top1']):+.2f}"
        lines.append(f"|{r['after_layers']}|{r['keep']}|{r['variant']}|"
                     f"{r['estimated_speedup']:.2f}|{top1}|{drop}|{100 * r['agreement']:.2f}%|"
                     f"{r['kl']:.2e}|")
    return "\n".join(lines)


def finetune_run(steps: int, lr: float, out: Path) -> None:
    """The recipe's schedule with ``finetune.steps`` of distillation on the calibration split
    (torch top-1 on the evaluation images, before and after); writes finetune.json."""
    import json

    from safetensors.torch import load_file

    from compress.context import PassContext, PassReport
    from compress.data import Dataset
    from compress.models.handle import ModelHandle
    from compress.passes.top_vim import TopVimConfig, TopVimFinetune, top_vim
    from compress.recipe import load_recipe
    from compress.reference import digits_vim, ensure

    spec = load_recipe(RECIPES / "digits_vim_top_vim.yaml").passes[0]
    ref_dir = ensure("digits-vim")
    calib, ev = np.load(ref_dir / "calib.npz"), np.load(ref_dir / "eval.npz")
    x, y = torch.from_numpy(ev["x"]), ev["labels"]
    rows = {}
    for name, ft in (("training-free", TopVimFinetune()),
                     (f"distilled {steps} steps", TopVimFinetune(steps=steps, lr=lr,
                                                                 batch_size=64))):
        model = digits_vim.create_model()
        model.load_state_dict(load_file(str(ref_dir / "model.safetensors")))
        model.eval()
        if not rows:
            rows["fp32"] = float((predict(model, x).argmax(-1) == y).mean())
        handle = ModelHandle(task="image-classification", source="vim", name="digits-vim",
                             module=model, data_config={"input_size": (1, 16, 16)})
        ctx = PassContext(index=0, calib=Dataset({"pixel_values": torch.from_numpy(calib["x"])},
                                                 torch.from_numpy(calib["labels"])),
                          device=torch.device("cpu"), workdir=out, out_dir=out,
                          report=PassReport(0, "top_vim"), batch_size=128)
        t = time.time()
        top_vim(handle, TopVimConfig(after_layers=spec.after_layers, keep=spec.keep,
                                     finetune=ft, plot_images=0), ctx)
        rows[name] = float((predict(model, x).argmax(-1) == y).mean())
        rows[name + " seconds"] = round(time.time() - t, 1)
        print(name, rows[name], ctx.report.summary.get("finetune"), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--out", type=Path, default=Path("bench/results/top_vim"))
    ap.add_argument("--skip-ort", action="store_true", help="only the torch ablation")
    ap.add_argument("--finetune", type=int, default=0, help=(
        "only: the recipe's schedule with this many distillation steps (torch top-1)"))
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate with --finetune")
    args = ap.parse_args()
    if args.finetune:
        finetune_run(args.finetune, args.lr, args.out)
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {"environment": environment_info(), "command": " ".join(sys.argv)}
    md = [f"Machine: {cpu_name()}, {platform.machine()}, "
          f"{results['environment']['cpu_threads_available']} threads; "
          f"onnxruntime {results['environment']['versions']['onnxruntime']}.\n"]
    work = args.out / "digits_vim"
    recipes = [("ToP-ViM (recipe schedule)", "digits_vim_top_vim.yaml"),
               ("ToP-ViM + W8A8", "digits_vim_top_vim_int8.yaml"),
               ("W8A8 only", "digits_vim_w8a8.yaml")]
    t0 = time.time()
    (name, first), rest = recipes[0], recipes[1:]
    bench, path, report, seconds = load_bench("digits_vim", RECIPES / first, work / "v0",
                                              batch_sizes)
    summary = report["passes"][0]["summary"]
    locs, keep = summary["after_layers"], summary["keep"][0]
    print(f"recipe schedule: after layers {locs}, keep {keep}; built in {seconds:.0f} s",
          file=sys.stderr)

    # Ablation first (torch, on the unpruned module the pipeline loaded).
    handle = bench.handle
    handle.module.eval()
    eval_x = bench.eval.inputs["pixel_values"]
    labels = bench.labels
    ref = bench.reference
    base_top1 = float((ref.argmax(-1) == labels).mean()) if labels is not None else None
    depth = len(handle.module.layers)
    # The recipe's schedule, a mild late one (4 tokens after the 3rd of 4 layers) and an
    # early one (half the tokens after the 1st layer).
    schedules = [(list(locs), keep), ([depth - 1], 0.95), ([1], 0.5)]
    rows = ablation(handle, eval_x, labels, ref, schedules, ABLATION)
    score_rows = ablation(handle, eval_x, labels, ref, [(list(locs), keep)], SCORES)
    results["ablation"] = rows
    results["scores"] = score_rows
    results["fp32_torch_top1"] = base_top1
    results["depth"] = depth
    md.append(f"### Ablation (torch, {len(eval_x)} evaluation images, training-free; "
              f"fp32 top-1 {100 * base_top1:.2f}%)\n\n{ablation_table(rows, base_top1)}\n")
    md.append(f"### Importance scores at the recipe schedule\n\n"
              f"{ablation_table(score_rows, base_top1)}\n")
    print("\n".join(md[-2:]), flush=True)

    if not args.skip_ort:
        bench.variants = [Variant("fp32", bench.fp32), Variant(name, path, build_seconds=seconds)]
        summaries = {name: summary}
        for i, (vname, recipe) in enumerate(rest, 1):
            p, rep, sec = run_recipe(RECIPES / recipe, work / f"v{i}")
            bench.variants.append(Variant(vname, p, build_seconds=sec))
            summaries[vname] = rep["passes"][0]["summary"]
        evaluate_variants(bench)
        time_variants(bench, args.repeats)
        md.append(f"### ONNX Runtime (evaluation images; latency interleaved)\n\n"
                  f"{table(bench)}\n")
        results["ort"] = {v.name: {"path": str(v.path), "build_s": round(v.build_seconds, 1),
                                   "pass_summary": summaries.get(v.name), **v.metrics}
                          for v in bench.variants}
        print(md[-1], flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
