"""Layering a behaviour class over a model object's own class, in place."""

from __future__ import annotations

_MIXED: dict[tuple[type, type], type] = {}


def mix_into(obj: object, mixin: type, prefix: str, base: type | None = None) -> bool:
    """Make ``obj`` an instance of ``(mixin, base)``; ``base`` defaults to its class.

    One subclass per (mixin, base) pair, named ``prefix + base.__name__`` and cached, so every
    patched instance of a class shares it; weights and state-dict keys are untouched. Returns
    False (and changes nothing) when ``base`` already has the mixin.
    """
    base = type(obj) if base is None else base
    if issubclass(base, mixin):
        return False
    cls = _MIXED.get((mixin, base))
    if cls is None:
        cls = _MIXED[(mixin, base)] = type(f"{prefix}{base.__name__}", (mixin, base), {})
    obj.__class__ = cls
    return True
