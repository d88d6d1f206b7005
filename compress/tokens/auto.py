"""Automatic token-reduction strength: the ``auto`` recipe field and its fidelity check.

Shared by every token pass (tome, evit, expedit, text_token_prune): ``AutoSchedule`` is the
recipe block, ``check_auto`` validates it against the model, ``fidelity_check`` measures a
candidate strength against the original model on the calibration data.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..context import PassContext
from ..errors import RecipeError
from ..models.handle import ModelHandle


class AutoSchedule(BaseModel):
    """Search the strength on calibration data instead of fixing it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    speedup: float | None = Field(None, gt=1, description=(
        "estimated speed-up of the transformer blocks (from token counts) to reach"))
    max_accuracy_drop: float | None = Field(None, ge=0, description=(
        "classification: largest top-1 drop in points on the calibration set (against labels "
        "when it has them, else 100 - top-1 agreement with the original)"))
    min_cosine: float | None = Field(None, gt=0, le=1, description=(
        "text encoders and token-map models: smallest mean cosine (per embedding or per token) "
        "to the original on the calibration set"))
    max_samples: int = Field(256, ge=1, le=100_000, description="calibration samples per trial")

    @model_validator(mode="after")
    def _something(self):
        if self.speedup is None and self.max_accuracy_drop is None and self.min_cosine is None:
            raise ValueError("give speedup, max_accuracy_drop or min_cosine")
        return self


def _outputs(handle: ModelHandle, ctx: PassContext, max_samples: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [handle.forward(b).float().cpu() for b in ctx.calib_batches(max_samples)]


def fidelity_check(handle: ModelHandle, ctx: PassContext, auto: AutoSchedule, field: str):
    """A function ``apply -> ok`` comparing the patched model with the original on calib."""
    if ctx.calib is None:
        return None
    if is_classifier(handle):
        if auto.max_accuracy_drop is None:
            return None
    elif auto.min_cosine is None:
        return None
    ref = torch.cat(_outputs(handle, ctx, auto.max_samples)).numpy()
    labels = None if ctx.calib.labels is None else ctx.calib.labels[:len(ref)].numpy()

    def ok(apply) -> bool:
        apply()
        out = torch.cat(_outputs(handle, ctx, auto.max_samples)).numpy()
        if is_classifier(handle):
            if labels is not None:
                drop = 100 * ((ref.argmax(-1) == labels).mean() - (out.argmax(-1) == labels).mean())
            else:
                drop = 100 * (1 - (ref.argmax(-1) == out.argmax(-1)).mean())
            return bool(drop <= auto.max_accuracy_drop)
        # Embeddings [S, C] or token maps [S, N, C]: the mean cosine over every vector.
        a = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        b = out / np.linalg.norm(out, axis=-1, keepdims=True)
        return bool((a * b).sum(-1).mean() >= auto.min_cosine)

    return ok


def is_classifier(handle: ModelHandle) -> bool:
    return handle.task == "image-classification" and not handle.token_map


def check_auto(auto: AutoSchedule | None, handle: ModelHandle, ctx: PassContext) -> None:
    if auto is None:
        return
    p = f"passes.{ctx.index}.auto"
    if is_classifier(handle) and auto.min_cosine is not None:
        raise RecipeError("min_cosine is for text encoders and token maps", [
            (f"{p}.min_cosine", "use max_accuracy_drop for classifiers")])
    if not is_classifier(handle) and auto.max_accuracy_drop is not None:
        raise RecipeError("max_accuracy_drop is for classifiers", [
            (f"{p}.max_accuracy_drop", "use min_cosine for text encoders and token maps")])
    if (auto.max_accuracy_drop is not None or auto.min_cosine is not None) and ctx.calib is None:
        raise RecipeError("auto with a fidelity bound needs calibration data",
                          [("calibration", "required by " + p)])


def auto_needs_data(config) -> bool:
    """An automatic schedule with a fidelity target measures it on calibration data."""
    auto = config.auto
    return auto is not None and (auto.max_accuracy_drop is not None
                                 or auto.min_cosine is not None)
