"""IA-RED²'s interpretable token pruning as plain tensor functions and one small module.

An interpreter (``PerBlockAgent``) scores every token by how much the class token's query
matches its key: ``p_i = mean_heads sigmoid(q_CLS · k_i / sqrt(d))`` in [0, 1], a score that
can be shown as a heat map. Keep decisions ``u`` are Bernoulli(p) samples while training and
``p > threshold`` at inference; class/prefix tokens are always kept and a token dropped by one
group stays dropped (``u^(g) = u^(g) * u^(g-1)``). The interpreters learn by REINFORCE with the
backbone frozen: a sample earns ``1 - (kept/N)^2`` when the pruned model's top-1 is still right
and ``error_penalty`` when it is not. Paper: https://arxiv.org/abs/2106.12620.

Shapes: tokens [B, N, C], scores / masks [B, N] (prefix tokens first).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROB_EPS = 1e-6  # keeps log(p) and log(1 - p) finite for saturated interpreters


class PerBlockAgent(nn.Module):
    """Token importance from the class token's query against every token's key.

    ``x * u_prev`` (dropped tokens zeroed) -> LayerNorm without affine -> linear q (class token
    only) and k (every token), ``heads`` heads of ``head_dim`` -> per-head sigmoid of the scaled
    dot product, averaged over heads -> multiplied by ``u_prev`` so dropped tokens score 0.
    Prefix tokens score 1.
    """

    def __init__(self, dim: int, heads: int = 2, head_dim: int = 16, init_keep: float = 0.9):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, heads * head_dim)
        nn.init.normal_(self.q.weight, std=0.02)
        nn.init.normal_(self.k.weight, std=0.02)
        # Equal q and k biases c make q·k/sqrt(d) start near c²·sqrt(d) for every token: the
        # interpreter starts by keeping (almost) all tokens, i.e. from the unpruned model, and
        # learns to drop. logit(init_keep) = c² sqrt(d).
        c = math.sqrt(max(math.log(init_keep / (1 - init_keep)), 0.0) / math.sqrt(head_dim))
        nn.init.constant_(self.q.bias, c)
        nn.init.constant_(self.k.bias, c)

    def forward(self, x: torch.Tensor, u_prev: torch.Tensor | None = None,
                protected: int = 1) -> torch.Tensor:
        """``x`` [B, N, C], ``u_prev`` [B, N] (1 = still present) -> importance ``p`` [B, N]."""
        if u_prev is not None:
            x = x * u_prev[..., None].to(x.dtype)
        h = self.norm(x)
        B, N, _ = h.shape
        q = self.q(h[:, :1]).reshape(B, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1))[:, :, 0] / math.sqrt(self.head_dim)  # [B, heads, N]
        p = logits.sigmoid().mean(dim=1)
        if u_prev is not None:
            p = p * u_prev.to(p.dtype)
        return keep_prefix(p, protected)


def keep_prefix(m: torch.Tensor, protected: int) -> torch.Tensor:
    """``m`` [B, N] with the first ``protected`` entries set to 1 (never dropped)."""
    if protected == 0:
        return m
    return torch.cat([torch.ones_like(m[:, :protected]), m[:, protected:]], dim=1)


def keep_decisions(p: torch.Tensor, u_prev: torch.Tensor | None, protected: int,
                   threshold: float = 0.5, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Hierarchical keep mask [B, N] (float 0/1): Bernoulli(p) when ``sample``, else
    ``p > threshold``; prefix tokens kept, tokens dropped earlier (``u_prev`` 0) stay dropped."""
    if sample:
        u = torch.bernoulli(p.detach(), generator=generator)
    else:
        u = (p > threshold).to(p.dtype)
    if u_prev is not None:
        u = u * u_prev.to(u.dtype)
    return keep_prefix(u, protected)


def keep_log_prob(p: torch.Tensor, u: torch.Tensor, alive: torch.Tensor | None,
                  protected: int) -> torch.Tensor:
    """log π(u | p) [B]: Bernoulli log-likelihood over the non-prefix tokens still ``alive``."""
    p = p[:, protected:].clamp(PROB_EPS, 1 - PROB_EPS)
    u = u[:, protected:].to(p.dtype)
    ll = u * p.log() + (1 - u) * (1 - p).log()
    if alive is not None:
        ll = ll * alive[:, protected:].to(ll.dtype)
    return ll.sum(dim=-1)


