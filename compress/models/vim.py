"""Vision Mamba (Vim) in plain torch, with the official parameter names.

The official model (hustvl/Vim ``vim/models_mamba.py`` over a patched ``mamba_ssm``) needs CUDA
extensions to import, and its non-fused path ignores every backward-direction parameter while
still loading the checkpoint strictly. This file is a from-scratch port of the fused
("bimamba v2", ``if_devide_out``) path that Vim-tiny/small were trained and evaluated with:

    patch_embed.proj (Conv2d) -> class token inserted in the MIDDLE of the patch sequence
    -> + pos_embed -> depth x Block (add -> RMSNorm -> BiMambaMixer) -> add -> norm_f
    -> head on the class token

``BiMambaMixer`` shares ``in_proj``/``out_proj`` between two directions; each direction has its
own causal depthwise ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D`` (the backward twins end
in ``_b``; ``A_b_log``), and the output is ``out_proj((y_f + flip(y_b)) / 2)``. The state dict
of ``VIM_CONFIGS["vim_tiny"]`` matches the released checkpoint key for key (415 keys,
7,148,008 parameters; tests/models/test_vim.py).

Token pruning (ToP-ViM, compress.tokens.top_vim) hooks in through ``VisionMamba.token_pruner``:
before a layer the pruner says whether it ``wants(i)`` the SSM outputs of that layer, and after
it returns the kept hidden states, residual and a ``TokenState`` (original positions, gaps).
``gap`` + ``gap_mode="gap_decay"`` decays the state across pruned gaps: our reconstruction of
the unreleased "pruning-aware hidden state alignment", see ``selective_scan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

SCAN_IMPLS = ("loop", "scan")


@dataclass(frozen=True)
class VimConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None      # None -> ceil(embed_dim / 16), as in mamba_ssm
    num_classes: int = 1000
    eps: float = 1e-5
    scan: str = "loop"              # "loop": eager Python loop; "scan": torch HOP scan
    drop_path_rate: float = 0.0     # training only (the digits reference); 0 at inference

    def __post_init__(self):
        if self.scan not in SCAN_IMPLS:
            raise ValueError(f"scan must be one of {SCAN_IMPLS}, got {self.scan!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


VIM_CONFIGS = {
    # vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
    "vim_tiny": VimConfig(),
    # vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
    "vim_small": VimConfig(embed_dim=384),
}


# --------------------------------------------------------------------------- selective scan


def _discretize(u, delta, A, B, delta_bias, delta_softplus, gap_delta):
    """Per-step decay ``exp((Δ + gap) A)`` and input ``Δ B u``, both (l, b, d, n): the scan
    walks the first axis, so every step reads contiguous memory."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay_steps = delta if gap_delta is None else delta + gap_delta.float()
    A = A.float()[None, None]
    dA = torch.exp(decay_steps.permute(2, 0, 1).unsqueeze(-1) * A)
    dBu = (delta * u.float()).permute(2, 0, 1).unsqueeze(-1) * \
        B.float().permute(2, 0, 1).unsqueeze(2)
    return dA, dBu


def _scan_loop(dA, dBu):
    """States h_t (l, b, d, n) of h_t = dA_t h_{t-1} + dBu_t; dA, dBu given as (l, b, d, n)."""
    h = torch.zeros_like(dBu[0])
    states = []
    # One fused multiply-add per step on contiguous slices (unbind once: indexing per step
    # would backpropagate into a zero-filled copy of the whole tensor at every step).
    for dA_t, dBu_t in zip(dA.unbind(0), dBu.unbind(0), strict=True):
        h = torch.addcmul(dBu_t, dA_t, h)
        states.append(h)
    return torch.stack(states)


class _LoopScanFn(torch.autograd.Function):
    """``_scan_loop`` with a hand-written backward, for training.

    The gradient of a linear recurrence is the same recurrence run backwards: with g_t the
    gradient reaching h_t, g_t = grad_t + dA_{t+1} g_{t+1}; then dL/d dBu_t = g_t and
    dL/d dA_t = g_t h_{t-1}. One multiply-add per step each way, instead of autograd's
    bookkeeping around every step (about 3x faster on CPU for the digits reference).
    """

    @staticmethod
    def forward(ctx, dA, dBu):
        with torch.no_grad():
            states = _scan_loop(dA, dBu)
        ctx.save_for_backward(dA, states)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        dA, states = ctx.saved_tensors
        # g_t = grad_t + dA_{t+1} g_{t+1}: a forward scan over the reversed sequence.
        shifted = torch.cat([dA[1:], torch.zeros_like(dA[:1])]).flip(0)
        g = _scan_loop(shifted, grad_states.flip(0)).flip(0)
        prev = torch.cat([torch.zeros_like(states[:1]), states[:-1]])
        return g * prev, g


