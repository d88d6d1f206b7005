import numpy as np
import pytest
import torch

from compress import compress
from compress.context import PassContext, PassReport
from compress.data import Dataset
from compress.errors import RecipeError
from compress.models.handle import ModelHandle
from compress.passes.token_reduction import (
    AutoSchedule,
    EvitConfig,
    TomeConfig,
    evit,
    tome,
)
from compress.recipe import parse_recipe
from tests.helpers import make_tiny_vit, tiny_vit_recipe


def _handle():
    return ModelHandle(task="image-classification", source="timm", name="test_vit",
                       module=make_tiny_vit(), data_config={"input_size": (3, 32, 32)})


def _ctx(tmp_path, n=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    ds = Dataset({"pixel_values": x})
    return PassContext(index=0, calib=ds, device=torch.device("cpu"), workdir=tmp_path,
                       out_dir=tmp_path, report=PassReport(0, "tome"), batch_size=32)


def _agreement(h, ref_module, x):
    with torch.no_grad():
        return (h.module(x).argmax(-1) == ref_module(x).argmax(-1)).float().mean().item()


@pytest.mark.parametrize("config_cls, fn", [(TomeConfig, tome), (EvitConfig, evit)])
def test_auto_schedule_meets_fidelity_bound(tmp_path, config_cls, fn):
    h, ctx = _handle(), _ctx(tmp_path)
    ref = make_tiny_vit()
    fn(h, config_cls(auto=AutoSchedule(max_accuracy_drop=10.0)), ctx)
    s = ctx.report.summary
    assert s["auto_trials"] and s["estimated_speedup"] > 1.05   # it did reduce tokens
    # The bound holds on the calibration set it was searched on (no labels: agreement).
    assert 100 * (1 - _agreement(h, ref, ctx.calib.inputs["pixel_values"])) <= 10.0


def test_auto_schedule_meets_speedup_target(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    tome(h, TomeConfig(auto=AutoSchedule(speedup=1.6)), ctx)
    s = ctx.report.summary
    assert s["estimated_speedup"] >= 1.6
    # The weakest r that reaches it: one less would not.
    assert s["r"] >= 1


def test_bad_config_names_the_field(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    with pytest.raises(RecipeError) as e:
        tome(h, TomeConfig(r=[1, 2]), ctx)
    assert "passes.0.r" in str(e.value)
    with pytest.raises(RecipeError) as e:
        evit(h, EvitConfig(locations=[9]), ctx)
    assert "passes.0.locations" in str(e.value)
    with pytest.raises(RecipeError) as e:
        tome(h, TomeConfig(auto=AutoSchedule(min_cosine=0.9)), ctx)
    assert "passes.0.auto.min_cosine" in str(e.value)
    with pytest.raises(RecipeError):
        parse_recipe(tiny_vit_recipe({"weights": "w", "calib": "c", "eval": "e"},
                                     passes=[{"type": "tome", "r": -1}]))


@pytest.mark.slow
def test_tome_then_quantize_in_one_recipe(tmp_path, tiny_vit_files):
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[{"type": "tome", "r": 2},
                                                     {"type": "quantize"}])
    r = compress(parse_recipe(recipe), out_dir=tmp_path / "out").report
    assert r["passes"][0]["summary"]["tokens_per_block"] == [17, 15, 13, 11, 9, 7, 1]
    assert r["export"]["op_histogram"]["QuantizeLinear"] >= 24
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])   # ORT at batch 1, 3, eval
    assert r["metrics"]["compressed"]["top1_agreement"] >= 0.75


@pytest.mark.slow
def test_digits_vit_tome_done_when(digits_reference, tmp_path):
    """Bundled recipe: estimated >= 1.5x with <= 0.5 points lost (speed measured in bench/)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "digits_vit_tome.yaml"
    r = compress(recipe, out_dir=tmp_path / "out",
                 overrides=["evaluation.latency.enabled=false"]).report
    assert r["passes"][0]["summary"]["estimated_speedup"] >= 1.5
    m = r["metrics"]
    assert 100 * (m["original"]["top1"] - m["compressed"]["top1"]) <= 0.5


@pytest.mark.slow
def test_minilm_token_prune_keeps_cosine(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "minilm_token_prune.yaml"
    r = compress(recipe, out_dir=tmp_path / "out",
                 overrides=["evaluation.latency.enabled=false"]).report
    assert r["passes"][0]["summary"]["estimated_speedup"] >= 1.3
    assert r["metrics"]["compressed"]["cosine_mean"] >= 0.98
    assert all(p["cosine"] > 0.999 for p in r["export"]["parity"])
    assert np.isfinite(r["metrics"]["compressed"]["cosine_min"])


def test_evit_report_pictures_kept_patches(tmp_path):
    from compress.tokens.pictures import kept_patch_masks

    h, ctx = _handle(), _ctx(tmp_path, n=8)
    evit(h, EvitConfig(keep_rate=0.6, locations=[1, 3], plot_images=2), ctx)
    assert (tmp_path / ctx.report.plots[0]["file"]).stat().st_size > 1000
    assert ctx.report.summary["tokens_per_block"] == [17, 17, 12, 12, 9, 9, 1]
    masks, scores = kept_patch_masks(h.module, ctx.calib.inputs["pixel_values"][:3])
    # Stage 1 keeps ceil(0.6*16) = 10 patches; stage 2 keeps 7 of 11 tokens (10 + fused).
    assert masks[0].sum(1).tolist() == [10] * 3
    assert all(6 <= v <= 7 for v in masks[1].sum(1).tolist())
    assert not (masks[1] & ~masks[0]).any()                 # a dropped patch never returns
    # The kept patches are the ones with the highest class attention.
    kept_min = scores.masked_fill(~masks[0], float("inf")).min(1).values
    dropped_max = scores.masked_fill(masks[0], float("-inf")).max(1).values
    assert (kept_min >= dropped_max).all()
