"""Time W1A32 Direction-Matching Distillation of the digits ViT on CUDA and on the CPU.

Self-contained: needs only torch and numpy. The digits ViT is rebuilt here with timm's module
names (so the reference weights load as they are), and the algorithms are loaded from
``compress/quant/binary.py`` and ``compress/distill.py`` by file path, without importing the
rest of compress (no timm, transformers or pydantic needed).

    python bench/gpu_distill.py                      # .gpu/digits-vit/, 300 steps per device
    python bench/gpu_distill.py --steps 5 --cpu-steps 5 --ref ~/.cache/compress/digits-vit-v1

The reference folder holds model.safetensors, calib.npz (training split: the distillation
data, labels used) and eval.npz (test split). Prints one JSON object: per device the steps,
seconds, seconds per step, first/last loss and the student's test top-1 (fp32 teacher too).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


binary = _load("_binary", ROOT / "compress" / "quant" / "binary.py")
distill_mod = _load("_distill", ROOT / "compress" / "distill.py")

# --------------------------------------------------------------------------- model
# Note: the layout of timm's VisionTransformer (vit_tiny_patch16_224 with img_size=16,
# patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4; class token, pre-norm blocks,
# LayerNorm eps 1e-6, exact GELU), eval-mode forward only.


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, img=16, patch=2, in_chans=1, classes=10, dim=64, depth=4, heads=4):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A float32/int64 safetensors reader (the format is a JSON header and raw bytes)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtypes[info["dtype"]])
        out[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
    return out


def binarize(model: nn.Module) -> nn.Module:
    """W1A32: every Linear in the blocks becomes a BinaryLinear (embeddings, head stay float)."""
    for blk in model.blocks:
        blk.attn.qkv = binary.BinaryLinear(blk.attn.qkv)
        blk.attn.proj = binary.BinaryLinear(blk.attn.proj)
        blk.mlp.fc1 = binary.BinaryLinear(blk.mlp.fc1)
        blk.mlp.fc2 = binary.BinaryLinear(blk.mlp.fc2)
    return model


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    model.to(device).eval()
    pred = torch.cat([model(x[i:i + 256].to(device)).argmax(1).cpu()
                      for i in range(0, len(x), 256)])
    return round(float((pred == y).float().mean()) * 100, 2)


def run(device: torch.device, steps: int, args, state, data) -> dict:
    teacher = ViT()
    teacher.load_state_dict(state)
    student = binarize(copy.deepcopy(teacher))
    settings = distill_mod.DistillSettings(
        method="dmd", steps=steps, lr=args.lr, batch_size=args.batch_size,
        log_every=max(1, steps // 20))
    x, y = data["x"], data["y"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = distill_mod.distill(student, teacher, {"pixel_values": x}, y,
                              lambda m, b: m(b["pixel_values"]), "image-classification",
                              settings, device)
    seconds = time.perf_counter() - t
    return {"device": str(device), "steps": res.steps, "batch_size": args.batch_size,
            "seconds": round(seconds, 2), "seconds_per_step": round(seconds / res.steps, 4),
            "first_loss": round(res.history[0]["loss"], 4),
            "last_loss": round(res.history[-1]["loss"], 4),
            "student_top1": top1(student, data["x_eval"], data["y_eval"], device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default=str(ROOT / ".gpu" / "digits-vit"))
    p.add_argument("--steps", type=int, default=300, help="CUDA steps")
    p.add_argument("--cpu-steps", type=int, default=None, help="CPU steps (default: --steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = p.parse_args()
    ref = Path(args.ref).expanduser()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = read_safetensors(ref / "model.safetensors")
    calib, ev = np.load(ref / "calib.npz"), np.load(ref / "eval.npz")
    data = {"x": torch.from_numpy(calib["x"]).float(),
            "y": torch.from_numpy(calib["labels"]).long(),
            "x_eval": torch.from_numpy(ev["x"]).float(),
            "y_eval": torch.from_numpy(ev["labels"]).long()}
    teacher = ViT()
    teacher.load_state_dict(state)
    out = {"model": "digits-vit W1A32 DMD", "torch": torch.__version__,
           "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "fp32_top1": top1(teacher, data["x_eval"],
                                                          data["y_eval"], "cpu"), "runs": []}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        torch.manual_seed(0)
        out["runs"].append(run(torch.device("cuda"), args.steps, args, state, data))
    else:
        out["gpu"] = None
    torch.manual_seed(0)
    out["runs"].append(run(torch.device("cpu"), args.cpu_steps or args.steps, args, state, data))
    if len(out["runs"]) == 2:
        g, c = out["runs"]
        out["cuda_speedup_per_step"] = round(c["seconds_per_step"] / g["seconds_per_step"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