def _scan_step(h, xs):
    dA_t, dBu_t = xs
    h = torch.addcmul(dBu_t, dA_t, h)
    return h, h.clone()


def _scan_hop(dA, dBu):
    from torch._higher_order_ops import scan

    _, states = scan(_scan_step, torch.zeros_like(dBu[0]), (dA, dBu))
    return states


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   gap_delta=None, impl="loop"):
    """Mamba-1 selective scan, ``mamba_ssm``'s ``selective_scan_ref`` without its variants.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,); gap_delta: (b, d, l) or None.

        Δ_t = softplus(delta_t + delta_bias)
        h_t = exp((Δ_t + gap_delta_t) A) h_{t-1} + Δ_t B_t u_t,   h_0 = 0
        y_t = C_t h_t + D u_t,   y *= silu(z)

    ``gap_delta`` lengthens only the state's decay, never the input term: it stands for the
    pruned tokens before step t, whose decay the state would have gone through (None is the
    official math). ``impl``: "loop" (eager Python loop; unrolled by ONNX export) or "scan"
    (``torch._higher_order_ops.scan``, one ONNX ``Scan`` node; inference only, training
    runs the loop with its own backward).
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"impl must be one of {SCAN_IMPLS}, got {impl!r}")
    dtype = u.dtype
    dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus, gap_delta)
    grad = torch.is_grad_enabled() and (dA.requires_grad or dBu.requires_grad)
    if impl == "scan" and not grad:
        states = _scan_hop(dA, dBu)                               # (l, b, d, n)
    elif grad:
        states = _LoopScanFn.apply(dA, dBu)
    else:
        states = _scan_loop(dA, dBu)
    y = torch.einsum("lbdn,bnl->bdl", states, C.float())
    if D is not None:
        y = y + u.float() * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# --------------------------------------------------------------------------- modules


@dataclass
class TokenState:
    """Which tokens the sequence holds after pruning.

    ``cls_index``: where the class token is (a Python int: static for tracing and export);
    ``positions``: (b, l) original positions, class token included; ``gap``: (b, l) number of
    pruned tokens immediately before each kept token in forward order (None: nothing pruned).
    """

    cls_index: int
    positions: torch.Tensor
    gap: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """RMSNorm with a weight (``mamba_ssm.ops.triton.layer_norm.RMSNorm``).

    ``bias`` is None as in the official module (no checkpoint key); smooth_quant sets it
    when it folds a per-channel shift into the norm, as it does into a LayerNorm's bias.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)  # as timm's PatchEmbed
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer (``bimamba_type="v2"``, ``if_devide_out=True``)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, scan: str = "loop"):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.scan = scan
        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # Parameter order follows mamba_simple.Mamba, so state_dict() lists keys as released.
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner,
                                                      padding=d_conv - 1, bias=True))
            setattr(self, f"x_proj{suffix}",
                    nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, d_inner, bias=True))
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D_b = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _branch(self, x, z, conv1d, x_proj, dt_proj, A_log, D, gap_delta):
        """One direction: x, z (b, d_inner, l) in that direction's scan order."""
        length = x.shape[-1]
        x = F.silu(conv1d(x)[..., :length])
        x_dbl = x_proj(x.transpose(1, 2))                       # (b, l, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj runs as a module, bias included (the kernel adds the bias inside the scan;
        # same sum, and quantization passes can then swap dt_proj like any Linear).
        delta = dt_proj(dt).transpose(1, 2)                     # (b, d_inner, l)
        A = -torch.exp(A_log.float())
        # The scan operator is for the exported graph: in eager torch it compiles itself on
        # every new shape and runs slower than the loop, with the same result.
        impl = self.scan if torch.compiler.is_compiling() else "loop"
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D.float(),
                              z=z, delta_softplus=True, gap_delta=gap_delta, impl=impl)

    def gap_deltas(self, gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Extra decay steps (b, d_inner, l) of both directions, each in its own scan order.

        A pruned token's Δ is approximated by softplus(dt_proj.bias) (its input is gone, so
        dt_proj(x_proj(x)) is replaced by the bias alone). Forward: the gap before each token.
        Backward: the gap after each token in forward order, which the backward scan meets
        just before that token; flipped into backward order. The gap before the first token
        of either scan meets a zero state and changes nothing.
        """
        gap = gap.float()
        step_f = F.softplus(self.dt_proj.bias.float())[None, :, None]
        step_b = F.softplus(self.dt_proj_b.bias.float())[None, :, None]
        after = torch.cat([gap[:, 1:], torch.zeros_like(gap[:, :1])], dim=1)
        return gap[:, None, :] * step_f, after.flip(-1)[:, None, :] * step_b

    def forward(self, hidden_states: torch.Tensor, gap: torch.Tensor | None = None,
                gap_mode: str | None = None, return_ssm: bool = False):
        xz = self.in_proj(hidden_states).transpose(1, 2)        # (b, 2 d_inner, l)
        gap_f = gap_b = None
        if gap is not None and gap_mode == "gap_decay":
            gap_f, gap_b = self.gap_deltas(gap)
        x, z = xz.chunk(2, dim=1)
        y_f = self._branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D,
                           gap_f)
        xb, zb = xz.flip(-1).chunk(2, dim=1)
        y_b = self._branch(xb, zb, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                           self.D_b, gap_b).flip(-1)
        y_f, y_b = y_f.transpose(1, 2), y_b.transpose(1, 2)     # (b, l, d_inner), forward order
        out = self.out_proj((y_f + y_b) / 2)
        if return_ssm:
            return out, y_f, y_b
        return out


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, returning (hidden, residual) as mamba_ssm's Block does."""

    def __init__(self, dim: int, cfg: VimConfig, drop_path: float = 0.0):
        super().__init__()
        self.mixer = BiMambaMixer(dim, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank,
                                  scan=cfg.scan)
        self.norm = RMSNorm(dim, eps=cfg.eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states, residual=None, gap=None, gap_mode=None, return_ssm=False):
        residual = hidden_states if residual is None else residual + \
            self.drop_path(hidden_states)
        out = self.mixer(self.norm(residual), gap=gap, gap_mode=gap_mode, return_ssm=return_ssm)
        if return_ssm:
            hidden, y_f, y_b = out
            return hidden, residual, (y_f, y_b)
        return out, residual


