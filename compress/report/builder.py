"""Assemble the report dict written as report.json."""

from __future__ import annotations

import platform
import sys

REPORT_SCHEMA_VERSION = 1


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
        "versions": {m: _version(m) for m in (
            "compress", "torch", "timm", "transformers", "onnx", "onnxruntime", "onnxscript",
            "optimum", "optimum-onnx", "numpy")},
    }
