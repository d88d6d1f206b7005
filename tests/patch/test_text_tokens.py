import numpy as np
import pytest
import torch

from compress.export.onnx import export_onnx
from compress.export.ort import make_session
from compress.models.loaders import load_model
from compress.patch.text_tokens import patch_text
from compress.specs import ModelSpec


@pytest.fixture()
def tiny_bert(tiny_bert_dir):
    return load_model(ModelSpec(source="hf", path=str(tiny_bert_dir)), tiny_bert_dir)


def _batch(h, texts, pad_to=None):
    enc = h.tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to,
                      truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["a short one", "a somewhat longer sentence about token pruning in encoders",
         "the quick brown fox jumps over the lazy dog again and again and again"]


def test_empty_plan_is_exact_and_padding_does_not_change_embeddings(tiny_bert):
    h = tiny_bert
    m = h.module.eval()
    ids, mask = _batch(h, TEXTS)
    with torch.no_grad():
        ref = m(ids, mask)
        patch_text(m, {}, h.tokenizer.sep_token_id)
        torch.testing.assert_close(m(ids, mask), ref, rtol=1e-5, atol=1e-5)
        patch_text(m, {0: 0.5}, h.tokenizer.sep_token_id)
        short = m(ids, mask)
        ids2, mask2 = _batch(h, TEXTS, pad_to=40)        # more padding: padding goes first
        padded = m(ids2, mask2)
    assert m._last_sizes.shape[1] == 1 + 20 + 1
    # Every real token is counted once in the pooled mean (kept or fused), padding never.
    torch.testing.assert_close(m._last_sizes.sum(1).squeeze(-1), mask2.sum(1).float())
    assert torch.nn.functional.cosine_similarity(short, ref).min() > 0.9
    assert torch.nn.functional.cosine_similarity(padded, ref).min() > 0.9


def test_cls_and_sep_are_kept(tiny_bert):
    h = tiny_bert
    m = h.module.eval()
    sep = h.tokenizer.sep_token_id
    ids, mask = _batch(h, TEXTS)
    rec = []
    patch_text(m, {0: 0.3, 1: 0.5}, sep, fuse=False)
    m._token_pruning["record"] = rec
    with torch.no_grad():
        m(ids, mask)
    # First stage: kept indices (of the tokens after [CLS]) include each row's [SEP].
    _, idx, _ = rec[0]
    sep_pos = (ids[:, 1:] == sep).nonzero()
    for row, pos in sep_pos.tolist():
        assert pos in idx[row].tolist()


@pytest.mark.slow  # one ONNX export: ~15-25 s on the 2-core machine
def test_ort_matches_torch_at_several_lengths_and_batches(tiny_bert, tmp_path):
    h = tiny_bert
    m = h.module.eval()
    patch_text(m, {0: 0.6, 1: 0.5}, h.tokenizer.sep_token_id)
    path = export_onnx(h, tmp_path / "m.onnx")
    sess = make_session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    for texts, pad in ((TEXTS, None), (TEXTS[:2], 37), (TEXTS * 3, 64)):
        ids, mask = _batch(h, texts, pad)
        with torch.no_grad():
            ref = m(ids, mask).numpy()
        out = sess.run(None, dict(zip(names, (ids.numpy(), mask.numpy()), strict=False)))[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
