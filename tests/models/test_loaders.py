import shutil

import numpy as np
import pytest
import torch

from compress.errors import ModelLoadError, NonFiniteError
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
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
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


# --------------------------------------------------------------------------- bad model files


def _save_safetensors(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_timm_weights_with_nan_or_inf_are_bad_input_naming_the_tensor(tmp_path, bad):
    state = make_tiny_vit().state_dict()
    state["blocks.1.attn.qkv.weight"][3, 5] = bad
    _save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(NonFiniteError) as e:
        load_model(ModelSpec(source="timm", weights="model.safetensors", **TINY_VIT),
                   tmp_path / "model.safetensors")
    msg = str(e.value)
    assert "'model.safetensors'" in msg and "blocks.1.attn.qkv.weight (1 of 12288 values)" in msg
    assert e.value.exit_code == 2 and isinstance(e.value, ModelLoadError)
    assert str(tmp_path) not in msg


def test_hf_weights_with_nan_are_bad_input(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file

    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[name][0, 0] = float("nan")
    _save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(NonFiniteError, match=r"model folder 'bert'.*attention\.self\.query"):
        load_model(ModelSpec(source="hf", path="bert"), folder)


def test_onnx_initializer_with_nan_is_bad_input(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((4, 2), np.float32)
    w[1, 1] = np.nan
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    with pytest.raises(NonFiniteError, match=r"ONNX file 'm.onnx'.*w \(1 of 8 values\)"):
        load_model(ModelSpec(source="onnx", path="m.onnx", task="text-embedding"),
                   tmp_path / "m.onnx")


@pytest.mark.parametrize("name,content,expected", [
    ("model.safetensors", b"", "is empty (0 bytes)"),
    ("model.pt", b"", "is empty (0 bytes)"),
    ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "cannot read weights file"),
    ("model.pt", b"PK\x03\x04 truncated zip", "cannot read weights file"),
])
def test_unreadable_weights_are_bad_input_named_by_file_name(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError) as e:
        read_state_dict(tmp_path / name)
    assert expected in str(e.value) and repr(name) in str(e.value)
    assert str(tmp_path) not in str(e.value)


def test_missing_weights_file_names_only_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="'gone.safetensors' does not exist") as e:
        read_state_dict(tmp_path / "gone.safetensors")
    assert str(tmp_path) not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not a protobuf \xff\xfe"])
def test_file_that_is_not_onnx_is_bad_input_without_server_path(tmp_path, content):
    (tmp_path / "model.onnx").write_bytes(content)
    with pytest.raises(ModelLoadError, match="model.onnx: not a valid ONNX model") as e:
        load_model(ModelSpec(source="onnx", path="model.onnx"), tmp_path / "model.onnx")
    assert str(tmp_path) not in str(e.value)


@pytest.mark.parametrize("key,value", [("vocab_file", "/etc/hostname"),
                                       ("tokenizer_file", "../../outside/tokenizer.json")])
def test_hf_folder_cannot_point_the_tokenizer_outside_itself(tmp_path, tiny_bert_dir, key, value):
    # transformers opens tokenizer_config.json's vocab_file as given: an absolute path made the
    # server read any file into the vocabulary.
    import json

    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg[key] = value
    cfg["name_or_path"] = "/home/someone/minilm"   # a label only: allowed
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=rf"bert/tokenizer_config.json names files outside "
                                             rf"the model folder \({key}: "):
        load_model(ModelSpec(source="hf", path="bert"), folder)


@pytest.mark.parametrize("shape", [[1, 3, 100_000, 100_000], [1, 1000, 32, 32]])
def test_onnx_image_input_size_is_bounded(tmp_path, shape):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", *shape[1:]])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match=rf"m.onnx: input 'x': input size \[{shape[1]}, "
                                             rf"{shape[2]}, {shape[3]}\] is out of range"):
        load_model(ModelSpec(source="onnx", path="m.onnx"), tmp_path / "m.onnx")
