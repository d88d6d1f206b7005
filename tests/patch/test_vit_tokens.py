import numpy as np
import pytest
import timm
import torch

from compress.errors import UnsupportedModelError
from compress.export.onnx import export_onnx
from compress.export.ort import make_session
from compress.models.handle import ModelHandle
from compress.patch.vit_tokens import patch_vit
from compress.tokens.plan import Merge, PrefixOnly, Prune
from tests.helpers import make_tiny_vit


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10, **kw).eval()


def test_empty_plan_is_exact_and_tome_keeps_outputs_close():
    m = make_tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        patch_vit(m, [None] * 6)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        patch_vit(m, [Merge(2)] * 6)
        out = m(x)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.9
    assert m._pool_weights.shape[1] == 17 - 6 * 2
    assert (m._pool_weights.sum(1) == 17).all()


@pytest.mark.parametrize("plan", [[Merge(3)] * 6, [None, Prune(0.5), None, Prune(0.5),
                                                      None, None]])
def test_register_and_class_tokens_never_merged_or_dropped(plan):
    # test_vit with 2 register tokens: 3 prefix tokens ahead of 16 patches.
    m = _vit(reg_tokens=2, global_pool="avg")
    assert m.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    seen = []
    patch_vit(m, plan)
    from compress.patch import vit_tokens

    real = vit_tokens.reduce_block

    def spy(blk, x, size, step, protected, prop_attn, record=None):
        before = x[:, :3].clone()
        out, s = real(blk, x, size, step, protected, prop_attn, record)
        seen.append((before, s))
        return out, s

    vit_tokens.reduce_block = spy
    try:
        with torch.no_grad():
            m.forward_features(x)
    finally:
        vit_tokens.reduce_block = real
    for _, s in seen:
        if s is not None:
            assert (s[:, :3] == 1).all()                      # prefix tokens stand alone
            torch.testing.assert_close(s.sum(1).squeeze(-1), torch.full((2,), 19.0))
    assert seen[-1][1].shape[1] < 19


def test_unsupported_models_raise():
    m = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10,
                          global_pool="max")
    with pytest.raises(UnsupportedModelError):
        patch_vit(m, [None] * 6)
    with pytest.raises(UnsupportedModelError):
        patch_vit(torch.nn.Linear(2, 2), [])


@pytest.mark.slow  # one ONNX export: ~15-25 s on the 2-core machine
def test_ort_matches_torch_at_several_batch_sizes(tmp_path):
    # ToMe, EViT and the prefix-only last block in one graph (one export keeps the test short).
    plan = [Merge(2), Prune(0.6), Merge(1), None, Prune(0.7), PrefixOnly()]
    m = make_tiny_vit()
    patch_vit(m, plan)
    h = ModelHandle(task="image-classification", source="timm", name="t", module=m,
                    data_config={"input_size": (3, 32, 32)})
    path = export_onnx(h, tmp_path / "m.onnx")
    sess = make_session(path, threads=1)
    for bs in (1, 5, 8):
        x = torch.randn(bs, 3, 32, 32)
        with torch.no_grad():
            ref = m(x).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
