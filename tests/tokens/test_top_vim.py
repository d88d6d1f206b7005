import pytest
import torch

from compress.models.vim import TokenState
from compress.tokens.top_vim import (
    TopVimPruner,
    estimated_speedup,
    gather_tokens,
    importance,
    keep_total,
    kept_patch_masks,
    layer_token_counts,
    location_families,
    select_tokens,
    token_gaps,
)


def _state(b, n, cls_index):
    return TokenState(cls_index=cls_index, positions=torch.arange(n).expand(b, n).clone())


def test_importance_sum_clipped_directions_and_mirror():
    y_f = torch.tensor([[[1.0, -2.0], [0.5, 0.5], [-1.0, -1.0]]])      # [1, 3, 2]
    y_b = torch.tensor([[[3.0, -1.0], [-4.0, 1.0], [0.0, 2.0]]])
    torch.testing.assert_close(importance(y_f, y_b), torch.tensor([[2.0, -3.0, 2.0]]))
    torch.testing.assert_close(importance(y_f, y_b, "clipped_sum"),
                               torch.tensor([[3.0, 1.0, 2.0]]))
    torch.testing.assert_close(importance(y_f, y_b, direction="fwd"),
                               torch.tensor([[-1.0, 1.0, -2.0]]))
    torch.testing.assert_close(importance(y_f, y_b, direction="both"),
                               torch.tensor([[1.0, -2.0, 0.0]]))
    # Released-code indexing: the backward output read in reversed token order.
    torch.testing.assert_close(importance(y_f, y_b, mirrored=True),
                               torch.tensor([[2.0, -3.0, 2.0]]).flip(-1))
    with pytest.raises(ValueError):
        importance(y_f, y_b, score="max")


def test_keep_total_is_the_released_odd_count():
    # ToP-ViM's Vim-S schedule at keep 0.8: 197 -> 157 -> 125 -> 101 (the paper's table).
    assert [keep_total(n, 0.8) for n in (197, 157, 125)] == [157, 125, 101]
    assert all(keep_total(n, r) % 2 == 1 for n in range(3, 80) for r in (0.3, 0.5, 0.77, 1.0))
    assert keep_total(197, 1.0) == 197 and keep_total(50, 1.0) == 49   # never more than n


def test_select_keeps_scan_order_and_puts_class_token_in_the_middle():
    torch.manual_seed(0)
    b, n, ci = 3, 11, 5
    scores = torch.randn(b, n)
    scores[:, ci] = 100.0            # the class token must never count as a patch
    k = keep_total(n, 0.6)           # ceil(0.6 * 10) = 6 -> 7
    assert k == 7
    idx = select_tokens(scores, k, ci)
    assert idx.shape == (b, k)
    assert (idx[:, (k - 1) // 2] == ci).all()
    for e in range(b):
        patches = torch.cat([idx[e, :3], idx[e, 4:]])
        assert (patches.diff() > 0).all()                        # scan order kept
        assert ci not in patches.tolist()                        # in EVERY batch element
        masked = scores[e].clone()
        masked[ci] = float("-inf")
        assert set(patches.tolist()) == set(masked.topk(k - 1).indices.tolist())
    unsorted = select_tokens(scores, k, ci, order="score")
    for e in range(b):
        got = torch.cat([unsorted[e, :3], unsorted[e, 4:]])
        assert (scores[e, got].diff() <= 0).all()               # score order (the ablation)


def test_mirrored_scores_pick_the_mirror_image_tokens():
    # Score rises with the (forward) position: flipped-back picks the right end, the
    # released code's mirrored indexing the left end; the class token stays in the middle.
    n, ci = 9, 4
    y_b = torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, 3)
    k = 5
    right = select_tokens(importance(None, y_b), k, ci)
    left = select_tokens(importance(None, y_b, mirrored=True), k, ci)
    assert right.tolist() == [[5, 6, 4, 7, 8]]
    assert left.tolist() == [[0, 1, 4, 2, 3]]


def test_gather_tokens_and_gaps():
    x = torch.arange(2 * 9 * 2, dtype=torch.float32).reshape(2, 9, 2)
    idx = torch.tensor([[0, 2, 4, 7, 8], [1, 3, 4, 5, 6]])
    g = gather_tokens(x, idx)
    torch.testing.assert_close(g[1, 3], x[1, 5])
    assert gather_tokens(torch.arange(9).expand(2, 9), idx).tolist() == idx.tolist()
    # Class token originally at 4, kept in the middle (index 2). Element 0 pruned 1 (before 2)
    # and 3, 5, 6 (before 7: the class token between them is no pruned token); element 1
    # pruned 0 (before 1), 2 (before 3) and 7, 8 (after the last kept token: no gap).
    gaps = token_gaps(idx, 2)
    assert gaps.tolist() == [[0.0, 1.0, 0.0, 3.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]]
    # The class token (4) re-inserted before patch 3: patches stay in order around it, and
    # the pruned 5 and 7 count before 6 and 8.
    pos = torch.tensor([[0, 1, 2, 4, 3, 6, 8]])     # class token (4) re-inserted at index 3
    assert token_gaps(pos, 3).tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]


