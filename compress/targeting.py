"""Pick layers by module class name, exact module name or ``re:`` regex (llm-compressor style).

``targets`` selects, ``ignore`` removes. A pattern is one of
  * a class name such as ``Linear`` or ``Conv2d`` (matches ``type(module).__name__``),
  * an exact module name such as ``head`` or ``blocks.0.attn.qkv``,
  * ``re:<regex>`` matched with ``re.fullmatch`` against the module name.
Patterns that match nothing are errors, so a typo never silently quantizes everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo
from torch import nn

from .errors import RecipeError


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def check_patterns(patterns: Iterable[str], field: str) -> None:
    """Raise ValueError for regexes that do not compile; recipe validation reports it as a
    RecipeError at the field's path."""
    for i, p in enumerate(patterns):
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{field}[{i}] {p!r} is not a valid regex: {e}") from None


def _validate_patterns(patterns: list[str], info: ValidationInfo) -> list[str]:
    check_patterns(patterns, info.field_name)
    return patterns


# A pass config's ``targets`` / ``ignore`` field: layer patterns, regexes checked on load.
LayerPatterns = Annotated[list[str], AfterValidator(_validate_patterns)]


def select_modules(model: nn.Module, targets: list[str], ignore: list[str],
                   allowed: tuple[type, ...], field_prefix: str = "") -> dict[str, nn.Module]:
    """Modules of ``allowed`` types matched by ``targets`` and not by ``ignore``, by name.

    Raises RecipeError naming the field when a pattern matches no module at all.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    for field, patterns in (("targets", targets), ("ignore", ignore)):
        for i, p in enumerate(patterns):
            # A torch layer type the model happens not to have (Conv2d in BERT) is fine;
            # a module name, regex or unknown class name that matches nothing is a mistake.
            if _is_layer_type(p):
                continue
            if not any(_matches(p, n, m) for n, m in named):
                sample = ", ".join(n for n, m in named if isinstance(m, allowed))
                raise RecipeError(
                    f"{field_prefix}{field}[{i}] {p!r} matches no module in the model",
                    [(f"{field_prefix}{field}.{i}",
                      f"no module is named or typed {p!r}; layers that can be targeted: "
                      f"{sample[:600]}")])
    chosen = {}
    for n, m in named:
        if not isinstance(m, allowed):
            continue
        if any(_matches(p, n, m) for p in targets) and not any(_matches(p, n, m) for p in ignore):
            chosen[n] = m
    if not chosen:
        kinds = ", ".join(sorted({c.__name__ for c in allowed}))
        raise RecipeError(f"{field_prefix}targets select no layer of type {kinds} "
                          f"(targets {targets}, ignore {ignore})",
                          [(f"{field_prefix}targets", "matches no quantizable layer")])
    return chosen


def _is_layer_type(pattern: str) -> bool:
    return not pattern.startswith("re:") and "." not in pattern and \
        isinstance(getattr(nn, pattern, None), type)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``; an input step the old layer carried moves to ``new``.

    SQ-b on post-LN BERT leaves an explicit per-channel step (``input_transform``, applied by
    a forward pre-hook) on the Linear layers it smoothed. Every pass swaps layers through here,
    so a quantized replacement keeps applying it instead of silently dropping it. Layers that
    apply ``input_transform`` themselves (QuantLinear) take it in their constructor.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    transform = getattr(old, "input_transform", None)
    if transform is not None and getattr(new, "input_transform", None) is None:
        from .quant.modules import apply_input_transform

        new.input_transform = transform
        new.register_forward_pre_hook(apply_input_transform)
    setattr(parent, child, new)
