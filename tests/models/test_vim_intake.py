"""Vision Mamba intake: recipe model spec, safe checkpoint reading, strict loading, model kind."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from pydantic import ValidationError

from compress.errors import ModelLoadError, UnsupportedModelError
from compress.models import load_model
from compress.models.kind import model_kind, require
from compress.models.loaders import read_state_dict
from compress.models.vim import VimConfig, VisionMamba
from compress.specs import ModelSpec

SIZES = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 2,
         "d_state": 4, "num_classes": 5}


def _tiny_vim(seed: int = 0) -> VisionMamba:
    torch.manual_seed(seed)
    return VisionMamba(VimConfig(**SIZES)).eval()


def _spec(path=None, **extra) -> ModelSpec:
    return ModelSpec(source="vim", vim=SIZES, weights=str(path) if path else None, **extra)


def test_spec_accepts_named_and_custom_sizes():
    assert ModelSpec(source="vim", name="vim_tiny").file_field == "weights"
    spec = ModelSpec(source="vim", name="vim_small", vim={"num_classes": 10, "scan": "scan"})
    assert spec.vim.overrides() == {"num_classes": 10, "scan": "scan"}


@pytest.mark.parametrize("fields,message", [
    ({"name": "vim_huge"}, "takes name vim_tiny or vim_small"),
    ({}, "needs 'name'"),
    ({"name": "vim_tiny", "path": "x.onnx"}, "'path' and 'kwargs' are for other sources"),
    ({"name": "vim_tiny", "vim": {"depth": 100000}}, "less than or equal to 256"),
    ({"name": "vim_tiny", "vim": {"scan": "chunked"}}, "'loop' or 'scan'"),
    ({"name": "vim_tiny", "vim": {"checkpoint_path": "/etc/passwd"}}, "Extra inputs"),
])
def test_spec_refuses_bad_vim_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(source="vim", **fields)


def test_vim_section_is_only_for_source_vim():
    with pytest.raises(ValidationError, match="'vim' .* is for source 'vim'"):
        ModelSpec(source="timm", name="test_vit", weights="w.pt", vim={"depth": 2})


def test_loads_safetensors_and_pt_exactly(tmp_path):
    from safetensors.torch import save_file

    ref = _tiny_vim()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(tmp_path / "m.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    x = torch.randn(2, 1, 16, 16)
    for name in ("m.safetensors", "m.pth"):
        h = load_model(_spec(tmp_path / name), tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(h.module(x), ref(x))
        assert h.source == "vim" and h.input_size == (1, 16, 16)
        assert h.data_config["interpolation"] == "bicubic"
        assert h.info["load_notes"] == []


def test_deit_style_checkpoint_with_argparse_args_is_unwrapped(tmp_path):
    # hustvl/Vim's main.py saves {'model', 'optimizer', ..., 'args': argparse.Namespace}:
    # plain weights_only loading refuses the Namespace.
    ref = _tiny_vim()
    ckpt = {"model": ref.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
            "epoch": 299, "args": argparse.Namespace(model="vim_tiny", lr=5e-4, drop_path=0.05)}
    torch.save(ckpt, tmp_path / "vim_t_midclstok_76p1acc.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "vim_t_midclstok_76p1acc.pth", weights_only=True)
    state = read_state_dict(tmp_path / "vim_t_midclstok_76p1acc.pth")
    assert set(state) == set(ref.state_dict())
    h = load_model(_spec(tmp_path / "vim_t_midclstok_76p1acc.pth"),
                   tmp_path / "vim_t_midclstok_76p1acc.pth")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(h.module(x), ref(x))


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled freely",))


def test_checkpoint_with_other_objects_is_refused_without_running_them(tmp_path, capsys):
    buf = io.BytesIO()
    torch.save({"model": _tiny_vim().state_dict(), "args": _RunsCode()}, buf)
    (tmp_path / "evil.pth").write_bytes(buf.getvalue())
    with pytest.raises(ModelLoadError, match="'evil.pth'.*not plain tensors"):
        read_state_dict(tmp_path / "evil.pth")
    assert "unpickled freely" not in capsys.readouterr().out


def test_one_directional_mamba_checkpoint_is_named(tmp_path):
    state = {k: v for k, v in _tiny_vim().state_dict().items()
             if not any(p in k for p in ("A_b_log", "D_b", "conv1d_b", "x_proj_b", "dt_proj_b"))}
    torch.save(state, tmp_path / "uni.pth")
    with pytest.raises(ModelLoadError, match="one-directional Mamba checkpoint") as e:
        load_model(_spec(tmp_path / "uni.pth"), tmp_path / "uni.pth")
    assert "A_b_log" in str(e.value) and "14 keys" in str(e.value)


def test_wrong_size_names_keys_and_the_vim_fields(tmp_path):
    torch.save(_tiny_vim().state_dict(), tmp_path / "m.pth")
    spec = ModelSpec(source="vim", vim={**SIZES, "num_classes": 7}, weights="m.pth")
    with pytest.raises(ModelLoadError, match=r"mis-shaped keys: head.weight .*model.vim"):
        load_model(spec, tmp_path / "m.pth")
    state = _tiny_vim().state_dict()
    state.pop("layers.1.norm.weight")
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ModelLoadError, match=r"missing keys: layers.1.norm.weight"):
        load_model(_spec(tmp_path / "short.pth"), tmp_path / "short.pth")


def test_no_weights_gives_seeded_random_model_with_a_note():
    a = load_model(_spec(), None)
    b = load_model(_spec(), None)
    assert "seeded random" in a.info["load_notes"][0]
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a.module(x), b.module(x))


def test_preprocess_cannot_change_the_input_size():
    with pytest.raises(ModelLoadError, match="does not match the Vim's input"):
        load_model(_spec(preprocess={"input_size": [1, 32, 32]}), None)


def test_vim_kind_and_passes_that_refuse_it():
    kind = model_kind(load_model(_spec(), None))
    assert kind.kind == "vim" and kind.depth == 2 and "middle_class_token" in kind.features
    require(kind, "top_vim")
    require(kind, "quantize")
    for token_pass in ("tome", "evit"):
        with pytest.raises(UnsupportedModelError) as e:
            require(kind, token_pass, ("plain_vit",), needs_runner=True)
        text = str(e.value)
        assert "top_vim" in text and "quantize" in text and "weight_only" in text
        assert "Vision Mamba" not in text.split("This model is")[0]
