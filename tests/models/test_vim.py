"""Vision Mamba: official state-dict layout, scan implementations, an independent oracle, gaps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.models.vim import (
    VIM_CONFIGS,
    BiMambaMixer,
    TokenState,
    VimConfig,
    VisionMamba,
    create_vim,
    selective_scan,
)

TINY = VimConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, d_state=4,
                 num_classes=5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "A_log" in name or "A_b_log" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_vim_tiny_matches_official_state_dict():
    sd = create_vim("vim_tiny").state_dict()
    assert len(sd) == 415
    assert sum(v.numel() for v in sd.values()) == 7_148_008
    expected_shapes = {
        "patch_embed.proj.weight": (192, 3, 16, 16), "cls_token": (1, 1, 192),
        "pos_embed": (1, 197, 192), "head.weight": (1000, 192), "norm_f.weight": (192,),
        "layers.23.norm.weight": (192,), "layers.0.mixer.in_proj.weight": (768, 192),
        "layers.0.mixer.A_log": (384, 16), "layers.0.mixer.A_b_log": (384, 16),
        "layers.0.mixer.D_b": (384,), "layers.0.mixer.conv1d_b.weight": (384, 1, 4),
        "layers.0.mixer.x_proj_b.weight": (44, 384), "layers.0.mixer.dt_proj_b.weight": (384, 12),
        "layers.0.mixer.dt_proj_b.bias": (384,), "layers.0.mixer.out_proj.weight": (192, 384),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    per_layer = {k.split(".", 2)[2] for k in sd if k.startswith("layers.0.")}
    assert len(per_layer) == 17
    assert not any(k.endswith("in_proj.bias") or k.endswith("out_proj.bias") for k in sd)


def test_vim_small_size():
    sd = create_vim("vim_small").state_dict()
    assert len(sd) == 415
    assert sd["layers.0.mixer.in_proj.weight"].shape == (1536, 384)
    assert VIM_CONFIGS["vim_small"].resolved_dt_rank == 24


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="scan must be one of"):
        VimConfig(scan="chunked")
    with pytest.raises(ValueError, match="not a multiple"):
        VimConfig(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="unknown Vim config"):
        create_vim("vim_huge")


def _scan_inputs(b=2, d=6, n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(b, d, length, generator=g),
                "delta": torch.randn(b, d, length, generator=g),
                "A": -torch.rand(d, n, generator=g) - 0.1,
                "B": torch.randn(b, n, length, generator=g),
                "C": torch.randn(b, n, length, generator=g),
                "D": torch.randn(d, generator=g),
                "z": torch.randn(b, d, length, generator=g),
                "delta_bias": torch.randn(d, generator=g)}


def _reference_scan(u, delta, A, B, C, D, z, delta_bias):
    """mamba_ssm's selective_scan_ref, written out step by step."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    b, d, length = u.shape
    h = torch.zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + \
            delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, -1) + u * D[None, :, None]
    return y * F.silu(z)


def test_selective_scan_loop_and_scan_match_reference():
    inputs = _scan_inputs()
    ref = _reference_scan(**inputs)
    loop = selective_scan(**inputs, impl="loop")
    hop = selective_scan(**inputs, impl="scan")
    assert _rel(loop, ref) < 1e-5
    assert _rel(hop, ref) < 1e-5
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(**inputs, impl="chunked")


def test_gap_delta_equals_explicit_pruned_steps():
    # A pruned token is a step with no input whose delta is the bias alone: running those steps
    # explicitly must equal one longer decay per kept token (both scan directions).
    torch.manual_seed(0)
    d, n, full_len = 6, 4, 11
    kept = torch.tensor([0, 1, 4, 5, 6, 9])          # pruned: 2, 3 | 7, 8 | 10 (trailing)
    gap = torch.tensor([[0., 0., 2., 0., 0., 2.]])  # pruned tokens just before each kept one
    mixer = BiMambaMixer(d_model=3, d_state=n, expand=2)
    _randomize(mixer, seed=1)
    full = _scan_inputs(b=1, d=d, n=n, length=full_len, seed=2)
    gap_f, gap_b = mixer.gap_deltas(gap)
    for direction, bias, gap_delta in (("fwd", mixer.dt_proj.bias, gap_f),
                                       ("bwd", mixer.dt_proj_b.bias, gap_b)):
        seq = {k: v.clone() for k, v in full.items()}
        seq["delta_bias"] = torch.zeros(d)
        pruned = torch.ones(full_len, dtype=torch.bool)
        pruned[kept] = False
        seq["u"][..., pruned] = 0.0
        seq["delta"][..., pruned] = bias.detach()[None, :, None]
        if direction == "bwd":
            seq = {k: v.flip(-1) if v.dim() == 3 else v for k, v in seq.items()}
        explicit = selective_scan(**seq)
        if direction == "bwd":
            explicit = explicit.flip(-1)
        explicit = explicit[..., kept]
        short = {k: v[..., kept] if v.dim() == 3 else v for k, v in seq.items()} \
            if direction == "fwd" else \
            {k: v.flip(-1)[..., kept].flip(-1) if v.dim() == 3 else v for k, v in seq.items()}
        for impl in ("loop", "scan"):
            got = selective_scan(**short, gap_delta=gap_delta.detach(), impl=impl)
            if direction == "bwd":
                got = got.flip(-1)
            assert _rel(got, explicit) < 1e-5, (direction, impl)
        # and without the gap the pruned decay is missing: the outputs differ
        plain = selective_scan(**short)
        plain = plain.flip(-1) if direction == "bwd" else plain
        assert _rel(plain, explicit) > 1e-3


