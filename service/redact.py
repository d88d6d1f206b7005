"""Server paths out of what a tenant reads: error messages become relative to the job's folder.

Library errors quote the files they touched (ONNX external data names the absolute folder, an
OSError names the file it could not write). The tenant must not learn where the service keeps
its data, so every error body passes through ``redact_paths`` at the service boundary: paths
inside the job's folder lose the folder; any other absolute path keeps only its last part.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# An absolute POSIX path of two or more parts that is not part of a URL or of a relative path,
# and not one of the API's own routes (/v1/...).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?!v1/)(?:[^\s'\"/:,;()\[\]{}<>|]+/)+"
                            r"([^\s'\"/:,;()\[\]{}<>|]*)")


def redact_paths(text: str, job_dir: Path | None = None) -> str:
    """``text`` with paths inside ``job_dir`` made relative to it and any other absolute path
    reduced to ``.../<last part>``."""
    if not text:
        return text
    if job_dir is not None:
        for root in sorted({str(job_dir), str(Path(job_dir).resolve())}, key=len, reverse=True):
            text = text.replace(root.rstrip("/") + "/", "").replace(root, ".")
    return _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(1), text)


def redact_error(value: Any, job_dir: Path | None = None) -> Any:
    """Every string in an error body (dicts and lists walked) through ``redact_paths``."""
    if isinstance(value, str):
        return redact_paths(value, job_dir)
    if isinstance(value, dict):
        return {k: redact_error(v, job_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_error(v, job_dir) for v in value]
    return value
