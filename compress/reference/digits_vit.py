"""The digits ViT: a small DeiT-style ViT trained on sklearn's 8x8 digits, deterministically.

Digits are upsampled to 16x16 and cut into 2x2 patches, giving 64 patch tokens plus a class
token: enough tokens for token merging and pruning to matter, small enough to train on two CPU
cores in a couple of minutes. Fixed seed, fixed stratified split (70/30), fixed schedule.

As in DeiT, a teacher helps the transformer learn from little data: an RBF SVM (99% on this
split, trained in a second) gives soft targets, mixed half and half with the labels. Without it
the same schedule lands between 96% and 97.2% depending on small details; with it, 98.1%.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VERSION = "v1"
ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
          "depth": 4, "num_heads": 4}
SEED = 0
TEST_FRACTION = 0.3
EPOCHS = 80
BATCH = 32
LR = 2e-3
# Normalization of the 16x16 [0, 1] images, from the training split (rounded, fixed).
MEAN = 0.2
STD = 0.3


def load_splits() -> dict[str, np.ndarray]:
    """Upsampled, normalized digits: train/test images [N, 1, 16, 16] and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x8 = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    x = ((x - MEAN) / STD).numpy()
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=SEED,
                              stratify=digits.target)
    return {"x_train": x[tr], "y_train": digits.target[tr].astype(np.int64),
            "x_test": x[te], "y_test": digits.target[te].astype(np.int64),
            "raw_train": digits.images[tr], "raw_test": digits.images[te]}


def create_model():
    import timm

    return timm.create_model(ARCH, pretrained=False, drop_path_rate=0.05, **KWARGS)


def fit_teacher(x: np.ndarray, y: np.ndarray):
    """RBF SVM with calibrated probabilities, on flattened images."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    return CalibratedClassifierCV(SVC(C=10, gamma="scale", random_state=SEED), ensemble=False,
                                  cv=5).fit(x.reshape(len(x), -1), y)


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate [N, 1, 16, 16] images by (dy, dx) pixels, filling with the background value."""
    out = torch.full_like(x, (0 - MEAN) / STD)
    src = x[..., max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)]
    out[..., max(0, dy):max(0, dy) + src.shape[-2], max(0, dx):max(0, dx) + src.shape[-1]] = src
    return out


def train(splits: dict[str, np.ndarray], log=print) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(SEED)
    model = create_model()
    x, y = torch.from_numpy(splits["x_train"]), torch.from_numpy(splits["y_train"])
    teacher = fit_teacher(splits["x_train"], splits["y_train"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR,
                                                total_steps=EPOCHS * steps_per_epoch,
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(SEED)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    # Teacher targets for every training image under every shift, computed once.
    soft = torch.stack([torch.from_numpy(teacher.predict_proba(
        shift_images(x, dy, dx).flatten(1).numpy())).float() for dy, dx in shifts])
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            b = perm[i:i + BATCH]
            # Random translation by up to 2 pixels (1 original pixel), filled with background.
            s = int(torch.randint(0, len(shifts), (1,), generator=g))
            xb = shift_images(x[b], *shifts[s])
            logits = model(xb)
            loss = 0.5 * F.cross_entropy(logits, y[b]) + 0.5 * F.kl_div(
                logits.log_softmax(-1), soft[s][b], reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            log(f"digits-vit epoch {epoch + 1}/{EPOCHS} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(splits["x_test"])).argmax(1).numpy()
    return model, float((pred == splits["y_test"]).mean())


def _write_image_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for i, (im, label) in enumerate(zip(images, labels, strict=False)):
        d = folder / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(im * 255 / 16).astype(np.uint8), mode="L").save(d / f"{i:04d}.png")


def build(out: Path, log=print) -> None:
    from safetensors.torch import save_file

    t0 = time.time()
    splits = load_splits()
    log("building reference digits-vit (trains once, then cached) ...")
    # One thread: parallel reductions change the float sums, and so the trained weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, acc = train(splits, log)
    finally:
        torch.set_num_threads(threads)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    np.savez(out / "calib.npz", x=splits["x_train"], labels=splits["y_train"])
    np.savez(out / "eval.npz", x=splits["x_test"], labels=splits["y_test"])
    _write_image_folder(out / "calib_images", splits["raw_train"], splits["y_train"])
    _write_image_folder(out / "eval_images", splits["raw_test"], splits["y_test"])
    meta = {"arch": ARCH, "kwargs": KWARGS, "test_accuracy": acc, "epochs": EPOCHS, "seed": SEED,
            "train_samples": int(len(splits["x_train"])),
            "test_samples": int(len(splits["x_test"])),
            "preprocess": {"input_size": [1, 16, 16], "mean": [MEAN], "std": [STD],
                           "interpolation": "bilinear", "crop_pct": 1.0},
            "train_seconds": round(time.time() - t0, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"digits-vit: test top-1 {acc * 100:.2f}% in {meta['train_seconds']} s")
