"""CNN INT8 benchmark: our W8A8 and fast INT8 recipes on ResNet / ConvNeXt / MobileNet /
EfficientNet beside fp32 and ONNX Runtime's quantize_static / quantize_dynamic on the same fp32
ONNX and the same data, evaluated and timed in this one process (batch 8, 2 threads).

Models are timm architectures with random weights (pretrained=False, seeded); calibration and
evaluation images are crops of the two photos scikit-learn ships, normalised with each
model's own mean/std.

Usage: .venv/bin/python bench/cnn_int8.py [--models resnet18,convnext_atto,...] [--repeats 20]
       [--threads 2] [--batch 8]
Writes bench/results/cnn_int8/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Variant,
    evaluate_variants,
    load_bench,
    ort_dynamic,
    ort_static_default,
    run_recipe,
    save,
    table,
    time_variants,
)
from compress.report.builder import environment_info  # noqa: E402

MODELS = ["resnet18", "convnext_atto", "mobilenetv3_small_100", "efficientnet_b0"]
# The pass lists of the bundled recipes (recipes/*_w8a8.yaml, recipes/*_int8_fast.yaml).
RECIPES = {
    "w8a8": {"passes": [{"type": "quantize", "weights": {"bits": 8},
                         "activations": {"bits": 8, "observer": "minmax"}}]},
    "fast": {"passes": [{"type": "smooth_quant", "alpha": "search"},
                        {"type": "quantize", "weights": {"bits": 8},
                         "activations": {"bits": 8, "observer": "mse"},
                         "attention_matmuls": False, "fused_attention": True}],
             "export": {"ort_cpu_kernels": True}},
}
OURS = {"w8a8": "compress W8A8 (ours)", "fast": "compress INT8 fast (ours)"}


def build_model(name: str, work: Path, n_calib: int = 64, n_eval: int = 64) -> tuple[Path, ...]:
    """Random-weight timm model as safetensors, and npz calibration/evaluation crops."""
    import timm
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_sample_images

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    weights = work / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][1]
    mean = np.array(cfg["mean"])[:, None, None]
    std = np.array(cfg["std"])[:, None, None]
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n_calib + n_eval):
        img = photos[i % 2]
        side = int(rng.integers(size, min(img.shape[:2])))
        y = int(rng.integers(0, img.shape[0] - side))
        x = int(rng.integers(0, img.shape[1] - side))
        t = torch.from_numpy(img[y:y + side, x:x + side].copy()).permute(2, 0, 1)[None] / 255
        t = torch.nn.functional.interpolate(t.float(), size=(size, size), mode="bilinear",
                                            antialias=True)[0].numpy()
        crops.append(((t - mean) / std).astype(np.float32))
    x = np.stack(crops)
    np.savez(work / "calib.npz", x=x[:n_calib])
    np.savez(work / "eval.npz", x=x[n_calib:])
    return weights, work / "calib.npz", work / "eval.npz"


def write_recipe(name: str, kind: str, files: tuple[Path, ...], work: Path,
                 batch: int) -> Path:
    weights, calib, eval_ = files
    recipe = {"version": 1, "name": f"{name}-{kind}",
              "model": {"source": "timm", "name": name, "weights": str(weights)},
              "calibration": {"path": str(calib), "num_samples": 64, "batch_size": 16},
              "evaluation": {"path": str(eval_), "num_samples": 64, "batch_size": 16,
                             "latency": {"batch_sizes": [batch], "repeats": 5}},
              **RECIPES[kind]}
    path = work / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ours", default="w8a8,fast")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/results/cnn_int8"))
    args = ap.parse_args()
    results = {"environment": environment_info(), "command": " ".join(sys.argv), "models": {}}
    md = [f"Batch {args.batch}, {args.threads} ONNX Runtime threads, random-weight timm models, "
          "scikit-learn sample-photo crops.\n"]
    for name in args.models.split(","):
        work = args.out.resolve() / name
        files = build_model(name, work / "data")
        ours = args.ours.split(",")
        recipes = {k: write_recipe(name, k, files, work, args.batch) for k in ours}
        t = time.time()
        bench, path, report, secs = load_bench(name, recipes[ours[0]], work / ours[0],
                                               [args.batch])
        bench.variants = [Variant("fp32", bench.fp32),
                          Variant(OURS[ours[0]], path, build_seconds=secs)]
        engines = {ours[0]: report["passes"][-1]["summary"].get("engine")}
        for k in ours[1:]:
            p, rep, s = run_recipe(recipes[k], work / k / "ours")
            bench.variants.append(Variant(OURS[k], p, build_seconds=s))
            engines[k] = rep["passes"][-1]["summary"].get("engine")
        for peer in (ort_static_default, ort_dynamic):
            try:
                bench.variants.append(peer(bench, work))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                print(f"{name}: {peer.__name__} failed: {e}", file=sys.stderr)
        evaluate_variants(bench)
        time_variants(bench, args.repeats, threads=args.threads)
        md.append(f"### {name}\n\n{table(bench)}\n")
        results["models"][name] = {
            "engines": engines,
            **{v.name: {"path": str(v.path), "build_s": round(v.build_seconds, 1), **v.metrics}
               for v in bench.variants}}
        print(md[-1], flush=True)
        print(f"({name}: {time.time() - t:.0f} s)", file=sys.stderr)
    save(results, args.out, "\n".join(md))


if __name__ == "__main__":
    main()
