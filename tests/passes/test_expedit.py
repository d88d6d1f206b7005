import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compress import compress
from compress.context import PassContext, PassReport
from compress.data import Dataset
from compress.errors import RecipeError, UnsupportedModelError
from compress.evaluate.metrics import task_metrics
from compress.models.handle import ModelHandle
from compress.passes.expedit import ExpeditConfig, expedit
from compress.passes.token_reduction import AutoSchedule
from compress.recipe import parse_recipe
from tests.helpers import tiny_vit_recipe

IMG = 64   # 8x8 patch grid with patch 8


def _token_map_vit(img=IMG):
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=img, patch_size=8, num_classes=0,
                             global_pool="", dynamic_img_size=True).eval()


def _handle(module=None):
    return ModelHandle(task="image-classification", source="timm", name="test_vit",
                       module=module or _token_map_vit(), data_config={"input_size": (3, IMG, IMG)},
                       token_map=True)


def _smooth_images(n, h=IMG, w=IMG, seed=1):
    """Images of 16x16-px colour blocks: neighbouring patches are alike, as in photos."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h // 16, w // 16, generator=g)
    return x.repeat_interleave(16, 2).repeat_interleave(16, 3)


def _ctx(tmp_path, n=16):
    ds = Dataset({"pixel_values": _smooth_images(n)})
    return PassContext(index=0, calib=ds, device=torch.device("cpu"), workdir=tmp_path,
                       out_dir=tmp_path, report=PassReport(0, "expedit"), batch_size=16)


def _fidelity(h, ref_module, x):
    with torch.no_grad():
        return task_metrics("image-classification", ref_module(x).numpy(), h.module(x).numpy(),
                            None)


def test_expedit_keeps_full_token_count_and_reports_reduction(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    expedit(h, ExpeditConfig(location=1, clusters=(4, 4), tau=1.0), ctx)
    with torch.no_grad():
        out = h.module(_smooth_images(2))
    assert out.shape == (2, 65, 64)                       # 1 + 8*8 tokens, as the original
    s = ctx.report.summary
    assert s["tokens_per_block"] == [65, 65, 17, 17, 17, 17]
    assert s["clusters"] == [4, 4] and s["grid"] == [8, 8]
    assert s["estimated_speedup"] > 1.5


def test_identity_config_reproduces_the_original(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    ref = _token_map_vit()
    expedit(h, ExpeditConfig(location=2, clusters=(8, 8), iters=0, top_k=1), ctx)
    x = _smooth_images(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(h.module(x), ref(x))


def test_fidelity_falls_with_aggressive_settings(tmp_path):
    x = _smooth_images(8, seed=2)
    ref = _token_map_vit()
    mild, harsh = _handle(), _handle()
    expedit(mild, ExpeditConfig(location=3, clusters=(4, 4), tau=1.0), _ctx(tmp_path))
    expedit(harsh, ExpeditConfig(location=0, clusters=(2, 2), tau=0.01), _ctx(tmp_path))
    m, a = _fidelity(mild, ref, x), _fidelity(harsh, ref, x)
    assert m["cosine_mean"] > 0.99 and m["cosine_min"] > 0.98 and m["rel_error"] < 0.1
    assert a["cosine_mean"] < 0.5 and a["rel_error"] > 0.5


def test_auto_meets_cosine_bound(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    ref = _token_map_vit()
    expedit(h, ExpeditConfig(tau=1.0, auto=AutoSchedule(min_cosine=0.995)), ctx)
    s = ctx.report.summary
    # 65 tokens of width 64: clustering overhead caps the gain near 1.16x on this tiny model.
    assert s["auto_trials"] and s["estimated_speedup"] > 1.05
    cos = _fidelity(h, ref, ctx.calib.inputs["pixel_values"])["cosine_mean"]
    assert cos >= 0.995


def test_bad_config_names_the_field(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    with pytest.raises(RecipeError) as e:
        expedit(h, ExpeditConfig(location=5, clusters=(4, 4)), ctx)
    assert "passes.0.location" in str(e.value) and "0..4" in str(e.value)
    with pytest.raises(RecipeError) as e:
        expedit(h, ExpeditConfig(location=1, clusters=(9, 4)), ctx)
    assert "passes.0.clusters" in str(e.value) and "8x8" in str(e.value)
    with pytest.raises(ValidationError, match="clusters or ratio"):
        ExpeditConfig(clusters=(4, 4), ratio=0.5)
    with pytest.raises(ValidationError, match="clusters"):
        ExpeditConfig()
    text = ModelHandle(task="text-embedding", source="hf", name="bert",
                       module=torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError,
                       match="passes.0: expedit supports plain-token ViTs.*text encoder"):
        expedit(text, ExpeditConfig(ratio=0.5), ctx)
    with pytest.raises(RecipeError, match="passes.0.auto.max_accuracy_drop"):
        expedit(h, ExpeditConfig(auto=AutoSchedule(max_accuracy_drop=1.0)), ctx)


@pytest.mark.slow
def test_onnx_matches_torch_at_several_batches_and_resolutions(tmp_path):
    from compress.export.onnx import export_onnx
    from compress.export.ort import make_session

    module = _token_map_vit()
    h = _handle(module)
    expedit(h, ExpeditConfig(location=1, ratio=0.3, tau=1.0), _ctx(tmp_path))
    for size in ((64, 64), (48, 80)):                     # 8x8 -> 4x4 and 6x10 -> 3x5 clusters
        h.data_config = {"input_size": (3, *size)}
        sess = make_session(export_onnx(h, tmp_path / f"m{size[0]}.onnx"), threads=1)
        for bs in (1, 3):
            x = _smooth_images(bs, *size, seed=bs)
            with torch.no_grad():
                ref = module(x).numpy()
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            assert got.shape == ref.shape == (bs, 1 + size[0] * size[1] // 64, 64)
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_token_map_recipe_end_to_end(tmp_path, tiny_vit_files):
    # The tiny classifier's checkpoint loaded as a feature extractor: head weights are ignored.
    recipe = tiny_vit_recipe(tiny_vit_files, passes=[
        {"type": "expedit", "location": 1, "clusters": [2, 2], "tau": 1.0}])
    recipe["model"]["kwargs"] = {**recipe["model"]["kwargs"], "num_classes": 0, "global_pool": ""}
    recipe["evaluation"]["gate"] = {"min_cosine": 0.5, "min_sample_cosine": 0.5}
    recipe["evaluation"]["latency"]["enabled"] = False
    r = compress(parse_recipe(recipe), out_dir=tmp_path / "out").report
    assert r["model"]["output"] == "token_map"
    assert any("ignored the checkpoint's classifier weights" in w for w in r["warnings"])
    comp = r["metrics"]["compressed"]
    assert r["metrics"]["original"]["cosine_mean"] > 0.9999
    assert 0.5 < comp["cosine_mean"] < 0.9999 and comp["cosine_min"] <= comp["cosine_mean"]
    assert {"token_cosine_min", "rel_error"} <= set(comp)
    assert r["passes"][0]["summary"]["tokens_per_block"] == [17, 17, 5, 5, 5, 5]
    assert [c["metric"] for c in r["gate"]["checks"]] == ["cosine_mean", "cosine_min"]
