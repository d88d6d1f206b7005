"""What limits W1A32 MiniLM: per-layer-group sensitivity, and held-out cosine against DMD steps.

In torch only (no export): binarize one group of Linear layers at a time without training and
measure the held-out embedding cosine against fp32, then distil the fully binarized encoder with
DMD and measure the held-out cosine every ``--every`` steps.

    python bench/minilm_binary_limits.py --steps 120 --every 20 --max-seconds 900
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.api import Pipeline
from compress.distill import DistillSettings, distill
from compress.passes.binarize import head_names
from compress.quant.binary import BinaryLinear
from compress.recipe import load_recipe
from compress.targeting import set_submodule

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "all": r".*",
    "attention q,k,v": r".*attention\.self\.(query|key|value)",
    "attention output": r".*attention\.output\.dense",
    "FFN in (intermediate)": r".*intermediate\.dense",
    "FFN out (output)": r".*layer\.\d+\.output\.dense",
    **{f"layer {i} only": rf".*layer\.{i}\..*" for i in range(6)},
}


def binarize(module: nn.Module, pattern: str) -> int:
    heads = set(head_names(module))
    chosen = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)
              and n not in heads and re.fullmatch(pattern, n)]
    for n, m in chosen:
        set_submodule(module, n, BinaryLinear(m))
    return len(chosen)


@torch.no_grad()
def cosine(module: nn.Module, ds, ref: torch.Tensor) -> float:
    module.eval()
    out = torch.cat([module(b["input_ids"], b["attention_mask"]) for b in ds.batches(32)])
    return float(F.cosine_similarity(out, ref, dim=-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "minilm_limits.json"))
    args = p.parse_args()
    recipe = load_recipe(ROOT / "recipes" / "minilm_binary.yaml",
                         overrides=[f"evaluation.num_samples={args.eval_samples}"])
    pipe = Pipeline(recipe, model=None, calib=None, eval=None, out_dir=Path("/tmp"),
                    progress=None, device="cpu")
    pipe.load()
    pipe.load_data()
    teacher = pipe.handle.module.eval()
    ref = torch.cat([teacher(b["input_ids"], b["attention_mask"]) for b in pipe.eval.batches(32)])
    result = {"eval_sentences": len(pipe.eval), "groups": {}, "curve": []}
    for name, pattern in GROUPS.items():
        student = copy.deepcopy(teacher)
        n = binarize(student, pattern)
        result["groups"][name] = {"layers": n, "cosine": round(cosine(student, pipe.eval, ref), 4)}
        print(f"| {name} | {n} | {result['groups'][name]['cosine']:.4f} |", flush=True)
    student = copy.deepcopy(teacher)
    binarize(student, GROUPS["all"])
    result["curve"].append({"step": 0, "seconds": 0.0,
                            "cosine": round(cosine(student, pipe.eval, ref), 4)})
    calib = pipe.calib

    def on_log(step):
        row = {"cosine": round(cosine(student, pipe.eval, ref), 4)}
        print(f"| step {step} | held-out cosine {row['cosine']:.4f} |", flush=True)
        return row

    settings = DistillSettings(method="dmd", steps=args.steps, lr=args.lr,
                               batch_size=args.batch_size, max_seconds=args.max_seconds,
                               log_every=args.every)
    res = distill(student, teacher, calib.inputs, None,
                  lambda m, b: m(b["input_ids"], b["attention_mask"]), "text-embedding",
                  settings, torch.device("cpu"), on_log=on_log)
    result["curve"] += [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                        for h in res.history]
    result["steps"], result["seconds"] = res.steps, res.seconds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
