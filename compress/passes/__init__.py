"""Compression passes. Importing this package registers every pass.

Add a pass: a module here with a ``PassConfig`` subclass and a function decorated with
``@register_pass``, imported below. The recipe union is built from the registry.
"""

from . import (  # noqa: F401
    binarize,
    expedit,
    ia_red,
    mixed_precision,
    ort_quantize,
    quantize,
    smooth_quant,
    token_reduction,
    top_vim,
    weight_only,
)
