"""Build the model zoo offline: random-weight members, real-photo and real-text data.

Usage: .venv/bin/python scripts/build_zoo.py [--out out/zoo] [--models a,b] [--tiny]
       [--images 64] [--eval-images 256] [--force]

Writes, per member of ``compress.models.zoo.ZOO``, ``<out>/<key>/`` with the weights
(timm: ``model.safetensors``; Hugging Face: a ``save_pretrained`` folder with a tokenizer) and
``member.json`` (family, parameters, the recipe's ``model`` block). Calibration and evaluation
data are shared: ``<out>/images/{calib,eval}/`` holds crops of the two photos scikit-learn ships
(``load_sample_images``), preprocessed per model at load time with its own pretrained_cfg
(mean, std, crop); ``<out>/texts/{calib,eval}.txt`` are the bundled sentences. Members that
exist are skipped (``--force`` rebuilds). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.models.zoo import BY_KEY, ZOO, build_member  # noqa: E402

CROP_PX = 320  # saved crop size: above every member's input (299 at most) after resizing


def build_images(out: Path, n: int, n_eval: int, seed: int = 0) -> None:
    """``n`` calibration and ``n_eval`` evaluation crops of scikit-learn's sample photos.

    Evaluation gets its own random stream (seed + 1), so asking for more evaluation crops
    leaves the calibration crops as they were."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images           # 2 photos, 427 x 640 RGB
    for role, count, stream in (("calib", n, seed), ("eval", n_eval, seed + 1)):
        rng = np.random.default_rng(stream)
        d = out / "images" / role
        if d.is_dir() and len(list(d.glob("*.png"))) >= count:
            continue
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = photos[int(rng.integers(len(photos)))]
            h, w = img.shape[:2]
            side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = img[y:y + side, x:x + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).resize(
                (CROP_PX, CROP_PX), Image.BICUBIC).save(d / f"{role}_{i:03d}.png")


def build_texts(out: Path) -> None:
    texts = resources.files("compress.reference") / "texts"
    d = out / "texts"
    d.mkdir(parents=True, exist_ok=True)
    for role in ("calib", "eval"):
        (d / f"{role}.txt").write_text((texts / f"{role}.txt").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/zoo"))
    ap.add_argument("--models", default="", help="comma-separated member keys (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny CI configs (members that have one)")
    ap.add_argument("--images", type=int, default=64, help="calibration crops")
    ap.add_argument("--eval-images", type=int, default=256, help=(
        "evaluation crops: 256 puts one flipped prediction at 0.4 points of top-1 agreement"))
    ap.add_argument("--force", action="store_true", help="rebuild members that exist")
    args = ap.parse_args()
    keys = [k for k in args.models.split(",") if k] or [m.key for m in ZOO]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        print(f"unknown members: {', '.join(unknown)}; known: {', '.join(BY_KEY)}",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    build_images(args.out, args.images, args.eval_images)
    build_texts(args.out)
    index_path = args.out / "zoo.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    failed = []
    for key in keys:
        member = BY_KEY[key]
        d = args.out / key
        if (d / "member.json").is_file() and not args.force:
            index[key] = json.loads((d / "member.json").read_text())
            continue
        t = time.perf_counter()
        try:
            build_member(member, d, tiny=args.tiny)
        except Exception as e:  # noqa: BLE001 - one member failing is reported, the rest go on
            failed.append(key)
            print(f"{key}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(limit=3)
            continue
        index[key] = json.loads((d / "member.json").read_text())
        print(f"{key}: {index[key]['params'] / 1e6:.1f}M parameters "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        index_path.write_text(json.dumps(index, indent=2))
    index_path.write_text(json.dumps(index, indent=2))
    print(f"{len(index)} members in {args.out}" + (f"; failed: {', '.join(failed)}"
                                                  if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
