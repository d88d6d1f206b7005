import pytest
import torch

from compress.tokens.merge import bipartite_soft_matching
from compress.tokens.plan import BlockState, Keep, Merge, PrefixOnly, Prune, as_step, plan_counts


def test_counts_follow_each_step():
    # 1 class token + 16 patches: merge 3, prune to half (+1 fused), keep, prefix only.
    plan = [Merge(3), Prune(0.5), None, PrefixOnly()]
    assert plan_counts(17, 1, plan) == [17, 14, 1 + 7 + 1, 9, 1]
    assert Merge(100).tokens_after(17, 1) == 17 - 8          # ToMe's clamp: half the others
    assert Keep().tokens_after(9, 1) == 9


def test_steps_are_values_and_strings_are_refused():
    assert Merge(2) == Merge(2) and Prune(0.5) != Prune(0.6)
    assert isinstance(as_step(None), Keep)
    with pytest.raises(TypeError, match="Step objects"):
        as_step(("tome", 2))


def test_positions_follow_merge_and_prune():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)                                   # 1 prefix + 8 tokens
    keys = torch.randn(2, 1, 9, 4)
    pos = torch.arange(8).expand(2, -1)
    out, size, new_pos = Merge(2).reduce(x, None, pos, BlockState(keys=keys), 1)
    assert out.shape[1] == 7 and new_pos.shape == (2, 6)
    merge, _ = bipartite_soft_matching(keys.mean(1), 2, 1)
    # each survivor keeps the position of the token it stands for
    torch.testing.assert_close(merge.select(torch.cat([x[:, :1], x[:, 1:]], 1))[:, 1:],
                               torch.stack([x[b, 1 + new_pos[b]] for b in range(2)]))
    probs = torch.softmax(torch.randn(2, 1, 9, 9), -1)
    out, size, new_pos = Prune(0.5).reduce(x, None, pos, BlockState(probs=probs), 1, fused=8)
    assert out.shape[1] == 1 + 4 + 1 and (new_pos[:, -1] == 8).all()
    assert (new_pos[:, :-1].diff(dim=1) > 0).all()            # kept tokens stay in order
