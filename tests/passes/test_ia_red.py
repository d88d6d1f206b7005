import numpy as np
import pytest
import torch

from compress.context import PassContext, PassReport
from compress.data import Dataset
from compress.errors import RecipeError, UnsupportedModelError
from compress.models.handle import ModelHandle
from compress.passes.ia_red import IaRedConfig, ia_red
from compress.patch.ia_red import kept_patches, patch_ia_red
from compress.recipe import parse_recipe
from tests.helpers import make_tiny_vit, tiny_vit_recipe


def _handle(module=None):
    return ModelHandle(task="image-classification", source="timm", name="test_vit",
                       module=module if module is not None else make_tiny_vit(),
                       data_config={"input_size": (3, 32, 32)})


def _ctx(tmp_path, n=32, labels=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = make_tiny_vit()(x).argmax(-1).detach() if labels else None
    return PassContext(index=0, calib=Dataset({"pixel_values": x}, y), device=torch.device("cpu"),
                       workdir=tmp_path, out_dir=tmp_path, report=PassReport(0, "ia_red"),
                       batch_size=32)


def _dropping_agents(module, std=0.3):
    """Random interpreters that drop a data-dependent share of tokens (p not saturated)."""
    torch.manual_seed(3)
    for a in module.ia_red_agents.values():
        torch.nn.init.normal_(a.q.weight, std=std)
        torch.nn.init.normal_(a.k.weight, std=std)
        torch.nn.init.zeros_(a.q.bias)
        torch.nn.init.zeros_(a.k.bias)


def test_training_lowers_kept_fraction_and_keeps_agreement(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    ia_red(h, IaRedConfig(steps=25, batch_size=16, samples=4, lr=2e-2, plot_images=2), ctx)
    s = ctx.report.summary
    t = s["training"]
    assert s["locations"] == [0, 2, 4]                       # 3 groups of the 6 blocks
    assert t["steps"] == 25 and not t["labels_used"]
    assert min(t["first"]["kept"]) > 0.7                     # starts near the full model
    assert max(s["kept_fraction"].values()) < 0.75            # and learns to drop
    assert t["last10"]["reward"] > t["first"]["reward"] + 0.3
    assert s["calibration_top1_agreement"] >= 0.8
    kept = list(s["kept_fraction"].values())
    assert kept == sorted(kept, reverse=True)                 # hierarchical: never grows
    assert s["estimated_speedup"] > 1.2
    assert {p["file"] for p in ctx.report.plots} == {"plots/pass0_ia_red_training.png",
                                                     "plots/pass0_kept_patches.png"}
    assert (tmp_path / "plots/pass0_kept_patches.png").stat().st_size > 1000


def test_class_token_kept_and_masks_hierarchical_in_the_model():
    m = make_tiny_vit()
    patch_ia_red(m, [0, 2, 4])
    _dropping_agents(m)
    rec = kept_patches(m, torch.randn(6, 3, 32, 32))
    assert [r["block"] for r in rec] == [0, 2, 4]
    for a, b in zip(rec, rec[1:], strict=False):
        assert not (b["keep"] & ~a["keep"]).any()             # nothing comes back
    assert 0 < rec[-1]["keep"].float().mean() < rec[0]["keep"].float().mean() < 1


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_batched_output_equals_per_image_output(pool):
    """Images keeping fewer tokens than the batch maximum carry masked ones: no effect."""
    m = make_tiny_vit()
    m.global_pool = pool
    ref = m(torch.zeros(1, 3, 32, 32))   # noqa: F841 - unpatched model runs
    patch_ia_red(m, [1, 3])
    _dropping_agents(m)
    x = torch.randn(7, 3, 32, 32)
    counts = kept_patches(m, x)[0]["keep"].sum(1)
    assert counts.min() < counts.max()                        # the batch really differs
    with torch.no_grad():
        batched = m(x)
        single = torch.cat([m(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_untrained_interpreters_start_from_the_original_model():
    m, ref = make_tiny_vit(), make_tiny_vit()
    patch_ia_red(m, [0, 3], init_keep=0.9)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))              # p ~ 0.9 > 0.5: all kept


@pytest.mark.slow
def test_onnx_matches_torch_at_several_batch_sizes(tmp_path):
    import onnx
    import onnxruntime as ort

    from compress.export.onnx import export_onnx

    h = _handle()
    patch_ia_red(h.module, [0, 2, 4])
    _dropping_agents(h.module)
    path = export_onnx(h, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"TopK", "ReduceMax", "GatherElements"} <= ops     # k from the data, real gather
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(7)
    seen = set()
    for b in (1, 2, 5, 8):
        x = torch.randn(b, 3, 32, 32, generator=g)
        seen.add(int(kept_patches(h.module, x)[-1]["keep"].sum(1).max()))
        with torch.no_grad():
            ref = h.module(x).numpy()
        out = sess.run(None, {"pixel_values": x.numpy()})[0]
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert len(seen) > 1                                      # token counts differed by input


def test_bad_config_names_the_field(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    with pytest.raises(RecipeError) as e:
        ia_red(h, IaRedConfig(locations=[0, 9], steps=0), ctx)
    assert "passes.0.locations" in str(e.value) and "[9]" in str(e.value)
    with pytest.raises(RecipeError) as e:
        ia_red(_handle(), IaRedConfig(groups=7, steps=0), ctx)
    assert "passes.0.groups" in str(e.value)
    files = {"weights": "w", "calib": "c", "eval": "e"}
    for bad, field in ([{"heads": 0}, "heads"], [{"threshold": 1.5}, "threshold"],
                       [{"locations": [1, 1]}, "locations"], [{"samples": 0}, "samples"],
                       [{"keep_rate": 0.5}, "keep_rate"],
                       [{"inference": "topk"}, "passes.0.inference"]):
        with pytest.raises(RecipeError) as e:
            parse_recipe(tiny_vit_recipe(files, passes=[{"type": "ia_red", **bad}]))
        assert field in str(e.value)
    text = ModelHandle(task="text-embedding", source="hf", name="bert",
                       module=torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="text_token_prune"):
        ia_red(text, IaRedConfig(steps=0), ctx)


def test_fixed_keep_rates_are_the_threshold_policys_shares():
    from compress.passes.ia_red import fixed_keep_rates

    # 2 images x 10 patches: group 1 keeps 8 and 6 (70%), group 2 keeps 4 and 3 of those 14
    k1 = torch.zeros(2, 10, dtype=torch.bool)
    k1[0, :8], k1[1, :6] = True, True
    k2 = torch.zeros(2, 10, dtype=torch.bool)
    k2[0, :4], k2[1, :3] = True, True
    assert fixed_keep_rates([k1, k2]) == [0.7, 0.5]
    assert fixed_keep_rates([torch.zeros(2, 10, dtype=torch.bool)]) == [0.1]  # >= 1 token


@pytest.mark.slow
def test_fixed_rate_prunes_every_image_alike_and_exports(tmp_path):
    import onnx
    import onnxruntime as ort

    from compress.export.onnx import export_onnx

    h, ctx = _handle(), _ctx(tmp_path)
    ia_red(h, IaRedConfig(steps=0, locations=[0, 2, 4], inference="fixed_rate",
                          plot_images=0), ctx)
    s = ctx.report.summary
    assert s["inference"] == "fixed_rate"
    m = h.module
    # untrained interpreters keep everything under the threshold policy: make them drop
    _dropping_agents(m)
    rates = [0.75, 0.5, 0.5]
    m._ia_red["keep_rates"] = dict(zip(("0", "2", "4"), rates, strict=False))
    x = torch.randn(5, 3, 32, 32)
    rec = kept_patches(m, x)
    counts = [r["keep"].sum(1) for r in rec]
    assert [c.tolist() for c in counts] == [[12] * 5, [6] * 5, [3] * 5]   # 16 -> 12 -> 6 -> 3
    for a, b in zip(rec, rec[1:], strict=False):
        assert not (b["keep"] & ~a["keep"]).any()
    # the best-scored patches are the ones kept
    p0, k0 = rec[0]["p"], rec[0]["keep"]
    assert (p0[k0].reshape(5, -1).min(1).values >= p0[~k0].reshape(5, -1).max(1).values).all()
    path = export_onnx(h, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and "ReduceMax" not in ops            # k from the shape, no mask
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3, 8):
        xb = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            ref = m(xb).numpy()
        np.testing.assert_allclose(sess.run(None, {"pixel_values": xb.numpy()})[0], ref,
                                   atol=1e-4, rtol=1e-4)