def test_pruner_gathers_and_tracks_positions_and_gaps():
    torch.manual_seed(0)
    b, n, c, d = 2, 13, 4, 6
    ci = 6
    hidden, residual = torch.randn(b, n, c), torch.randn(b, n, c)
    y_b = torch.randn(b, n, d)
    pruner = TopVimPruner([3], [0.5], alignment="gap_decay")
    assert pruner.wants(2) and not pruner.wants(3) and pruner.gap_mode == "gap_decay"
    pruner.record = []
    h, r, tok = pruner(2, hidden, residual, (torch.randn(b, n, d), y_b), _state(b, n, ci))
    k = keep_total(n, 0.5)
    assert h.shape == (b, k, c) and r.shape == (b, k, c) and tok.cls_index == (k - 1) // 2
    idx = select_tokens(importance(None, y_b), k, ci)
    torch.testing.assert_close(h, gather_tokens(hidden, idx))
    torch.testing.assert_close(r, gather_tokens(residual, idx))
    assert tok.positions.tolist() == idx.tolist()
    torch.testing.assert_close(tok.gap, token_gaps(idx, tok.cls_index))
    # Gaps count every pruned patch token before the last kept one.
    last = torch.cat([idx[:, :tok.cls_index], idx[:, tok.cls_index + 1:]], 1).max(1).values
    before_last = last - (last > ci).long() + 1 - (k - 1)
    assert tok.gap.sum(1).tolist() == before_last.float().tolist()
    assert len(pruner.record) == 1
    # gather (released): no gap, gap_mode None
    plain = TopVimPruner([3], [0.5])
    _, _, tok2 = plain(2, hidden, residual, (None, y_b), _state(b, n, ci))
    assert tok2.gap is None and plain.gap_mode is None


def test_mask_alignment_keeps_length_and_skips_masked_tokens_later():
    torch.manual_seed(1)
    b, n, c, ci = 2, 11, 3, 5
    hidden, residual = torch.randn(b, n, c), torch.randn(b, n, c)
    pruner = TopVimPruner([1, 2], [0.6, 0.6], alignment="mask")
    tok = _state(b, n, ci)
    h, r, tok = pruner(0, hidden, residual, (None, torch.randn(b, n, 2)), tok)
    k1 = keep_total(n, 0.6)
    assert h.shape == hidden.shape and tok.cls_index == ci
    alive = tok.positions >= 0
    assert alive.sum(1).tolist() == [k1] * b and alive[:, ci].all()
    assert (h[~alive] == 0).all() and (r[~alive] == 0).all()
    torch.testing.assert_close(h[alive], hidden[alive])
    # The second step keeps keep_total(k1) of the live tokens and never revives a masked one.
    y_b = torch.randn(b, n, 2)
    y_b[~alive] = 50.0
    h2, _, tok2 = pruner(1, h, r, (None, y_b), tok)
    alive2 = tok2.positions >= 0
    assert alive2.sum(1).tolist() == [keep_total(k1, 0.6)] * b
    assert not (alive2 & ~alive).any()


def test_random_and_unsorted_ablation_pruners_run():
    b, n, ci = 2, 9, 4
    hidden = torch.randn(b, n, 3)
    for kw in ({"score": "random"}, {"order": "score"}):
        p = TopVimPruner([1], [0.5], **kw)
        h, _, tok = p(0, hidden, hidden, (None, torch.randn(b, n, 2)), _state(b, n, ci))
        assert h.shape[1] == keep_total(n, 0.5) and (tok.positions[:, tok.cls_index] == ci).all()


def test_token_counts_speedup_and_kept_masks():
    # Vim-T, prune after layers 10 and 20 at 0.8: 197x10, 157x10, 125x4 (the paper's 85%).
    counts = layer_token_counts(197, 24, [10, 20], [0.8, 0.8])
    assert counts == [197] * 10 + [157] * 10 + [125] * 4
    assert estimated_speedup(counts) == pytest.approx(24 * 197 / sum(counts))
    assert location_families(24)[0] == [10, 20] and location_families(24)[1] == [5, 10, 15]
    pos = torch.tensor([[0, 2, 4, 7, 8], [-1, 3, 4, 5, -1]])
    m = kept_patch_masks([pos], cls_position=4, patches=8)[0]
    assert m.tolist() == [[True, False, True, False, False, False, True, True],
                          [False, False, False, True, True, False, False, False]]
