"""Distillation of a binarized student from its full-precision teacher, after BiBERT.

Direction-Matching Distillation (BiBERT, quant_task_glue.py ~l.520-590): per layer, the
full-precision (pre-binarization) Q, K and V of every head give similarity matrices
``P_X = X X^T / sqrt(d_head)``; the loss compares their directions,
``||S/||S|| - T/||T|| ||`` (Frobenius over the batched tensor, not squared), summed over layers
and over Q, K, V. The same loss on every layer's output (and the embedding output) is the
hidden-state term; the output term is KL on the logits (+ cross-entropy on labels when given)
for classifiers and ``1 - cosine`` on the embeddings for encoders.

Only torch is imported (``bench/gpu_distill.py`` loads this file on its own). Layers are found by
structure: timm-style attention (``qkv`` Linear + ``num_heads``) and BERT-style self-attention
(``query``/``key``/``value`` + ``num_attention_heads``); a layer is the ModuleList element that
holds an attention module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ForwardFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class DistillSettings:
    method: str = "dmd"                  # "output" | "dmd"
    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1                  # fraction of steps with a linear warm-up (BertAdam)
    max_seconds: float | None = None     # stop early when training takes longer than this
    output_weight: float = 1.0
    label_weight: float = 0.5            # BiBERT: soft CE + 0.5 CE(labels)
    qkv_weight: float = 1.0
    hidden_weight: float = 1.0
    temperature: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10


@dataclass
class DistillResult:
    steps: int
    seconds: float
    device: str
    history: list[dict] = field(default_factory=list)   # every log_every steps: step + losses
    stopped_early: bool = False

    @property
    def first(self) -> dict:
        return self.history[0] if self.history else {}

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


# --------------------------------------------------------------------------- loss functions


def direction_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BiBERT's ``att_loss_r2b``: ``|| s/||s|| - t/||t|| ||`` over the whole tensor."""
    s, t = s.float(), t.float()
    return torch.linalg.vector_norm(s / s.norm().clamp_min(1e-12) - t / t.norm().clamp_min(1e-12))


def similarity(x: torch.Tensor) -> torch.Tensor:
    """``X X^T / sqrt(d)`` per head: [B, H, N, d] -> [B, H, N, N]."""
    return torch.matmul(x, x.transpose(-1, -2)) / math.sqrt(x.shape[-1])


