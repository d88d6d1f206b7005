import torch

from compress.tokens.prune import keep_count, received_attention, topk_keep


def test_keep_count_is_ceil_with_integer_ops():
    assert [keep_count(n, 0.5) for n in (10, 11, 1)] == [5, 6, 1]
    assert keep_count(196, 0.7) == 138
    assert keep_count(127, 1.0) == 127


def test_topk_keeps_protected_and_best_and_fuses_rest_with_their_mass():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.0, 0.5]] * 2)
    out, size, idx = topk_keep(x, scores, 3, protected=1)
    assert idx.tolist()[0] == [1, 3, 5]                # sorted: original order kept
    torch.testing.assert_close(out[:, 0], x[:, 0])      # class token untouched
    torch.testing.assert_close(out[:, 1:4], x[:, [2, 4, 6]])
    assert out.shape[1] == 1 + 3 + 1 and size.sum().item() == 2 * 9
    dropped = [1, 3, 5, 7, 8]                          # tokens 0,2,4,6,7 of the rest
    w = scores[0, [0, 2, 4, 6, 7]]
    fused = (x[0, dropped] * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(out[0, -1], fused)


def test_received_attention_ignores_padding_queries():
    probs = torch.zeros(1, 1, 3, 3)
    probs[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    probs[0, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    probs[0, 0, 2] = torch.tensor([1.0, 0.0, 0.0])   # a padding query
    s = received_attention(probs, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(s, torch.tensor([[0.0, 1.0, 0.0]]))
