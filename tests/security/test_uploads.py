"""Hostile uploads refused before a job exists: pickle in every container format, odd
safetensors, archive tricks (traversal, links, devices, bombs, floods), size limits and
malformed bodies. Each answers the error envelope naming the field, and leaves no job or file."""

import io
import os
import pickle
import stat
import struct
import tarfile
import zipfile

import pytest
import yaml

from tests.security.conftest import onnx_recipe

MARKER_NAME = "upload-code-ran"


class RunsCode:
    """Unpickling this runs ``touch <marker>``: proof that nothing unpickled it is the
    marker's absence."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker) -> bytes:
    return pickle.dumps({"weight": RunsCode(marker)}, protocol=2)


def zip_bytes(entries: dict[str, bytes], attrs: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if attrs and name in attrs:
                info.external_attr = attrs[name] << 16
            zf.writestr(info, data)
    return buf.getvalue()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


TIMM = yaml.safe_dump({"version": 1, "name": "t", "model": {"source": "timm", "name": "test_vit"},
                       "evaluation": {"latency": {"enabled": False}}})
HF = yaml.safe_dump({"version": 1, "name": "t", "model": {"source": "hf", "path": "m",
                                                         "task": "text-embedding"},
                     "evaluation": {"latency": {"enabled": False}}})
CONFIG = b'{"model_type": "bert"}'


def refuse_upload(api, field: str, filename: str, content: bytes, *needles, recipe=None,
                  status: int = 422):
    recipe = recipe or (TIMM if field == "model" else onnx_recipe())
    files = {field: (filename, content)}
    if field != "model":
        files["model"] = ("m.onnx", b"onnx")
    return api.refused("POST", "/v1/jobs", status, *needles, loc=field if status == 422 else None,
                       data={"recipe": recipe}, files=files)


# ------------------------------------------------------------------------------ pickle

PICKLE_FILES = {
    ".pt raw pickle": ("model.pt", "zip format"),
    ".pth raw pickle": ("model.pth", "zip format"),
    ".bin": ("pytorch_model.bin", "Pickle formats"),
    ".pkl": ("model.pkl", "Pickle formats"),
    ".ckpt": ("last.ckpt", "Pickle formats"),
    ".pickle": ("model.pickle", "Pickle formats"),
    ".joblib": ("model.joblib", "Pickle formats"),
    ".safetensors that is a pickle": ("model.safetensors", "not a safetensors file"),
}


@pytest.mark.parametrize("case", list(PICKLE_FILES))
def test_pickled_checkpoints_are_refused_unread(api, case, tmp_path):
    marker = tmp_path / MARKER_NAME
    filename, needle = PICKLE_FILES[case]
    refuse_upload(api, "model", filename, evil_pickle(marker), needle)
    assert not marker.exists()


@pytest.mark.parametrize("archive", ["zip", "tar.gz"])
@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.ckpt", "nested/pytorch_model.bin"])
def test_pickle_in_a_model_folder_archive_is_refused(api, archive, weights, tmp_path):
    """A Hugging Face folder with pickled weights and no safetensors is refused at upload."""
    marker = tmp_path / MARKER_NAME
    entries = {"m/config.json": CONFIG, f"m/{weights}": evil_pickle(marker)}
    if archive == "zip":
        data = zip_bytes(entries)
    else:
        data = tar_bytes([(tar_member(n), d) for n, d in entries.items()], mode="w:gz")
    refuse_upload(api, "model", f"model.{archive}", data, "no .safetensors", recipe=HF)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["calib", "eval"])
@pytest.mark.parametrize("filename", ["data.pkl", "data.pt", "data.csv", "data.npz.exe"])
def test_data_files_other_than_arrays_and_text_are_refused(api, field, filename, tmp_path):
    marker = tmp_path / MARKER_NAME
    refuse_upload(api, field, filename, evil_pickle(marker), "is not accepted")
    assert not marker.exists()


# ------------------------------------------------------------------------- safetensors

def st(header: bytes, declared: int | None = None, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + tail


SAFETENSORS = {
    "empty file": (b"", "too short"),
    "4 bytes": (b"\x01\x02\x03\x04", "too short"),
    "zero header length": (st(b"", 0), "bad header length"),
    "header longer than the file": (st(b"{}", 1000), "bad header length"),
    "2**63 header length": (st(b"{}", 2**63), "bad header length"),
    "200 MB header length": (st(b"{}" + b" " * 64, 200 << 20), "bad header length"),
    "header not JSON": (st(b"not json at all"), "not JSON"),
    "header not UTF-8": (st(b"\xff\xfe{\"a\":1}"), "not JSON"),
    "header a list": (st(b"[1, 2, 3]"), "not a JSON object"),
    "header a string": (st(b'"x"'), "not a JSON object"),
    "header null": (st(b"null"), "not a JSON object"),
    "header nested 100000 deep": (st(b"[" * 100_000 + b"]" * 100_000),
                                  ("nested", "not JSON", "deep")),
}


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_odd_safetensors_are_refused(api, case):
    data, needle = SAFETENSORS[case]
    refuse_upload(api, "model", "model.safetensors", data, needle)


# ---------------------------------------------------------------------------- archives

S_IFLNK, S_IFCHR, S_IFIFO = stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o666, stat.S_IFIFO | 0o666
ARCHIVES = {
    "zip ../ member": (lambda: zip_bytes({"../escape.npz": b"x"}), "outside the archive"),
    "zip deep ../ member": (lambda: zip_bytes({"d/../../../../tmp/escape.npz": b"x"}),
                            "outside the archive"),
    "zip absolute member": (lambda: zip_bytes({"/tmp/escape.npz": b"x"}), "outside the archive"),
    "zip drive letter": (lambda: zip_bytes({"C:/escape.npz": b"x"}), "outside the archive"),
    "zip backslash member": (lambda: zip_bytes({"..\\..\\escape.npz": b"x"}), "backslash"),
    "zip symlink": (lambda: zip_bytes({"link": b"/etc/passwd"}, {"link": S_IFLNK}),
                    "link or special file"),
    "zip device": (lambda: zip_bytes({"dev": b""}, {"dev": S_IFCHR}), "link or special file"),
    "zip fifo": (lambda: zip_bytes({"fifo": b""}, {"fifo": S_IFIFO}), "link or special file"),
    "tar ../ member": (lambda: tar_bytes([(tar_member("../escape.npz"), b"x")]),
                       "outside the archive"),
    "tar absolute member": (lambda: tar_bytes([(tar_member("/tmp/escape.npz"), b"x")]),
                            "outside the archive"),
    "tar symlink": (lambda: tar_bytes([(tar_member("l", tarfile.SYMTYPE, "/etc/passwd"),
                                        None)]), "link or special file"),
    "tar symlink then write through it": (lambda: tar_bytes([
        (tar_member("d", tarfile.SYMTYPE, "/tmp"), None), (tar_member("d/escape.npz"), b"x")]),
        "link or special file"),
    "tar hardlink": (lambda: tar_bytes([(tar_member("h", tarfile.LNKTYPE, "/etc/passwd"),
                                         None)]), "link or special file"),
    "tar char device": (lambda: tar_bytes([(tar_member("c", tarfile.CHRTYPE), None)]),
                        "link or special file"),
    "tar block device": (lambda: tar_bytes([(tar_member("b", tarfile.BLKTYPE), None)]),
                         "link or special file"),
    "tar fifo": (lambda: tar_bytes([(tar_member("f", tarfile.FIFOTYPE), None)]),
                 "link or special file"),
    "zip bomb": (lambda: zip_bytes({"zeros.npy": bytes(16 << 20)}), "expands to more than"),
    "tar.gz bomb": (lambda: tar_bytes([(tar_member("zeros.npy"), bytes(16 << 20))], "w:gz"),
                    "expands to more than"),
    "many small files": (lambda: zip_bytes({f"f{i}.txt": b"x" for i in range(60)}),
                         "more than 50 files"),
    "duplicate members": (lambda: _duplicate_zip(),
                          ("duplicate", "twice", "exists", "more than once")),
    "garbage with a zip name": (lambda: b"PK\x03\x04 not really", ("cannot read", "neither")),
    "truncated zip": (lambda: zip_bytes({"a.npz": b"x" * 1000})[:60], ("cannot read",
                                                                        "neither")),
    "empty zip": (lambda: zip_bytes({}), "holds no files"),
}


def _duplicate_zip() -> bytes:
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")
        zf.writestr("a.npz", b"x")
        zf.writestr("a.npz", b"y")
    return buf.getvalue()


@pytest.mark.parametrize("field", ["calib", "model"])
@pytest.mark.parametrize("case", list(ARCHIVES))
def test_archive_tricks_are_refused(api, field, case, tmp_path):
    make, needle = ARCHIVES[case]
    data = make()
    suffix = "tar.gz" if case.startswith("tar.gz") else ("tar" if case.startswith("tar")
                                                        else "zip")
    recipe = HF if field == "model" else None
    refuse_upload(api, field, f"upload.{suffix}", data, needle, recipe=recipe)
    assert not (tmp_path.parent / "escape.npz").exists()
    assert not list(api.root.rglob("escape.npz")), "a member was written outside its folder"


def test_nested_archives_are_not_extracted(api):
    """An archive inside the data archive stays a file: only one level is ever extracted, so
    a member of the inner one (here a ../ escape) is never written."""
    inner = zip_bytes({"../../escape.npz": b"x"})
    outer = zip_bytes({"data/inner.zip": inner, "data/x.npy": b"\x93NUMPY"})
    r = api.client.post("/v1/jobs", headers=api.headers(), data={"recipe": onnx_recipe()},
                        files={"model": ("m.onnx", b"onnx"), "calib": ("c.zip", outer)})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    folder = api.settings.job_dir("tenant-a", job_id)
    extracted = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert extracted == {"inputs/model.onnx", "inputs/calib/data/inner.zip",
                         "inputs/calib/data/x.npy"}, extracted
    assert not list(api.root.rglob("escape.npz"))
    api.assert_no_leak(r.text)
    _forget(api, job_id)


def test_nested_archive_as_model_folder_is_refused(api):
    inner = zip_bytes({"m/model.safetensors": st(b"{}")})
    refuse_upload(api, "model", "model.zip", zip_bytes({"inner.zip": inner}),
                  ("no .safetensors", "model folder"), recipe=HF)


def test_uploaded_filenames_never_become_paths(api):
    """Whatever the client calls a file, it is stored under the field's name in the job's own
    inputs folder."""
    names = ["../../../../escape.onnx", "/etc/cron.d/x.onnx", "..\\..\\x.onnx", "a\x00b.onnx"]
    for name in names:
        r = api.client.post("/v1/jobs", headers=api.headers(), data={"recipe": onnx_recipe()},
                            files={"model": (name, b"onnx")})
        assert r.status_code == 202, r.text
        folder = api.settings.job_dir("tenant-a", r.json()["id"])
        assert [p.name for p in (folder / "inputs").iterdir()] == ["model.onnx"]
        _forget(api, r.json()["id"])
    assert not list(api.root.rglob("escape.onnx"))


def _forget(api, job_id: str) -> None:
    """Cancel and delete an accepted job so that the module's sentinels stay the only jobs."""
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 200
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 204
    assert not api.settings.job_dir("tenant-a", job_id).exists()


