import pytest
import torch
from pydantic import ValidationError

from compress.context import PassContext, PassReport
from compress.data import Dataset
from compress.errors import RecipeError, UnsupportedModelError
from compress.models.handle import ModelHandle
from compress.models.vim import VimConfig, VisionMamba
from compress.passes.top_vim import TopVimConfig, TopVimFinetune, top_vim
from compress.tokens.auto import AutoSchedule
from compress.tokens.top_vim import TopVimPruner, keep_total
from tests.helpers import make_tiny_vit

TINY = VimConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=6, d_state=8,
                 num_classes=10)          # 16 patches + class token = 17 tokens


def _vim(seed=0):
    torch.manual_seed(seed)
    model = VisionMamba(TINY).eval()
    # Vim's initialization scales out_proj by 1/sqrt(depth): a random model's logits barely
    # depend on the tokens. Larger mixer outputs and head make pruning visible in the logits.
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.mul_(10)
        model.head.weight.mul_(20)
    return model


def _handle(module=None):
    return ModelHandle(task="image-classification", source="vim", name="tiny_vim",
                       module=module if module is not None else _vim(),
                       data_config={"input_size": (3, 32, 32), "mean": [0.0] * 3,
                                    "std": [1.0] * 3})


def _ctx(tmp_path, n=16, labels=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = None
    if labels:
        with torch.no_grad():
            y = _vim()(x).argmax(-1)
    return PassContext(index=0, calib=Dataset({"pixel_values": x}, y), device=torch.device("cpu"),
                       workdir=tmp_path, out_dir=tmp_path, report=PassReport(0, "top_vim"),
                       batch_size=16)


def test_pruned_model_runs_with_the_schedule_it_reports(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    top_vim(h, TopVimConfig(after_layers=[2, 4], keep=0.6, alignment="gap_decay"), ctx)
    s = ctx.report.summary
    k1 = keep_total(17, 0.6)
    k2 = keep_total(k1, 0.6)
    assert s["tokens_per_layer"] == [17, 17, k1, k1, k2, k2]
    assert s["estimated_speedup"] == pytest.approx(6 * 17 / sum(s["tokens_per_layer"]),
                                                   abs=1e-3)
    pruner = h.module.token_pruner
    assert isinstance(pruner, TopVimPruner) and pruner.wants(1) and pruner.wants(3)
    assert not pruner.wants(0) and pruner.gap_mode == "gap_decay"
    x = ctx.calib.inputs["pixel_values"][:4]
    pruner.record = []
    with torch.no_grad():
        out = h.module(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert [pos.shape[1] for _, _, pos in pruner.record] == [k1, k2]
    # The class token (original position 8) stays in the middle of every kept sequence.
    for _, _, pos in pruner.record:
        assert (pos[:, (pos.shape[1] - 1) // 2] == 8).all()
    assert 0 <= s["calibration"]["top1_agreement"] <= 1
    assert any(p["file"].endswith("kept_patches.png") for p in ctx.report.plots)
    assert (tmp_path / ctx.report.plots[0]["file"]).is_file()


def test_keep_one_changes_nothing(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    x = ctx.calib.inputs["pixel_values"][:4]
    with torch.no_grad():
        ref = h.module(x)
    top_vim(h, TopVimConfig(after_layers=[3], keep=1.0), ctx)
    assert h.module.token_pruner is None and ctx.report.summary["pruned"] is False
    with torch.no_grad():
        torch.testing.assert_close(h.module(x), ref)


def test_mask_alignment_zeroes_in_place_and_reports_no_speedup(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    top_vim(h, TopVimConfig(after_layers=[2], keep=0.5, alignment="mask"), ctx)
    s = ctx.report.summary
    assert s["estimated_speedup"] == 1.0 and "upper bound" in s["note"]
    with torch.no_grad():
        assert h.module(ctx.calib.inputs["pixel_values"][:2]).shape == (2, 10)


def test_exit_2_on_a_vit_names_what_applies(tmp_path):
    h = ModelHandle(task="image-classification", source="timm", name="test_vit",
                    module=make_tiny_vit(), data_config={"input_size": (3, 32, 32)})
    with pytest.raises(UnsupportedModelError) as e:
        top_vim(h, TopVimConfig(), _ctx(tmp_path))
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "top_vim" in msg and "Vision Mamba" in msg and "tome" in msg


def test_bad_configs_name_the_field(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    with pytest.raises(RecipeError) as e:
        top_vim(h, TopVimConfig(after_layers=[6]), ctx)
    assert "passes.0.after_layers" in str(e.value) and "1..5" in str(e.value)
    with pytest.raises(RecipeError) as e:
        top_vim(h, TopVimConfig(alignment="mask", auto=AutoSchedule(speedup=1.2)), ctx)
    assert "passes.0.alignment" in str(e.value)
    with pytest.raises(ValidationError):
        TopVimConfig(direction="fwd", mirrored=True)
    with pytest.raises(ValidationError):
        TopVimConfig(keep=[0.8, 0.7])                       # a list needs after_layers
    with pytest.raises(ValidationError):
        TopVimConfig(after_layers=[2, 4], keep=[0.8])
    with pytest.raises(ValidationError):
        TopVimConfig(keep=0)


def test_keep_list_follows_its_locations_when_sorted(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    top_vim(h, TopVimConfig(after_layers=[4, 2], keep=[0.9, 0.5]), ctx)
    s = ctx.report.summary
    assert s["after_layers"] == [2, 4] and s["keep"] == [0.5, 0.9]


def test_auto_reaches_the_speed_target_with_the_weakest_keep(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path)
    top_vim(h, TopVimConfig(auto=AutoSchedule(speedup=1.3)), ctx)
    s = ctx.report.summary
    assert s["estimated_speedup"] >= 1.3
    assert s["auto_trials"]                       # every location family measured
    # With calibration data each family's weakest sufficient keep was measured; the pick
    # is the one with the smallest top-1 drop.
    chosen = [t for t in s["auto_trials"] if t["after_layers"] == s["after_layers"]
              and t["keep"] == s["keep"][0]]
    assert chosen and chosen[0]["top1_drop"] == min(t["top1_drop"] for t in s["auto_trials"])


def test_auto_keeps_the_accuracy_bound(tmp_path):
    h, ctx = _handle(), _ctx(tmp_path, labels=True)
    ref = _vim()
    top_vim(h, TopVimConfig(auto=AutoSchedule(max_accuracy_drop=10.0, max_samples=16)), ctx)
    s = ctx.report.summary
    x, y = ctx.calib.inputs["pixel_values"], ctx.calib.labels
    with torch.no_grad():
        drop = 100 * ((ref(x).argmax(-1) == y).float().mean()
                      - (h.module(x).argmax(-1) == y).float().mean()).item()
    assert drop <= 10.0
    assert all("top1_drop" in t for t in s["auto_trials"])
    passing = [t for t in s["auto_trials"] if t["top1_drop"] <= 10.0]
    assert s["estimated_speedup"] == max(t["estimated_speedup"] for t in passing)


def _kl(model, ref, x):
    with torch.no_grad():
        return torch.nn.functional.kl_div(model(x).log_softmax(-1), ref.log_softmax(-1),
                                          reduction="batchmean", log_target=True).item()


def test_finetune_distills_toward_the_unpruned_model(tmp_path):
    ctx0, ctx = _ctx(tmp_path, n=32), _ctx(tmp_path, n=32)
    x = ctx.calib.inputs["pixel_values"]
    with torch.no_grad():
        ref = _vim()(x)
    free = _handle()
    cfg = {"after_layers": [2], "keep": 0.4, "plot_images": 0}
    top_vim(free, TopVimConfig(**cfg), ctx0)
    h = _handle()
    ft = TopVimFinetune(steps=12, lr=3e-4, batch_size=16, warmup=0.0)
    top_vim(h, TopVimConfig(**cfg, finetune=ft), ctx)
    f = ctx.report.summary["finetune"]
    assert f["steps"] == 12 and f["last"]["output"] < f["first"]["output"]
    # Closer to the unpruned model than the training-free pruned one (KL on the calibration set).
    assert _kl(h.module, ref, x) < 0.8 * _kl(free.module, ref, x)
    assert not any(p.requires_grad for p in h.module.parameters())
    assert h.module.token_pruner is not None


@pytest.mark.slow
@pytest.mark.parametrize("alignment", ["gather", "gap_decay"])
def test_pruned_vim_exports_with_scan_and_matches_in_ort(tmp_path, alignment):
    import numpy as np

    from compress.export.onnx import export_onnx, op_histogram
    from compress.export.ort import make_session

    torch.manual_seed(0)
    module = VisionMamba(VimConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=8,
                                   num_classes=10, scan="scan")).eval()
    h = _handle(module)
    top_vim(h, TopVimConfig(after_layers=[1], keep=0.5, alignment=alignment, plot_images=0),
            _ctx(tmp_path, n=4))
    path = export_onnx(h, tmp_path / "model.onnx")
    assert op_histogram(path).get("Scan") == 4             # two layers, two directions
    x = torch.randn(3, 3, 32, 32)                           # another batch size than exported
    with torch.no_grad():
        ref = module(x).numpy()
    out = make_session(path).run(None, {"pixel_values": x.numpy()})[0]
    cos = (ref * out).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(out, axis=-1)
    assert cos.min() >= 0.9999


@pytest.mark.slow
def test_compress_run_exports_a_pruned_vim_that_ort_matches(tmp_path):
    import numpy as np

    from compress import compress
    from compress.recipe import parse_recipe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:16])
    np.savez(tmp_path / "eval.npz", x=x[16:], labels=rng.integers(0, 10, 8))
    recipe = {
        "version": 1, "name": "tiny-vim-top-vim",
        "model": {"source": "vim", "vim": {"img_size": 32, "patch_size": 8, "in_chans": 3,
                                           "embed_dim": 32, "depth": 2, "d_state": 8,
                                           "num_classes": 10, "scan": "scan"}},
        "calibration": {"path": str(tmp_path / "calib.npz"), "num_samples": 16,
                        "batch_size": 8},
        "evaluation": {"path": str(tmp_path / "eval.npz"), "num_samples": 8, "batch_size": 8,
                       "latency": {"enabled": False}},
        "passes": [{"type": "top_vim", "after_layers": [1], "keep": 0.5,
                    "alignment": "gap_decay", "plot_images": 2}],
        "export": {"verify_batch_sizes": [1, 3]},
    }
    report = compress(parse_recipe(recipe), out_dir=tmp_path / "out").report
    summary = report["passes"][0]["summary"]
    assert summary["tokens_per_layer"] == [17, keep_total(17, 0.5)]
    ex = report["export"]
    assert ex["op_histogram"].get("Scan") == 4              # two layers, two directions
    assert ex["op_histogram"].get("TopK")                   # the pruning step is in the graph
    assert [p["batch_size"] for p in ex["parity"]][:2] == [1, 3]
    assert min(p["cosine"] for p in ex["parity"]) >= 0.9999