def output_loss(task: str, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                settings: DistillSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(distillation term, label term or None)."""
    if task == "image-classification":
        tau = settings.temperature
        kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1),
                      reduction="batchmean", log_target=True) * tau * tau
        ce = F.cross_entropy(s, labels) if labels is not None else None
        return kl, ce
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean(), None


# --------------------------------------------------------------------------- taps


@dataclass
class LayerTap:
    layer: str          # the ModuleList element (its output is the hidden state)
    attn: str           # the attention module
    kind: str           # "timm" | "bert"
    heads: int


def find_layers(model: nn.Module) -> list[LayerTap]:
    """Every transformer layer with its attention, in order."""
    modules = dict(model.named_modules())
    taps = []
    for name, m in modules.items():
        if hasattr(m, "qkv") and hasattr(m, "num_heads"):
            kind, heads = "timm", int(m.num_heads)
        elif all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads")):
            kind, heads = "bert", int(m.num_attention_heads)
        else:
            continue
        parts = name.split(".")
        layer = name
        for i in range(len(parts) - 1, 0, -1):
            # the element of a layer list: timm ``blocks`` (Sequential), BERT ``layer`` (ModuleList)
            if parts[i - 1].isdigit() and isinstance(modules.get(".".join(parts[:i - 1])),
                                                     (nn.ModuleList, nn.Sequential)):
                layer = ".".join(parts[:i])
                break
        taps.append(LayerTap(layer, name, kind, heads))
    return taps


class Recorder:
    """Forward hooks that keep per-layer Q, K, V ([B, H, N, d]) and hidden states ([B, N, C])."""

    def __init__(self, model: nn.Module, taps: list[LayerTap], qkv: bool, hidden: bool):
        self.q: list = [None] * len(taps)
        self.k: list = [None] * len(taps)
        self.v: list = [None] * len(taps)
        self.hidden: list = [None] * (len(taps) + 1)
        self.handles = []
        for i, tap in enumerate(taps):
            attn = model.get_submodule(tap.attn)
            if qkv and tap.kind == "timm":
                self.handles.append(attn.qkv.register_forward_hook(self._timm_qkv(i, tap.heads)))
            elif qkv:
                for part in ("query", "key", "value"):
                    self.handles.append(getattr(attn, part).register_forward_hook(
                        self._bert_part(i, part[0], tap.heads)))
            if hidden:
                layer = model.get_submodule(tap.layer)
                self.handles.append(layer.register_forward_hook(self._hidden(i + 1)))
                if i == 0:
                    self.handles.append(layer.register_forward_pre_hook(
                        self._embed, with_kwargs=True))

    def _timm_qkv(self, i, heads):
        def hook(mod, args, out):
            B, N, C3 = out.shape
            q, k, v = out.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4)
            self.q[i], self.k[i], self.v[i] = q, k, v
        return hook

    def _bert_part(self, i, which, heads):
        def hook(mod, args, out):
            B, N, C = out.shape
            getattr(self, which)[i] = out.view(B, N, heads, C // heads).transpose(1, 2)
        return hook

    def _hidden(self, i):
        def hook(mod, args, out):
            self.hidden[i] = out[0] if isinstance(out, tuple) else out
        return hook

    def _embed(self, mod, args, kwargs):
        self.hidden[0] = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def dmd_terms(s: Recorder, t: Recorder, mask: torch.Tensor | None, qkv: bool, hidden: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over layers of Q, K, V direction losses, sum of hidden-state direction losses)."""
    zero = torch.zeros((), device=mask.device if mask is not None else None)
    lq, lh = zero, zero
    hm = mask[:, :, None].float() if mask is not None else None
    am = mask[:, None, :, None].float() if mask is not None else None
    if qkv:
        for xs, xt in ((s.q, t.q), (s.k, t.k), (s.v, t.v)):
            for a, b in zip(xs, xt, strict=False):
                if am is not None:
                    a, b = a * am, b * am
                lq = lq + direction_loss(similarity(a.float()), similarity(b.float()))
    if hidden:
        for a, b in zip(s.hidden, t.hidden, strict=False):
            if a is None or b is None:
                continue
            if hm is not None:
                a, b = a * hm, b * hm
            lh = lh + direction_loss(a, b)
    return lq, lh


# --------------------------------------------------------------------------- training loop


def sample_batch(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, idx: torch.Tensor,
                 device: torch.device) -> tuple[dict, torch.Tensor | None]:
    batch = {k: v[idx] for k, v in inputs.items()}
    if "attention_mask" in batch:  # trim padding shared by the whole batch
        n = max(int(batch["attention_mask"].sum(1).max()), 1)
        batch = {k: v[:, :n] for k, v in batch.items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    return batch, None if labels is None else labels[idx].to(device)


def distill(student: nn.Module, teacher: nn.Module, inputs: dict[str, torch.Tensor],
            labels: torch.Tensor | None, forward: ForwardFn, task: str,
            settings: DistillSettings, device: torch.device,
            progress: Callable[[float, str], None] | None = None,
            on_log: Callable[[int], dict] | None = None) -> DistillResult:
    """Train ``student`` in place to match ``teacher`` on ``inputs`` (N-first tensors).

    Both models are used in eval mode (no dropout); the teacher is frozen. Labels add a
    cross-entropy term for classifiers when given. ``on_log(step)`` may add held-out metrics to
    each history row (its time is not counted). Returns the loss history and timing.
    """
    if settings.method not in ("output", "dmd"):
        raise ValueError(f"method must be output or dmd, got {settings.method!r}")
    student.to(device).eval()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warm = max(1, int(settings.warmup * settings.steps))

    def lr_at(step):  # BertAdam's warmup_linear: linear up, then linear down to 0
        return step / warm if step < warm else max(0.0, (settings.steps - step) /
                                                   max(1, settings.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    use_dmd = settings.method == "dmd"
    qkv = use_dmd and settings.qkv_weight > 0
    hidden = use_dmd and settings.hidden_weight > 0
    taps = find_layers(teacher) if use_dmd else []
    s_taps = find_layers(student) if use_dmd else []
    if use_dmd and (not taps or len(taps) != len(s_taps)):
        raise ValueError("DMD found no transformer layers (timm Attention or BERT self-attention)")
    s_rec = Recorder(student, s_taps, qkv, hidden)
    t_rec = Recorder(teacher, taps, qkv, hidden)
    n = next(iter(inputs.values())).shape[0]
    g = torch.Generator().manual_seed(settings.seed)
    perm, pos = torch.randperm(n, generator=g), 0
    bs = min(settings.batch_size, n)
    history: list[dict] = []
    t0 = time.perf_counter()
    step, stopped = 0, False
    try:
        for step in range(1, settings.steps + 1):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + bs]
            pos += bs
            batch, y = sample_batch(inputs, labels, idx, device)
            with torch.no_grad():
                t_out = forward(teacher, batch)
            # eval() again every step: some models (timm LeViT) cache tensors computed from
            # trainable parameters while in eval mode and drop the cache in train(); a cache
            # kept across steps would backpropagate through the previous step's freed graph.
            student.eval()
            s_out = forward(student, batch)
            l_out, l_ce = output_loss(task, s_out, t_out, y, settings)
            loss = settings.output_weight * l_out
            if l_ce is not None and settings.label_weight > 0:
                loss = loss + settings.label_weight * l_ce
            l_qkv = l_hid = None
            if use_dmd:
                l_qkv, l_hid = dmd_terms(s_rec, t_rec, batch.get("attention_mask"), qkv, hidden)
                loss = loss + settings.qkv_weight * l_qkv + settings.hidden_weight * l_hid
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            sched.step()
            if step == 1 or step % settings.log_every == 0 or step == settings.steps:
                row = {"step": step, "seconds": round(time.perf_counter() - t0, 2),
                       "loss": float(loss.detach()), "output": float(l_out.detach())}
                if l_ce is not None:
                    row["labels"] = float(l_ce.detach())
                if l_qkv is not None:
                    row["qkv"], row["hidden"] = float(l_qkv.detach()), float(l_hid.detach())
                if on_log is not None:
                    t_eval = time.perf_counter()
                    row.update(on_log(step))
                    student.eval()
                    t0 += time.perf_counter() - t_eval  # evaluation is not training time
                history.append(row)
                if progress is not None:
                    msg = f"distill step {step}/{settings.steps} loss {row['loss']:.4f}"
                    progress(step / settings.steps, msg)
            if settings.max_seconds is not None and time.perf_counter() - t0 > settings.max_seconds:
                stopped = step < settings.steps
                break
    finally:
        s_rec.remove()
        t_rec.remove()
    student.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return DistillResult(steps=step, seconds=round(time.perf_counter() - t0, 2),
                         device=str(device), history=history, stopped_early=stopped)
