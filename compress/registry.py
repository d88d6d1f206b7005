"""Pass registry: one pydantic config class and one registered function per pass.

A pass is a config class (``type`` pinned by a ``Literal``) plus a function
``fn(model: ModelHandle, config, ctx: PassContext) -> None`` registered with ``@register_pass``.
Torch passes change ``model.module`` in place before export; ONNX passes rewrite ``ctx.onnx_path``
after it. The recipe's ``passes`` union is built from this registry, so registering a pass is
the only step needed to make it usable from YAML, the CLI and the service.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Stage = Literal["torch", "onnx"]


class PassConfig(BaseModel):
    """Base class of every pass config. Subclasses pin ``type`` with a ``Literal`` default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str


@dataclass(frozen=True)
class PassEntry:
    name: str
    config_cls: type[PassConfig]
    fn: Callable[..., Any]
    stage: Stage
    needs_calibration: bool | Callable[[PassConfig], bool]
    summary: str

    def calibration_needed(self, config: PassConfig) -> bool:
        nc = self.needs_calibration
        return nc(config) if callable(nc) else nc


_PASSES: dict[str, PassEntry] = {}


def register_pass(config_cls: type[PassConfig], *, stage: Stage = "torch",
                  needs_calibration: bool | Callable[[PassConfig], bool] = False):
    """Register ``fn`` as the implementation of ``config_cls``; returns ``fn`` unchanged.

    ``needs_calibration`` may be a function of the config (e.g. static vs dynamic quantization).
    """

    def decorator(fn):
        name = config_cls.model_fields["type"].default
        if not isinstance(name, str) or not name:
            raise TypeError(f"{config_cls.__name__}.type needs a Literal default naming the pass")
        if name in _PASSES:
            raise RuntimeError(f"pass {name!r} registered twice")
        doc = (config_cls.__doc__ or "").strip().splitlines()
        _PASSES[name] = PassEntry(name, config_cls, fn, stage, needs_calibration,
                                  doc[0] if doc else "")
        return fn

    return decorator


def get_pass(name: str) -> PassEntry:
    from .errors import RecipeError

    try:
        return _PASSES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _PASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown pass type {name!r}.{hint} Known passes: "
                          f"{', '.join(sorted(_PASSES))}") from None


def all_passes() -> dict[str, PassEntry]:
    return dict(_PASSES)


def pass_catalog() -> list[dict]:
    """Every registered pass with its stage, calibration need, docstring and JSON Schema."""
    return [
        {
            "type": e.name,
            "stage": e.stage,
            "needs_calibration": e.needs_calibration if isinstance(e.needs_calibration, bool)
            else "depends on the config",
            "summary": e.summary,
            "doc": (e.config_cls.__doc__ or "").strip(),
            "schema": e.config_cls.model_json_schema(),
        }
        for e in sorted(_PASSES.values(), key=lambda e: e.name)
    ]