def _oracle_mixer(mixer: BiMambaMixer):
    """Two transformers MambaMixers (one per direction) tied to the same in/out projections."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = transformers.MambaConfig(hidden_size=mixer.d_model, state_size=mixer.d_state,
                                   intermediate_size=mixer.d_inner, conv_kernel=4,
                                   time_step_rank=mixer.dt_rank, use_bias=False,
                                   use_conv_bias=True, hidden_act="silu", use_mambapy=False)
    fwd, bwd = MambaMixer(cfg, layer_idx=0), MambaMixer(cfg, layer_idx=0)
    sd = mixer.state_dict()
    shared = {"in_proj.weight": sd["in_proj.weight"], "out_proj.weight": sd["out_proj.weight"]}
    fwd.load_state_dict({**shared, **{k: sd[k] for k in (
        "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "A_log", "D")}})
    bwd.load_state_dict({**shared, **{k: sd[f"{k.split('.')[0]}_b.{k.split('.')[1]}"] for k in (
        "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias")},
        "A_log": sd["A_b_log"], "D": sd["D_b"]})
    return lambda h: 0.5 * (fwd.slow_forward(h) + bwd.slow_forward(h.flip(1)).flip(1))


@pytest.mark.parametrize("scan", ["loop", "scan"])
def test_mixer_matches_transformers_oracle(scan):
    mixer = BiMambaMixer(d_model=8, d_state=4, expand=2, scan=scan)
    _randomize(mixer)
    oracle = _oracle_mixer(mixer)
    h = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = mixer(h)
        ref = oracle(h)
    assert ours.shape == (2, 7, 8)
    assert _rel(ours, ref) < 1e-5


def test_return_ssm_outputs_are_in_forward_order():
    mixer = BiMambaMixer(d_model=8, d_state=4)
    _randomize(mixer)
    h = torch.randn(1, 5, 8)
    with torch.no_grad():
        out, y_f, y_b = mixer(h, return_ssm=True)
        # the backward branch alone on the flipped sequence, flipped back
        xz = mixer.in_proj(h.flip(1)).transpose(1, 2)
        xb, zb = xz.chunk(2, dim=1)
        ref_b = mixer._branch(xb, zb, mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b,
                              mixer.A_b_log, mixer.D_b, None).flip(-1).transpose(1, 2)
    assert y_f.shape == y_b.shape == (1, 5, 16)
    assert torch.allclose(y_b, ref_b, atol=1e-6)
    assert torch.allclose(out, mixer.out_proj((y_f + y_b) / 2), atol=1e-6)


def test_middle_class_token_and_head():
    model = VisionMamba(TINY).eval()
    _randomize(model, seed=5)
    x = torch.randn(3, 1, 16, 16)
    assert model.cls_position == 8
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (3, 5)
    assert torch.allclose(logits, model.head(feats), atol=1e-6)
    # the class token sits at index 8 of 17: the first and the last patch both reach it
    # (one through the forward scan, the other through the backward scan)
    for rows, cols in ((slice(0, 4), slice(0, 4)), (slice(12, 16), slice(12, 16))):
        x2 = x.clone()
        x2[:, :, rows, cols] += 1.0
        with torch.no_grad():
            assert _rel(model(x2), logits) > 1e-6


def test_whole_model_scan_equals_loop():
    model = VisionMamba(TINY).eval()
    _randomize(model, seed=4)
    other = VisionMamba(VimConfig(**{**TINY.__dict__, "scan": "scan"})).eval()
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert _rel(other(x), model(x)) < 1e-5


class _DropLast(nn.Module):
    """A minimal pruner: after layer 0, drop the last patch token and record a trailing gap."""

    gap_mode = "gap_decay"

    def __init__(self):
        super().__init__()
        self.seen = []

    def wants(self, i: int) -> bool:
        return i == 0

    def forward(self, i, hidden, residual, ssm, tokens):
        self.seen.append((i, tuple(ssm[0].shape), tuple(ssm[1].shape)))
        keep = hidden.shape[1] - 1
        gap = torch.zeros(hidden.shape[0], keep)
        return hidden[:, :keep], residual[:, :keep], TokenState(
            tokens.cls_index, tokens.positions[:, :keep], gap)


def test_token_pruner_hook():
    model = VisionMamba(TINY).eval()
    _randomize(model, seed=6)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        full = model(x)
        model.token_pruner = _DropLast()
        pruned = model(x)
    assert model.token_pruner.seen == [(0, (2, 17, 32), (2, 17, 32))]
    assert pruned.shape == full.shape
    assert _rel(pruned, full) > 1e-6
    # the hook keeps the checkpoint layout unchanged
    assert set(model.state_dict()) == set(VisionMamba(TINY).state_dict())
