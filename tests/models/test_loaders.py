import torch

from compress.models import load_model
from compress.models.loaders import read_state_dict
from compress.specs import ModelSpec
from tests.helpers import TINY_VIT, make_tiny_vit


def test_timm_weights_load_exactly(tiny_vit_files):
    ref = make_tiny_vit()
    for path in (tiny_vit_files["weights"], tiny_vit_files["pt"]):
        h = load_model(ModelSpec(source="timm", weights=str(path), **TINY_VIT), path)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(h.module(x), ref(x))
        assert h.input_size == (3, 32, 32)
        assert h.task == "image-classification"


def test_classifier_checkpoint_loads_as_token_map_model(tiny_vit_files):
    ref = make_tiny_vit()
    path = tiny_vit_files["weights"]
    kwargs = {**TINY_VIT["kwargs"], "num_classes": 0, "global_pool": ""}
    h = load_model(ModelSpec(source="timm", weights=str(path), name=TINY_VIT["name"],
                             kwargs=kwargs), path)
    assert h.token_map and h.output_name == "token_map"
    assert h.info["load_notes"] == ["model.kwargs num_classes=0: ignored the checkpoint's "
                                    "classifier weights (head.bias, head.weight)"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = h.module(x)
        torch.testing.assert_close(out, ref.forward_features(x))   # [2, 1 + 4*4, 64]
    assert out.shape == (2, 17, 64)
    assert not load_model(ModelSpec(source="timm", weights=str(path), **TINY_VIT), path).token_map


def test_training_checkpoint_layout_is_unwrapped(tmp_path):
    model = make_tiny_vit()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.pth")
    state = read_state_dict(tmp_path / "ckpt.pth")
    assert set(state) == set(model.state_dict())


def test_minilm_loads_offline_and_embeds_like_sentence_transformers(minilm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    h = load_model(ModelSpec(source="hf", path=str(minilm_dir)), minilm_dir)
    enc = h.tokenizer(["A cat sits on the mat.", "A feline rests on a rug.", "Stock prices fell."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = h.module(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases closer than unrelated sentences

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu", local_files_only=True)
    ref = torch.from_numpy(st.encode(["A cat sits on the mat."], normalize_embeddings=True))
    torch.testing.assert_close(emb[:1], ref, atol=1e-5, rtol=1e-4)
