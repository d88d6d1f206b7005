"""Assemble the report dict written as report.json."""

from __future__ import annotations

import json
import math
import platform
import sys

from .. import __version__

REPORT_SCHEMA_VERSION = 1


def _finite_copy(value, path: str, replaced: list[str]):
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0
                                    and hasattr(value, "item")):
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            replaced.append(f"{path} ({number})")
            return None
        return number
    if isinstance(value, dict):
        return {str(k): _finite_copy(v, f"{path}.{k}" if path else str(k), replaced)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_copy(v, f"{path}.{i}", replaced) for i, v in enumerate(value)]
    return value


def strict_json(report: dict) -> str:
    """report.json as strict JSON: NaN and Inf become null, with a warning naming each field.

    ``json.dumps`` would write bare NaN, which strict parsers (JavaScript, jq, Go) refuse.
    """
    replaced: list[str] = []
    clean = _finite_copy(report, "", replaced)
    if replaced:
        shown = ", ".join(replaced[:20]) + (f", ... ({len(replaced) - 20} more)"
                                            if len(replaced) > 20 else "")
        clean.setdefault("warnings", []).append(
            f"values that were not finite numbers are written as null: {shown}")
    return json.dumps(clean, indent=2, default=str, allow_nan=False)


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - a missing optional package is simply absent
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide how fast and how exact ORT's int8 kernels are.
INT8_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_features() -> list[str]:
    from ..export.ort import cpu_flags

    flags = cpu_flags()
    return [x for x in INT8_CPU_FEATURES if x in flags]


def environment_info() -> dict:
    import torch

    from ..export.ort import default_threads

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_int8_features": cpu_features(),
        "cpu_threads_available": default_threads(),
        "gpu": gpu,
        "versions": {"compress": __version__} | {m: _version(m) for m in (
            "torch", "timm", "transformers", "onnx", "onnxruntime", "onnxscript",
            "optimum", "optimum-onnx", "numpy")},
    }
