"""Calibration and evaluation data: image folders, .npz/.npy arrays, text and JSONL files.

Every loader returns a Dataset of model-ready tensors under the model's input names plus optional
integer labels, subsampled deterministically (seeded permutation) to ``num_samples``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .models.handle import IMAGE_INPUT, ModelHandle
from .specs import DataSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
NPZ_INPUT_KEYS = ("x", "inputs", "images", "pixel_values")
MAX_TEXT_BYTES = 200 * 1024 * 1024
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs


@dataclass
class Dataset:
    """Model-ready inputs (N first) and optional labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    source: str = ""
    format: str = ""
    available: int = 0                   # samples in the source before subsampling
    texts: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def batches(self, batch_size: int, device: torch.device | str = "cpu"
                ) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            batch = {k: v[start:start + batch_size] for k, v in self.inputs.items()}
            if "attention_mask" in batch:
                # Trim padding shared by the whole batch: same result, less work.
                n = int(batch["attention_mask"].sum(1).max().item())
                batch = {k: v[:, :max(n, 1)] for k, v in batch.items()}
            yield {k: v.to(device) for k, v in batch.items()}

    def take(self, n: int) -> Dataset:
        return Dataset({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.source, self.format,
                       self.available, None if self.texts is None else self.texts[:n],
                       list(self.notes))

    def summary(self) -> dict:
        return {"path": self.source, "format": self.format, "samples": len(self),
                "available": self.available, "labeled": self.labels is not None,
                "notes": self.notes}


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "imagefolder"
    suffix = path.suffix.lower()
    return {".npz": "npz", ".npy": "npy", ".txt": "text", ".jsonl": "jsonl",
            ".json": "jsonl"}.get(suffix, "")


def subset_indices(n_available: int, n_wanted: int, seed: int) -> np.ndarray:
    """A deterministic subset: the first ``n_wanted`` of a seeded permutation, in file order."""
    if n_wanted >= n_available:
        return np.arange(n_available)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_available)[:n_wanted])


def load_dataset(spec: DataSpec, path: Path, handle: ModelHandle, role: str) -> Dataset:
    """Load ``path`` for ``handle`` as described by ``spec``; ``role`` names the recipe section."""
    if not path.exists():
        option = "--calib" if role == "calibration" else "--eval"
        raise DataError(f"{role}.path {path.name!r} does not exist; pass an image folder, .npz, "
                        f".npy, .txt or .jsonl file ({option})")
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    if not fmt:
        raise DataError(f"{role}.path {path.name!r}: cannot tell the format from the extension "
                        f"{path.suffix!r}; set {role}.format to imagefolder, npz, npy, text or "
                        "jsonl")
    image_formats = ("imagefolder", "npz", "npy")
    if handle.task == "image-classification" and fmt not in image_formats:
        raise DataError(f"{role}.path {path.name!r} is {fmt} data, but the model is an image "
                        "classifier; pass an image folder or an .npz/.npy array of images")
    if handle.task == "text-embedding" and fmt in image_formats:
        raise DataError(f"{role}.path {path.name!r} is {fmt} data, but the model is a text "
                        "encoder; pass a .txt file (one sentence per line) or .jsonl")
    loader = {"imagefolder": _load_imagefolder, "npz": _load_arrays, "npy": _load_arrays,
              "text": _load_text, "jsonl": _load_text}[fmt]
    ds = loader(spec, path, handle, role, fmt)
    ds.source, ds.format = str(path), fmt
    if len(ds) == 0:
        raise DataError(f"{role}.path {path.name!r} holds no samples")
    if ds.available > len(ds) or spec.num_samples > ds.available:
        ds.notes.append(f"used {len(ds)} of {ds.available} samples (num_samples "
                        f"{spec.num_samples}, seed {spec.seed})")
    return ds


