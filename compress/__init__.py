"""compress: model compression for ONNX Runtime (quantization, binarization, token pruning)."""

__version__ = "0.1.0"

from .api import CompressResult, compress  # noqa: E402
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
from .recipe import Recipe, load_recipe, parse_recipe, recipe_from_yaml  # noqa: E402

__all__ = [
    "CompressError", "CompressResult", "DataError", "ExportError", "InputError",
    "ModelLoadError", "PassError", "QualityGateError", "Recipe", "RecipeError",
    "UnsupportedModelError", "compress", "load_recipe", "parse_recipe", "recipe_from_yaml",
]
