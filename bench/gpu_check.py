"""The CUDA path of compress(): the same recipe on the CPU and on CUDA, stage times and results.

Usage: python bench/gpu_check.py [--recipes recipes/digits_vit_w8a8.yaml,...] [--out DIR]
Runs each recipe with device=cpu and device=cuda (when present) and prints one JSON object:
per device the time of every pipeline stage (calibration and the passes run on the device;
export and ONNX Runtime stay on the CPU) and the compressed model's metrics, so the two paths
can be checked against each other. BENCHMARKS.md quotes its output with the card it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compress import compress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipes", default="recipes/digits_vit_w8a8.yaml")
    ap.add_argument("--out", type=Path, default=Path("out/gpu_check"))
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--devices", default="cpu,cuda",
                    help="comma-separated; cuda is skipped where none is present")
    args = ap.parse_args()
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    result = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "runs": {}}
    for recipe in args.recipes.split(","):
        for device in devices:
            out = args.out / Path(recipe).stem / device
            r = compress(recipe, out_dir=out, device=device, overrides=args.overrides)
            m = r.report["metrics"]["compressed"]
            result["runs"][f"{Path(recipe).stem}@{device}"] = {
                "stages_s": r.report["stages"], "gate_passed": r.gate_passed,
                "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}
            print(json.dumps({recipe: device, "stages": r.report["stages"]}), file=sys.stderr,
                  flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