class VisionMamba(nn.Module):
    """Vim with a middle class token; ``forward(pixel_values) -> logits``."""

    def __init__(self, cfg: VimConfig | None = None, **overrides):
        super().__init__()
        cfg = replace(cfg or VimConfig(), **overrides)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layers = nn.ModuleList(Block(cfg.embed_dim, cfg, r) for r in rates)
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 \
            else nn.Identity()
        self.token_pruner: nn.Module | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        """Official Vim initialization, used only for training: trunc-normal position
        embedding, class token and head, lecun-normal patch embedding, PyTorch's default for
        the mixer's projections, dt bias from the inverse softplus of dt in [1e-3, 1e-1],
        out_proj rescaled by 1/sqrt(depth) (mamba_ssm's prenorm-residual rule)."""
        g = self.cfg
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        proj = self.patch_embed.proj
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / proj.weight[0].numel()))
        nn.init.zeros_(proj.bias)
        for layer in self.layers:
            mixer = layer.mixer
            for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
                std = mixer.dt_rank ** -0.5
                nn.init.uniform_(dt_proj.weight, -std, std)
                dt = torch.exp(torch.rand(mixer.d_inner) * (math.log(0.1) - math.log(1e-3))
                               + math.log(1e-3)).clamp(min=1e-4)
                with torch.no_grad():
                    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                mixer.out_proj.weight /= math.sqrt(g.depth)

    @property
    def cls_position(self) -> int:
        return self.patch_embed.num_patches // 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b, m, _ = x.shape
        pos = m // 2
        x = torch.cat([x[:, :pos], self.cls_token.expand(b, -1, -1), x[:, pos:]], dim=1)
        x = x + self.pos_embed
        positions = torch.arange(m + 1, device=x.device).unsqueeze(0).expand(b, -1)
        tokens = TokenState(cls_index=pos, positions=positions, gap=None)
        pruner = self.token_pruner
        gap_mode = getattr(pruner, "gap_mode", None) if pruner is not None else None
        hidden, residual = x, None
        for i, layer in enumerate(self.layers):
            want = pruner is not None and bool(pruner.wants(i))
            out = layer(hidden, residual, gap=tokens.gap, gap_mode=gap_mode, return_ssm=want)
            if want:
                hidden, residual, ssm = out
                hidden, residual, tokens = pruner(i, hidden, residual, ssm, tokens)
            else:
                hidden, residual = out
        hidden = self.norm_f(residual + hidden)
        return hidden[:, tokens.cls_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def create_vim(name: str | None = None, **overrides) -> VisionMamba:
    """``create_vim("vim_tiny")``, or a custom size from VimConfig fields."""
    if name is not None and name not in VIM_CONFIGS:
        raise ValueError(f"unknown Vim config {name!r}; known: {', '.join(VIM_CONFIGS)}")
    base = VIM_CONFIGS[name] if name else VimConfig()
    return VisionMamba(base, **overrides)


__all__ = ["VIM_CONFIGS", "BiMambaMixer", "Block", "RMSNorm", "TokenState", "VimConfig",
           "VisionMamba", "create_vim", "selective_scan"]
