"""Expedit token clustering on token-map models: fidelity per setting, optional ONNX latency.

Usage: .venv/bin/python bench/expedit.py [--models digits,deit] [--latency] [--repeats 20]
For each model (its bundled ``*_expedit.yaml`` recipe: token map output, reference data) every
setting listed in MODELS is applied to a fresh copy of the model and scored on the evaluation set
against the original float model: per-token cosine (mean and worst over samples, worst token),
relative L2 error, and the estimated speed-up of the transformer from token counts (MACs,
clustering included). These numbers are deterministic. With ``--latency`` the fp32 model and
the recipe's setting (the first row) are exported to ONNX and timed together in interleaved
rounds in this process; the ratio is fp32 / Expedit. Writes bench/results/expedit/results.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compress.api import Pipeline, predict_torch  # noqa: E402
from compress.context import PassContext, PassReport  # noqa: E402
from compress.evaluate.metrics import task_metrics  # noqa: E402
from compress.passes.expedit import ExpeditConfig, expedit  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# model key: (recipe, batch sizes timed, settings; the first is the recipe's own)
MODELS = {
    "digits": ("digits_vit_expedit.yaml", [8, 64], [
        {"location": 0, "clusters": (4, 4)},
        {"location": 1, "clusters": (4, 4)},
        {"location": 1, "clusters": (6, 6)},
        {"location": 2, "clusters": (4, 4)},
        {"location": 1, "clusters": (3, 3)},
        {"location": 1, "clusters": (4, 4), "tau": 0.01},
    ]),
    "deit": ("deit_small_expedit.yaml", [1, 8], [
        {"location": 4, "clusters": (8, 8)},
        {"location": 6, "clusters": (10, 10)},
        {"location": 5, "clusters": (9, 9)},
    ]),
}


def _load(recipe: Path, out: Path) -> Pipeline:
    r = load_recipe(recipe, overrides=["evaluation.latency.enabled=false"])
    p = Pipeline(r, model=None, calib=None, eval=None, out_dir=out, progress=None, device="cpu")
    p.load()
    p.load_data()
    p.baseline()
    return p


def _apply(p: Pipeline, setting: dict, out: Path):
    handle = copy.deepcopy(p.handle)
    base = p.recipe.passes[0].model_dump(exclude={"type", "location", "clusters", "ratio"})
    cfg = ExpeditConfig(**{**base, **setting})
    ctx = PassContext(index=0, calib=p.calib, device=torch.device("cpu"), workdir=out,
                      out_dir=out, report=PassReport(0, "expedit"))
    expedit(handle, cfg, ctx)
    return handle, ctx.report.summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--latency", action="store_true", help="also time fp32 vs Expedit ONNX")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/expedit"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(sys.argv), "models": {}}
    md = []
    for key in args.models.split(","):
        recipe, batch_sizes, settings = MODELS[key]
        p = _load(ROOT / "recipes" / recipe, args.out / key)
        bs = p.recipe.evaluation.batch_size
        rows = []
        for s in settings:
            handle, summary = _apply(p, s, args.out / key)
            out = predict_torch(handle, p.eval, bs, torch.device("cpu"))
            m = task_metrics(handle.task, p.reference, out, None)
            rows.append({"location": s["location"], "clusters": list(s["clusters"]),
                         "tau": summary["tau"],
                         "tokens_per_block": summary["tokens_per_block"],
                         "estimated_speedup": summary["estimated_speedup"],
                         **{k: round(v, 4) for k, v in m.items()}})
            print(key, rows[-1], flush=True)
        entry = {"recipe": recipe, "samples": len(p.eval), "rows": rows}
        md += [f"\n{key} ({recipe}, {len(p.eval)} eval samples, token map "
               f"{list(p.reference.shape[1:])}):\n",
               "| location | clusters | tau | tokens per block | est. speed-up | cosine mean | "
               "cosine min (sample) | worst token | rel. error |",
               "|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['location']} | {r['clusters'][0]}x{r['clusters'][1]} | {r['tau']} | "
               f"{r['tokens_per_block'][0]} -> {r['tokens_per_block'][-1]} | "
               f"{r['estimated_speedup']} | {r['cosine_mean']} | {r['cosine_min']} | "
               f"{r['token_cosine_min']} | {r['rel_error']} |" for r in rows]
        if args.latency:
            entry["latency"] = _latency(p, settings[0], args.out / key, batch_sizes, args.repeats)
            md.append(f"\nONNX latency (ms), fp32 vs Expedit {settings[0]}: "
                      f"{json.dumps(entry['latency'])}")
        results["models"][key] = entry
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _latency(p: Pipeline, setting: dict, out: Path, batch_sizes: list[int], repeats: int):
    from compress.export.onnx import export_onnx
    from compress.export.ort import measure_latencies

    fp32 = export_onnx(p.handle, out / "model.fp32.onnx")
    handle, _ = _apply(p, setting, out)
    ours = export_onnx(handle, out / "model.expedit.onnx")
    t = time.perf_counter()
    lat = measure_latencies({"fp32": fp32, "expedit": ours}, p.handle, batch_sizes,
                            repeats=repeats)
    lat["ratio"] = {b: round(lat["fp32"][b] / max(lat["expedit"][b], 1e-9), 3)
                    for b in lat["fp32"]}
    lat["seconds"] = round(time.perf_counter() - t, 1)
    return lat


if __name__ == "__main__":
    main()
