"""Device-side: rebuild the reference caches that are too large to carry.

Run from the repository root with COMPRESS_CACHE=.gpu/cache (see bench/device/README.md):
widens the carried fp16 all-MiniLM-L6-v2 weights back to fp32 into the cache's model folder,
and builds deit-small from its seed with the carried digits array standing in for scikit-learn
(absent on the device machine).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.getcwd())


def main() -> None:
    root = Path(os.environ["COMPRESS_CACHE"])
    weights = load_file(".gpu/minilm_fp16.safetensors")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
              str(root / "minilm-v1/model/model.safetensors"))
    raw = np.load(".gpu/digits_raw.npz")
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: types.SimpleNamespace(images=raw["images"],
                                                         target=raw["target"])
    sys.modules.setdefault("sklearn", types.ModuleType("sklearn"))
    sys.modules["sklearn.datasets"] = datasets
    from compress.reference import ensure

    print(ensure("deit-small"), ensure("minilm"), ensure("digits-vit"))


if __name__ == "__main__":
    main()
