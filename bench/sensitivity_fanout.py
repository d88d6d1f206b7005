"""Per-layer sensitivity fan-out: serial vs Ray with 1 and 2 workers (BENCHMARKS.md).

For every Linear of the digits ViT and of all-MiniLM-L6-v2, quantize only that layer's weights to
4 bits (compress.quant.modules.QuantLinear, per-channel symmetric) and measure the model's
output error on calibration data: the measurement Greedy MP repeats per layer. The layers go
through ``compress.parallel.map_tasks`` three ways, interleaved in rounds on one local Ray
cluster of 2 CPUs started here:

  serial   map_tasks without a cluster (this process, 1 torch thread)
  ray-1    COMPRESS_RAY_ADDRESS set, each task reserving 2 CPUs: one task at a time
  ray-2    COMPRESS_RAY_ADDRESS set, each task reserving 1 CPU: two tasks at a time

Each task runs torch with 1 thread. The model and calibration batches go to the cluster once
(``shared``). Results must be equal across the modes; the script fails otherwise.

    PYTHONPATH=$PWD python bench/sensitivity_fanout.py [--rounds 2] [--out out/bench/fanout]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import parallel  # noqa: E402
from compress.quant.modules import QuantLinear  # noqa: E402

MODELS = {
    "digits-vit": (ROOT / "recipes" / "digits_vit_w8a8.yaml", ["calibration.num_samples=256"]),
    "minilm": (ROOT / "recipes" / "minilm_w8a8.yaml", ["calibration.num_samples=64"]),
}


def _forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "input_ids" in batch:
        return module(batch["input_ids"], batch["attention_mask"])
    return module(*batch.values())


def layer_sensitivity(name: str, shared: dict) -> dict:
    """Output error of the model with only ``name``'s weights quantized to 4 bits."""
    started, cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    module = shared["module"]
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    original = getattr(parent, attr)
    q = QuantLinear.from_float(original, w_bits=4)
    q.quantize_weight()
    setattr(parent, attr, q)
    noise = signal = 0.0
    try:
        with torch.no_grad():
            for batch, ref in zip(shared["batches"], shared["reference"], strict=True):
                out = _forward(module, batch)
                noise += float((out.double() - ref.double()).pow(2).sum())
                signal += float(ref.double().pow(2).sum())
    finally:
        setattr(parent, attr, original)  # serial calls share the module
    return {"layer": name, "mse_rel": noise / signal,
            "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else float("inf"),
            "task_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
            "pid": os.getpid()}


def load(key: str) -> tuple[dict, list[str]]:
    from compress.api import Pipeline
    from compress.recipe import load_recipe

    recipe, overrides = MODELS[key]
    r = load_recipe(recipe, overrides=["evaluation.latency.enabled=false", *overrides])
    p = Pipeline(r, model=None, calib=None, eval=None, out_dir=ROOT / "out" / "bench" / "tmp",
                 progress=None, device="cpu")
    p.load()
    p.load_data()
    module = p.handle.module.eval()
    batches = list(p.calib.batches(r.calibration.batch_size))
    with torch.no_grad():
        reference = [_forward(module, b) for b in batches]
    layers = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
              and "pooler" not in n]  # BERT's pooler does not reach the sentence embedding
    return {"module": module, "batches": batches, "reference": reference}, layers


def run_mode(mode: str, address: str, shared: dict, layers: list[str]) -> tuple[float, list]:
    if mode == "serial":
        os.environ.pop(parallel.ENV_ADDRESS, None)
        cpus = None
    else:
        os.environ[parallel.ENV_ADDRESS] = address
        cpus = 2 if mode == "ray-1" else 1
    t = time.perf_counter()
    results = parallel.map_tasks(layer_sensitivity, layers, shared=shared, num_cpus=cpus,
                                 description=f"sensitivity {mode}")
    return time.perf_counter() - t, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "fanout")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 400 << 20, "include_dashboard": False})
    modes = ["serial", "ray-1", "ray-2"]
    report = {"load": os.getloadavg(), "models": {}}
    try:
        for key in args.models:
            shared, layers = load(key)
            # warm-up: both Ray workers started, torch imported, the model deserialized once
            run_mode("ray-2", cluster.address, shared, layers[:2])
            times = {m: [] for m in modes}
            results, last = {}, {}
            for _ in range(args.rounds):
                for mode in modes:
                    seconds, res = run_mode(mode, cluster.address, shared, layers)
                    times[mode].append(seconds)
                    results.setdefault(mode, res)
                    last[mode] = res
                    assert [r["layer"] for r in res] == layers  # order kept
            base = results["serial"]
            max_diff = max(abs(a["mse_rel"] - b["mse_rel"]) / b["mse_rel"]
                           for m in modes[1:] for a, b in zip(results[m], base, strict=True))
            if max_diff > 1e-9:
                raise SystemExit(f"{key}: results differ across modes (relative {max_diff:.2e})")
            med = {m: statistics.median(v) for m, v in times.items()}
            # time inside the tasks (sum over layers, last round): contention shows up here
            busy = {m: sum(r["task_s"] for r in res_m) for m, res_m in last.items()}
            cpu = {m: sum(r["cpu_s"] for r in res_m) for m, res_m in last.items()}
            procs = {m: len({r["pid"] for r in res_m}) for m, res_m in last.items()}
            worst = sorted(base, key=lambda r: r["sqnr_db"])[:3]
            report["models"][key] = {
                "layers": len(layers), "seconds": times, "median_s": med,
                "speedup_2_vs_1": med["ray-1"] / med["ray-2"],
                "speedup_2_vs_serial": med["serial"] / med["ray-2"],
                "max_relative_difference": max_diff, "task_seconds_sum": busy,
                "task_cpu_seconds_sum": cpu,
                "worker_processes": procs,
                "most_sensitive": [(r["layer"], round(r["sqnr_db"], 2)) for r in worst]}
            print(json.dumps({key: report["models"][key]}, indent=1), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    report["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = ["| model | Linear layers | serial s | Ray 1 worker s | Ray 2 workers s | "
             "speed-up 2 vs 1 | task wall sum 1 / 2 workers s | task CPU sum 1 / 2 workers s "
             "| results equal |", "|---|---|---|---|---|---|---|---|---|"]
    for key, m in report["models"].items():
        s, b = m["median_s"], m["task_seconds_sum"]
        lines.append(f"| {key} | {m['layers']} | {s['serial']:.2f} | {s['ray-1']:.2f} | "
                     f"{s['ray-2']:.2f} | {m['speedup_2_vs_1']:.2f}x | {b['ray-1']:.1f} / "
                     f"{b['ray-2']:.1f} | {m['task_cpu_seconds_sum']['ray-1']:.1f} / "
                     f"{m['task_cpu_seconds_sum']['ray-2']:.1f} | yes (max rel. diff "
                     f"{m['max_relative_difference']:.1e}) |")
    print("\n".join(lines))
    print(f"load average before {report['load'][0]:.1f}, after {report['load_after'][0]:.1f}")


if __name__ == "__main__":
    main()
