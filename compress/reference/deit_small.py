"""timm deit_small_patch16_224 with seeded random weights, and digits as 224x224 RGB inputs.

Random weights stand in for a trained checkpoint (nothing is downloaded): accuracy is
meaningless here, fidelity to the fp32 model, size and latency are what it measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VERSION = "v1"
ARCH = "deit_small_patch16_224"
SEED = 0
N_CALIB = 128
N_EVAL = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _images(raw: np.ndarray) -> np.ndarray:
    x = torch.tensor(raw / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).numpy().astype(np.float16)


def build(out: Path, log=print) -> None:
    import timm
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    torch.manual_seed(SEED)
    model = timm.create_model(ARCH, pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    digits = load_digits()
    perm = np.random.default_rng(SEED).permutation(len(digits.images))
    np.savez(out / "calib.npz", x=_images(digits.images[perm[:N_CALIB]]))
    np.savez(out / "eval.npz", x=_images(digits.images[perm[N_CALIB:N_CALIB + N_EVAL]]))
