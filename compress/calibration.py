"""Run calibration data through a model with its quantizers observing, then freeze them."""

from __future__ import annotations

import torch

from .context import PassContext
from .models.handle import ModelHandle
from .quant.modules import QUANT_MODULES, act_quantizers, set_act_mode


@torch.no_grad()
def observe_activations(handle: ModelHandle, ctx: PassContext, label: str = "calibrating") -> int:
    """Feed the calibration set with every ActQuantizer observing; freeze them; return samples."""
    quantizers = act_quantizers(handle.module)
    set_act_mode(handle.module, "observe")
    n, total = 0, len(ctx.calib)
    for batch in ctx.calib_batches():
        handle.forward(batch)
        n += next(iter(batch.values())).shape[0]
        ctx.progress(0.8 * n / total, f"{label} {n}/{total}")
    for q in quantizers:
        if q.mode == "observe":
            if q.observed:
                q.freeze()
            else:
                # Never reached by the calibration data: no range to freeze. It stays off (the
                # layer's input stays float) and the pass reports the layer.
                q.mode = "off"
    return n


@torch.no_grad()
def measure_layer_sqnr(handle: ModelHandle, ctx: PassContext,
                       max_samples: int = 64) -> dict[str, float]:
    """Local output SQNR (dB) of every quantized layer: quantized vs float on the same input."""
    layers = {n: m for n, m in handle.module.named_modules() if isinstance(m, QUANT_MODULES)}
    for m in layers.values():
        m.sqnr.reset()
        m.sqnr.enabled = True
    try:
        for batch in ctx.calib_batches(max_samples):
            handle.forward(batch)
    finally:
        for m in layers.values():
            m.sqnr.enabled = False
    return {n: round(m.sqnr.db, 2) for n, m in layers.items()}
