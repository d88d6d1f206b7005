import json

import numpy as np
import pytest
import torch

from compress.data import load_dataset, subset_indices
from compress.errors import DataError
from compress.models import load_model
from compress.specs import DataSpec, ModelSpec
from tests.helpers import TINY_VIT


@pytest.fixture(scope="module")
def vit_handle(tiny_vit_files):
    return load_model(ModelSpec(source="timm", weights=str(tiny_vit_files["weights"]), **TINY_VIT),
                      tiny_vit_files["weights"])


@pytest.fixture(scope="module")
def bert_handle(tiny_bert_dir):
    return load_model(ModelSpec(source="hf", path=str(tiny_bert_dir)), tiny_bert_dir)


def test_subset_is_deterministic_and_sorted():
    a = subset_indices(100, 10, seed=3)
    assert np.array_equal(a, subset_indices(100, 10, seed=3))
    assert not np.array_equal(a, subset_indices(100, 10, seed=4))
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert list(subset_indices(5, 10, seed=0)) == [0, 1, 2, 3, 4]


def test_npz_subset_and_labels(vit_handle, tiny_vit_files):
    ds = load_dataset(DataSpec(num_samples=5, seed=1), tiny_vit_files["eval"], vit_handle,
                      "evaluation")
    assert len(ds) == 5 and ds.labels.dtype == torch.int64
    assert ds.available == 16
    assert ds.inputs["pixel_values"].shape == (5, 3, 32, 32)


def test_imagefolder_uses_model_preprocessing(tmp_path, vit_handle):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (50, 40), color=(i * 80, 10, 200)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(DataSpec(), tmp_path, vit_handle, "calibration")
    assert ds.inputs["pixel_values"].shape == (6, 3, 32, 32)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert any("cat, dog" in n for n in ds.notes)


def test_imagefolder_with_broken_image(tmp_path, vit_handle):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image 'a/x.png'"):
        load_dataset(DataSpec(), tmp_path, vit_handle, "calibration")


def test_empty_image_folder(tmp_path, vit_handle):
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(DataSpec(), tmp_path, vit_handle, "calibration")


def test_text_batches_trim_padding(tmp_path, bert_handle):
    (tmp_path / "s.txt").write_text("short one\n\n" + "a much longer sentence " * 5 + "\n")
    ds = load_dataset(DataSpec(batch_size=1), tmp_path / "s.txt", bert_handle, "calibration")
    assert len(ds) == 2  # blank line skipped
    lengths = [b["input_ids"].shape[1] for b in ds.batches(1)]
    assert lengths[0] < lengths[1]


def test_jsonl_field_and_errors(tmp_path, bert_handle):
    (tmp_path / "s.jsonl").write_text(json.dumps({"sentence": "hello there"}) + "\n")
    ds = load_dataset(DataSpec(text_field="sentence"), tmp_path / "s.jsonl", bert_handle,
                      "calibration")
    assert ds.texts == ["hello there"]
    with pytest.raises(DataError, match="line 1: expected an object with a string field 'text'"):
        load_dataset(DataSpec(), tmp_path / "s.jsonl", bert_handle, "calibration")
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(DataError, match="line 1: not JSON"):
        load_dataset(DataSpec(), tmp_path / "bad.jsonl", bert_handle, "calibration")


def test_max_length_truncates(tmp_path, bert_handle):
    (tmp_path / "s.txt").write_text("word " * 500)
    ds = load_dataset(DataSpec(max_length=16), tmp_path / "s.txt", bert_handle, "calibration")
    assert ds.inputs["input_ids"].shape[1] == 16


def test_images_for_text_model_rejected(tiny_vit_files, bert_handle):
    with pytest.raises(DataError, match="text encoder"):
        load_dataset(DataSpec(), tiny_vit_files["eval"], bert_handle, "calibration")


def test_unknown_extension(tmp_path, vit_handle):
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_dataset(DataSpec(), tmp_path / "x.csv", vit_handle, "calibration")


# --------------------------------------------------------------------------- bad data files

def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("name,content,expected", [
    ("calib.npz", b"", "is empty (0 bytes); expected an .npz file written by numpy.savez"),
    ("calib.npy", b"", "is empty (0 bytes); expected an .npy file written by numpy.save"),
    ("calib.npz", b"PK\x03\x04 not really a zip", "cannot read as npz without pickle"),
    ("calib.npz", _npz_bytes(x=np.zeros((4, 3, 32, 32), np.float32))[:300],
     "cannot read as npz without pickle"),
    ("calib.npy", b"\x93NUMPY\x01\x00garbage", "cannot read as npy without pickle"),
])
def test_unreadable_array_files_are_data_errors_naming_the_file(tmp_path, vit_handle, name,
                                                                content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        load_dataset(DataSpec(), tmp_path / name, vit_handle, "calibration")
    msg = str(e.value)
    assert msg.startswith(f"calibration.path {name!r}") and expected in msg
    assert str(tmp_path) not in msg
    assert e.value.exit_code == 2


def test_single_array_saved_as_npz_is_a_data_error(tmp_path, vit_handle):
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 32, 32), np.float32))
    (tmp_path / "calib.npy").rename(tmp_path / "calib.npz")
    with pytest.raises(DataError, match=r"single array \(.npy\), not a zip"):
        load_dataset(DataSpec(), tmp_path / "calib.npz", vit_handle, "calibration")


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39])
def test_non_finite_inputs_are_data_errors(tmp_path, vit_handle, bad):
    x = np.zeros((6, 3, 32, 32), np.float64)
    x[4, 0, 1, 2] = bad
    np.savez(tmp_path / "calib.npz", x=x)
    with pytest.raises(DataError, match=r"'calib.npz': array 'x' holds NaN or Inf .* in 1 of 6 "
                                        r"samples used, first at index 4"):
        load_dataset(DataSpec(), tmp_path / "calib.npz", vit_handle, "calibration")


def test_complex_inputs_are_refused(tmp_path, vit_handle):
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 3, 32, 32), np.complex64))
    with pytest.raises(DataError, match="dtype complex64, expected real numbers"):
        load_dataset(DataSpec(), tmp_path / "calib.npz", vit_handle, "calibration")


def test_missing_data_file_names_only_the_file(tmp_path, vit_handle):
    with pytest.raises(DataError, match="'gone.npz' does not exist") as e:
        load_dataset(DataSpec(), tmp_path / "gone.npz", vit_handle, "calibration")
    assert str(tmp_path) not in str(e.value)
