import pytest
import torch
import torch.nn.functional as F

from compress.tokens.cluster import (
    cluster_grid,
    cluster_tokens,
    locality_mask,
    pool_matrix,
    reconstruct_tokens,
)


def _smooth_map(b=2, grid=8, block=2, dim=16, noise=0.01):
    """A token map of ``block`` x ``block`` patches of near-equal features."""
    torch.manual_seed(0)
    n = grid // block
    base = torch.randn(b, dim, n, n).repeat_interleave(block, 2).repeat_interleave(block, 3)
    return base.flatten(2).transpose(1, 2) + noise * torch.randn(b, grid * grid, dim)


def test_locality_mask_window():
    m = locality_mask((4, 4), (2, 2), window=1)     # each token sees only its own cluster
    assert m.sum(1).tolist() == [1] * 16
    assert locality_mask((4, 4), (2, 2), window=3).all()


@pytest.mark.parametrize("grid, clusters",
                         [((8, 8), (4, 4)), ((14, 14), (9, 9)), ((6, 10), (4, 3))])
def test_pool_matrix_is_adaptive_avg_pool(grid, clusters):
    x = torch.randn(2, 5, *grid)
    ref = F.adaptive_avg_pool2d(x, clusters).flatten(2).transpose(1, 2)
    got = pool_matrix(grid, clusters) @ x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, ref)


def test_cluster_grid_from_ratio_uses_integer_sides():
    assert cluster_grid((14, 14), ratio=0.25) == (7, 7)
    assert cluster_grid((6, 10), ratio=0.5) == (4, 7)
    assert cluster_grid((14, 14), clusters=(8, 9)) == (8, 9)
    assert cluster_grid((2, 2), ratio=0.01) == (1, 1)


def test_clustering_reduces_and_reconstruction_restores_full_resolution():
    x = _smooth_map()                                                    # [2, 64, 16]
    c, a = cluster_tokens(x, (8, 8), (4, 4), tau=1.0)
    assert c.shape == (2, 16, 16) and a.shape == (2, 64, 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 64))
    out = reconstruct_tokens(x, c, c, k=4, tau=1.0)
    assert out.shape == x.shape
    assert F.cosine_similarity(out, x, dim=-1).min() > 0.99


def test_identity_when_clusters_equal_grid():
    x = _smooth_map(noise=0.5)
    c, _ = cluster_tokens(x, (8, 8), (8, 8), iters=0)
    torch.testing.assert_close(c, x)                      # pooling a grid onto itself
    torch.testing.assert_close(reconstruct_tokens(x, c, c, k=1), x)   # nearest cluster: itself


def test_reconstruction_rows_are_l2_normalised_over_top_k():
    x = torch.randn(1, 16, 8) * 10          # far from every centroid: no underflow to zero rows
    c = torch.randn(1, 4, 8)
    z = torch.eye(4)[None]                  # out_i = its weight row
    w = reconstruct_tokens(x, c, z, k=2, tau=0.01)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(1, 16))
    assert ((w > 0).sum(-1) <= 2).all()


def test_cluster_tokens_rejects_clusters_larger_than_grid():
    with pytest.raises(ValueError, match="within the 4x4"):
        cluster_tokens(torch.randn(1, 16, 4), (4, 4), (5, 4))


def test_expedit_vit_keeps_token_map_resolution():
    import timm

    from compress.patch.vit_tokens import patch_expedit

    torch.manual_seed(0)
    m = timm.create_model("test_vit", img_size=64, patch_size=8, num_classes=0, global_pool="",
                          dynamic_img_size=True).eval()
    # A smooth image (4x4 colour blocks of 16 px): neighbouring patches are alike, as in photos.
    x = torch.randn(2, 3, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    with torch.no_grad():
        ref = m(x)
        patch_expedit(m, location=1, clusters=(8, 8), iters=0, k=1)   # no reduction: exact
        same = m(x)
        patch_expedit(m, location=1, clusters=(4, 4), tau=1.0)        # 64 -> 16 patch tokens
        out = m(x)
        patch_expedit(m, location=1, clusters=(4, 4), tau=0.01)       # too soft: blurs tokens
        soft = m(x)
    assert out.shape == soft.shape == ref.shape == (2, 65, 64)
    torch.testing.assert_close(same, ref)
    cos = F.cosine_similarity(out, ref, dim=-1)
    assert cos.mean() > 0.99 and cos.min() > 0.95
    assert F.cosine_similarity(soft, ref, dim=-1).mean() < 0.6
