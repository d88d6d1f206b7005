"""SHA-256 of files: the one digest that report artifacts, ONNX metadata, the service's
SHA256SUMS and the shipped reference weights all use."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