def group_benefits(locations: list[int], depth: int) -> torch.Tensor:
    """Weight of each group's saving: the fraction of blocks that run after its interpreter
    (a token dropped before block ``l`` saves ``depth - l`` blocks)."""
    return torch.tensor([(depth - loc) / depth for loc in locations])


def group_rewards(kept_fraction: torch.Tensor, correct: torch.Tensor, benefits: torch.Tensor,
                  error_penalty: float = -1.0, target: float | None = None) -> torch.Tensor:
    """Per-sample, per-group reward [S, G].

    ``kept_fraction`` [S, G] (patch tokens kept after each group / patch tokens), ``correct``
    [S] bool. Right answers earn ``benefit_g * (1 - kept_g²)``: fewer tokens pay more, and more
    so early in the network; wrong answers earn ``error_penalty`` in every group. With a
    ``target`` keep fraction, keeping less than it earns no more than keeping exactly it (the
    fraction is measured above the target: ``(kept - target) / (1 - target)``, floored at 0).
    """
    if target is not None:
        kept_fraction = ((kept_fraction - target) / (1 - target)).clamp_min(0)
    efficiency = benefits.to(kept_fraction) * (1 - kept_fraction ** 2)
    wrong = torch.full_like(efficiency, float(error_penalty))
    return torch.where(correct[:, None], efficiency, wrong)


def leave_one_out_baseline(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """Baseline [S, G] for rewards [S, G] laid out as ``samples`` draws per image
    (row ``j * B + i`` = draw j of image i): the mean reward of the image's other draws
    (unbiased; with one draw, the batch mean)."""
    if samples < 2:
        return rewards.mean(dim=0, keepdim=True).expand_as(rewards)
    r = rewards.reshape(samples, -1, rewards.shape[-1])
    return ((r.sum(0, keepdim=True) - r) / (samples - 1)).reshape_as(rewards)


def reinforce_loss(log_probs: torch.Tensor, rewards: torch.Tensor,
                   baseline: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate: minus the advantage-weighted log-likelihood of the decisions.

    ``log_probs`` [S, G] (group g's interpreter only), ``rewards`` and ``baseline`` [S, G].
    """
    advantage = (rewards - baseline).detach()
    return -(advantage * log_probs).sum(dim=1).mean()


def count_keep(u: torch.Tensor):
    """Tokens to keep for the whole batch: the largest per-sample count (integer ops only).

    Returned as a Python/Sym int (``.item()``); under torch.export it is a data-dependent size
    (ONNX ReduceSum -> ReduceMax on the data), bounded here so shape checks can be decided. At
    least one token is kept (a masked one if a sample drops all): with k = 0 the token count
    could be 1, and broadcasting checks on a size that may be 1 cannot be traced.
    """
    n = u.shape[1]
    k = (u > 0).sum(dim=1).amax(dim=0).clamp_min(1).item()
    torch._check(k >= 1)
    torch._check(k <= n)
    return k


def gather_kept(x: torch.Tensor, u: torch.Tensor, p: torch.Tensor, protected: int):
    """Keep the prefix and, in original order, the ``count_keep`` tokens the batch needs.

    Every sample's kept tokens (``u`` = 1) come first in the ranking ``2u + p``, so a sample
    keeping fewer tokens than the batch maximum also carries a few of its dropped ones; they
    come back with ``u`` 0 and stay masked out. Returns ``(x, u)`` gathered.
    """
    from .prune import topk_keep

    k = count_keep(u[:, protected:])
    score = 2 * u[:, protected:] + p[:, protected:].detach()
    x, _, idx, u_kept = topk_keep(x, score, k, protected, fuse=False, extra=[u[..., None]])
    return x, u_kept[..., 0], idx


def attention_mask(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive key mask [B, 1, 1, N]: 0 for kept tokens, a large negative for dropped ones
    (finite: a query row never sees only masked keys, the class token is always kept)."""
    return ((u.to(dtype) - 1) * 1e4)[:, None, None, :]
