import pytest
import torch

from compress.tokens.merge import bipartite_soft_matching, merge_wavg, parse_r, token_counts


@pytest.mark.parametrize("protected", [0, 1, 3])
def test_merging_conserves_token_mass_and_feature_sum(protected):
    torch.manual_seed(0)
    x = torch.randn(4, 37, 16)
    size = None
    n = x.shape[1]
    total = x.sum(1)                       # sizes 1: the mass-weighted feature sum
    for r in (5, 8, 100):                  # 100 clamps to half the mergeable tokens
        merge, done = bipartite_soft_matching(x, r, protected)
        assert done == min(r, (x.shape[1] - protected) // 2)
        x, size = merge_wavg(merge, x, size)
        assert x.shape[1] == size.shape[1]
        torch.testing.assert_close(size.sum(1).squeeze(-1), torch.full((4,), float(n)))
        torch.testing.assert_close((x * size).sum(1), total, rtol=1e-4, atol=1e-4)


def test_protected_tokens_are_never_merged():
    torch.manual_seed(0)
    x = torch.randn(2, 21, 8)
    x[:, :3] = x[:, 3:4]                   # prefix tokens identical to a patch: best match
    merge, r = bipartite_soft_matching(x, 9, protected=3)
    out, size = merge_wavg(merge, x, None)
    torch.testing.assert_close(out[:, :3], x[:, :3])
    assert (size[:, :3] == 1).all()
    assert out.shape[1] == 21 - r and r == 9


def test_most_similar_pairs_merge_first():
    # Tokens 0/1 are identical (A0, B0), the rest random: r=1 must merge exactly that pair.
    torch.manual_seed(0)
    x = torch.randn(1, 10, 32)
    x[:, 1] = x[:, 0]
    merge, _ = bipartite_soft_matching(x, 1)
    out, size = merge_wavg(merge, x, None)
    assert size.max() == 2
    merged = out[0, size[0, :, 0] == 2]
    torch.testing.assert_close(merged[0], x[0, 0])


def test_schedules():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    rs = parse_r(5, 8, "decreasing")
    assert rs[0] == 16 and rs[-1] == 0 and sum(rs) == 40
    assert token_counts(65, [8, 8, 30], protected=1) == [65, 57, 49, 25]
    with pytest.raises(ValueError):
        parse_r(3, [1, 2])