def _check_image_shape(x: np.ndarray, handle: ModelHandle, role: str, name: str) -> None:
    want = tuple(handle.input_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise DataError(f"{role}.path {name!r}: inputs have shape {list(x.shape)}, the model "
                        f"expects [N, {', '.join(map(str, want))}] (preprocessed and normalized). "
                        "Resize them, or pass an image folder to use the model's preprocessing")


def _load_arrays(spec: DataSpec, path: Path, handle: ModelHandle, role: str, fmt: str) -> Dataset:
    expected = ("an .npy file written by numpy.save" if fmt == "npy" else
                "an .npz file written by numpy.savez (a zip of .npy arrays)")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{role}.path {path.name!r} is empty (0 bytes); expected {expected} "
                        "holding model-ready inputs [N, C, H, W]")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as z:
                arrays = {k: z[k] for k in z.files}
            if fmt == "npy":
                raise ValueError("it is a zip of named arrays (.npz), not a single array")
        elif fmt == "npz":
            raise ValueError("it holds a single array (.npy), not a zip of named arrays")
        else:
            arrays = {"x": loaded}
    # numpy raises EOFError on truncated headers, BadZipFile on damaged archives, ValueError on
    # pickled objects: all are a bad file, never a bug. Only the file's name is shown.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        why = (str(e).replace(str(path), path.name).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{role}.path {path.name!r}: cannot read as {fmt} without pickle "
                        f"({why[:200]}); expected {expected}") from None
    key = spec.input_key or next((k for k in NPZ_INPUT_KEYS if k in arrays), None)
    if key is None or key not in arrays:
        raise DataError(f"{role}.path {path.name!r}: no input array; found {sorted(arrays)}, "
                        f"expected one of {list(NPZ_INPUT_KEYS)} or set {role}.input_key")
    x = arrays[key]
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{role}.path {path.name!r}: array {key!r} has dtype {x.dtype}, "
                        "expected real numbers (float or integer)")
    _check_image_shape(x, handle, role, path.name)
    labels = arrays.get(spec.label_key)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(x) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{role}.path {path.name!r}: {spec.label_key!r} must be a 1-D integer "
                            f"array with one label per input ({len(x)}), got shape "
                            f"{list(labels.shape)} dtype {labels.dtype}")
    idx = subset_indices(len(x), spec.num_samples, spec.seed)
    with np.errstate(over="ignore"):  # values beyond float32 become Inf, refused just below
        chosen = np.ascontiguousarray(x[idx], np.float32)
    finite = np.isfinite(chosen).reshape(len(chosen), -1).all(1) if len(chosen) else \
        np.ones(0, bool)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{role}.path {path.name!r}: array {key!r} holds NaN or Inf (or values "
                        f"beyond float32) in {len(bad)} of {len(chosen)} samples used, first "
                        f"at index {int(idx[bad[0]])}; inputs must be finite numbers")
    return Dataset({IMAGE_INPUT: torch.from_numpy(chosen)},
                   None if labels is None else torch.from_numpy(labels[idx].astype(np.int64)),
                   available=len(x))


def _load_imagefolder(spec: DataSpec, path: Path, handle: ModelHandle, role: str,
                      fmt: str) -> Dataset:
    from PIL import Image
    from timm.data import create_transform

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int | None]] = []
    if classes:
        for ci, c in enumerate(classes):
            files += [(f, ci) for f in sorted((path / c).rglob("*"))
                      if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    else:
        files = [(f, None) for f in sorted(path.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not files:
        raise DataError(f"{role}.path {path.name!r} holds no images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "use one subfolder per class, or put unlabeled images directly in it")
    cfg = dict(handle.data_config)
    transform = create_transform(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"],
                                 interpolation=cfg.get("interpolation", "bilinear"),
                                 crop_pct=cfg.get("crop_pct", 1.0), is_training=False)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    idx = subset_indices(len(files), spec.num_samples, spec.seed)
    xs, ys = [], []
    for i in idx:
        f, label = files[i]
        try:
            with Image.open(f) as im:
                xs.append(transform(im.convert(mode)))
        except (OSError, Image.DecompressionBombError, ValueError) as e:
            raise DataError(f"{role}: cannot read image {str(f.relative_to(path))!r}: "
                            f"{e}") from None
        ys.append(label)
    labels = torch.tensor(ys, dtype=torch.int64) if classes else None
    ds = Dataset({IMAGE_INPUT: torch.stack(xs)}, labels, available=len(files))
    if classes:
        ds.notes.append(f"classes (label order): {', '.join(classes[:20])}"
                        + (" ..." if len(classes) > 20 else ""))
    return ds


def _load_text(spec: DataSpec, path: Path, handle: ModelHandle, role: str, fmt: str) -> Dataset:
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise DataError(f"{role}.path {path.name!r} is larger than {MAX_TEXT_BYTES >> 20} MB")
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines()
    texts: list[str] = []
    for lineno, line in enumerate(raw, 1):
        line = line.strip()
        if not line:
            continue
        if fmt == "jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{role}.path {path.name!r} line {lineno}: not JSON "
                                f"({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(spec.text_field), str):
                raise DataError(f"{role}.path {path.name!r} line {lineno}: expected an object with "
                                f"a string field {spec.text_field!r} (set {role}.text_field)")
            line = obj[spec.text_field]
        texts.append(line)
    idx = subset_indices(len(texts), spec.num_samples, spec.seed)
    chosen = [texts[i] for i in idx]
    if not chosen:
        return Dataset({"input_ids": torch.zeros(0, 1, dtype=torch.int64),
                        "attention_mask": torch.zeros(0, 1, dtype=torch.int64)})
    max_len = min(spec.max_length, handle.max_positions)
    enc = handle.tokenizer(chosen, padding=True, truncation=True, max_length=max_len,
                           return_tensors="pt")
    return Dataset({"input_ids": enc["input_ids"].long(),
                    "attention_mask": enc["attention_mask"].long()},
                   None, available=len(texts), texts=chosen)
