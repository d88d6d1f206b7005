"""compress: model compression for ONNX Runtime (quantization, binarization, token pruning)."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CompressError,
    DataError,
    ExportError,
    InputError,
    ModelLoadError,
    PassError,
    QualityGateError,
    RecipeError,
    UnsupportedModelError,
)

# compress() and the recipe classes import torch and every pass; loaded on first use so that
# `compress --help` and the service client start without them.
_LAZY = {"CompressResult": "api", "compress": "api", "Recipe": "recipe",
         "load_recipe": "recipe", "parse_recipe": "recipe", "recipe_from_yaml": "recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


__all__ = [
    "CompressError", "CompressResult", "DataError", "ExportError", "InputError",
    "ModelLoadError", "PassError", "QualityGateError", "Recipe", "RecipeError",
    "UnsupportedModelError", "compress", "load_recipe", "parse_recipe", "recipe_from_yaml",
]
