"""Find producer -> consumer pairs of layers from a traced forward, and fold BatchNorm into Conv.

Module classes differ across timm and transformers (``BatchNormAct2d``, ``ConvNormAct``, a
ResNet's ``conv1``/``bn1`` attributes, a BERT's ``LayerNorm`` beside ``intermediate.dense``), but
the dataflow does not: a BatchNorm whose input *is* a Conv's output, a LayerNorm whose output *is*
a Linear's input. ``trace_pairs`` runs one batch with hooks and matches tensors by storage, shape
and stride, so it works on any architecture without naming a class. Whether the producer's
output also goes elsewhere (a residual, a padding step) is not visible to hooks; callers that
rewrite parameters check the model's output after the rewrite (``outputs_match``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


@torch.no_grad()
def trace_pairs(model: nn.Module, run: Callable[[], object],
                producer: tuple[type, ...], consumer: tuple[type, ...]) -> dict[str, list[str]]:
    """``{producer name: [consumer names]}``: consumers whose first input is exactly a
    producer's output tensor during ``run()`` (one forward pass)."""
    # Outputs stay referenced until the run ends, so no later tensor can reuse their storage
    # and be mistaken for them.
    outputs: dict[tuple, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, list[str]] = {}
    hooks = []

    def on_output(name):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor):
                outputs[_key(out)] = (name, out)
        return hook

    def on_input(name):
        def hook(mod, args):
            if args and isinstance(args[0], torch.Tensor):
                src = outputs.get(_key(args[0]), (None,))[0]
                if src is not None and name not in pairs.setdefault(src, []):
                    pairs[src].append(name)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, producer):
            hooks.append(m.register_forward_hook(on_output(name)))
        if isinstance(m, consumer):
            hooks.append(m.register_forward_pre_hook(on_input(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {k: v for k, v in pairs.items() if v}


@torch.no_grad()
def outputs_match(reference: torch.Tensor, got: torch.Tensor, rtol: float = 1e-3) -> bool:
    """Relative L2 error of ``got`` against ``reference`` at most ``rtol``."""
    ref, got = reference.float(), got.float()
    return float((ref - got).norm()) <= rtol * max(float(ref.norm()), 1e-12)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, run: Callable[[], torch.Tensor]) -> list[str]:
    """Fold every eval-mode BatchNorm2d that reads a Conv2d's output into that Conv; returns the
    folded BatchNorm names.

    The BatchNorm keeps its place (so ``BatchNormAct2d``'s activation still runs) but becomes
    the identity: weight 1, bias 0, mean 0, variance ``1 - eps``, which ONNX Runtime removes.
    Folding is checked on ``run()``'s output and undone pair by pair where the Conv's output
    also went elsewhere.
    """
    pairs = trace_pairs(model, run, (nn.Conv2d,), (nn.BatchNorm2d,))
    candidates = [(conv, bns[0]) for conv, bns in pairs.items() if len(bns) == 1]
    if not candidates:
        return []
    reference = run()
    saved = {}
    for conv_name, bn_name in candidates:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.training or not bn.track_running_stats or bn.running_var is None:
            continue
        saved[bn_name] = _fold(conv, bn)
    if not outputs_match(reference, run()):
        # Rare (a Conv output read twice): undo everything, then fold one pair at a time.
        for conv_name, bn_name in candidates:
            if bn_name in saved:
                _restore(model.get_submodule(conv_name), model.get_submodule(bn_name),
                         saved[bn_name])
        saved = {}
        for conv_name, bn_name in candidates:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            if bn.training or not bn.track_running_stats or bn.running_var is None:
                continue
            state = _fold(conv, bn)
            if outputs_match(reference, run()):
                saved[bn_name] = state
            else:
                _restore(conv, bn, state)
    return list(saved)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> dict:
    state = {"conv_weight": conv.weight.detach().clone(),
             "conv_bias": None if conv.bias is None else conv.bias.detach().clone(),
             "bn": {k: v.detach().clone() for k, v in bn.state_dict().items()}}
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    new_bias = (bias - bn.running_mean) * scale + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1)
    if bn.bias is not None:
        bn.bias.zero_()
    return state


def _restore(conv: nn.Conv2d, bn: nn.BatchNorm2d, state: dict) -> None:
    conv.weight.copy_(state["conv_weight"])
    if state["conv_bias"] is None:
        conv.bias = None
    else:
        conv.bias.copy_(state["conv_bias"])
    bn.load_state_dict(state["bn"])