# ------------------------------------------------------------------------ size and form

def test_upload_over_the_limit_is_413_in_mib(api):
    """2 MiB limit: the message says MiB, with numbers that agree (defect 10)."""
    err = refuse_upload(api, "model", "m.onnx", b"x" * (3 << 20), "over the limit",
                        recipe=onnx_recipe(), status=413)
    assert "2 MiB" in err["message"], err
    assert " MB" not in err["message"], err


def test_text_field_over_1_mib_is_413(api):
    api.refused("POST", "/v1/jobs", 413, "larger than", data={"recipe": onnx_recipe(),
                                                              "set": "name=" + "x" * (1 << 20)},
                files={"model": ("m.onnx", b"onnx")})


def test_urlencoded_form_over_the_limit_is_413(api):
    api.refused("POST", "/v1/jobs", 413, "too large",
                data={"recipe": onnx_recipe() + "#" * (3 << 20)})


@pytest.mark.parametrize("field", ["weights", "recipe_name", "../model", "model\x00"])
def test_unknown_or_odd_file_fields_are_refused(api, field):
    api.refused("POST", "/v1/jobs", 422, "unknown file field", data={"recipe": onnx_recipe()},
                files={field: ("m.onnx", b"onnx")})


def test_same_file_field_twice_is_refused(api):
    api.refused("POST", "/v1/jobs", 422, "sent twice", data={"recipe": onnx_recipe()},
                files=[("model", ("a.onnx", b"onnx")), ("model", ("b.onnx", b"onnx"))])


@pytest.mark.parametrize("ctype", ["application/json", "text/plain", "application/xml",
                                   "multipart/form-data"])
def test_other_content_types_are_415(api, ctype):
    api.refused("POST", "/v1/jobs", 415, "multipart/form-data",
                headers={**api.headers(), "content-type": ctype}, content=b"{}")


MALFORMED = {
    "no closing boundary": b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1",
    "part without a name": b"--xyz\r\nContent-Disposition: form-data\r\n\r\n1\r\n--xyz--\r\n",
    "garbage": b"\x00\xff" * 100,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_multipart_is_400(api, case):
    api.refused("POST", "/v1/jobs", 400, ("multipart", "boundary", "name"),
                headers={**api.headers(), "content-type": "multipart/form-data; boundary=xyz"},
                content=MALFORMED[case])
