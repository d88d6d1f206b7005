import pytest
import torch

from compress.errors import UnsupportedModelError
from compress.patch.attention import explicit_attention_modules, make_attention_explicit
from tests.helpers import make_tiny_vit


def test_explicit_timm_attention_keeps_outputs():
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        names = make_attention_explicit(model)
        out = model(x)
    assert len(names) == 6
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert set(explicit_attention_modules(model)) == set(names)


def test_explicit_attention_exposes_probabilities():
    model = make_tiny_vit()
    make_attention_explicit(model)
    attn = model.blocks[0].attn
    attn.probe.keep = True
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    probs = attn.probe.last
    assert probs.shape == (2, model.blocks[0].attn.num_heads, 17, 17)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_explicit_bert_attention_keeps_outputs(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="eager").eval()
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        make_attention_explicit(model)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_model_without_attention_is_rejected():
    with pytest.raises(UnsupportedModelError, match="no supported attention"):
        make_attention_explicit(torch.nn.Sequential(torch.nn.Linear(2, 2)))
