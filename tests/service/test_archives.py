"""Safe extraction: traversal, links, special files and expansion bombs are refused."""

import io
import stat
import tarfile
import zipfile

import pytest

from compress.errors import DataError
from service.archives import ArchiveLimits, archive_root, extract_archive
from service.uploads import safe_filename

LIMITS = ArchiveLimits(max_bytes=10 << 20, max_files=100, max_ratio=200)


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extracts_nested_folders_and_unwraps_one_top_folder(tmp_path):
    src = make_zip(tmp_path / "a.zip", {"images/0/a.png": b"1", "images/1/b.png": b"22",
                                        "__MACOSX/images/._a.png": b"junk"})
    extract_archive(src, tmp_path / "out", LIMITS, "calib")
    root = archive_root(tmp_path / "out")
    assert root == tmp_path / "out" / "images"
    assert (root / "1" / "b.png").read_bytes() == b"22"
    assert not (tmp_path / "out" / "__MACOSX").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "a/../../evil", "C:/evil",
                                  "a\\..\\evil"])
def test_zip_traversal_refused(tmp_path, name):
    src = make_zip(tmp_path / "a.zip", {"ok.txt": b"1", name: b"x"})
    with pytest.raises(DataError, match="calib: archive member"):
        extract_archive(src, tmp_path / "out", LIMITS, "calib")
    assert not (tmp_path / "out").exists()  # nothing half-extracted is left
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_refused(tmp_path):
    src = tmp_path / "a.zip"
    with zipfile.ZipFile(src, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="link or special file"):
        extract_archive(src, tmp_path / "out", LIMITS, "calib")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                  tarfile.FIFOTYPE])
def test_tar_links_and_devices_refused(tmp_path, kind):
    info = tarfile.TarInfo("data/x")
    info.type = kind
    info.linkname = "/etc/passwd"
    src = make_tar(tmp_path / "a.tar.gz", [tar_file("data/ok.txt"), (info, None)])
    with pytest.raises(DataError, match="link or special file"):
        extract_archive(src, tmp_path / "out", LIMITS, "eval")
    assert not (tmp_path / "out").exists()


def test_tar_traversal_refused(tmp_path):
    src = make_tar(tmp_path / "a.tgz", [tar_file("../../evil")])
    with pytest.raises(DataError, match="outside the archive"):
        extract_archive(src, tmp_path / "out", LIMITS, "eval")


def test_expansion_bomb_stops_at_the_ratio(tmp_path):
    # 50 MB of zeros compress to ~50 kB: far over 200x the archive's size
    src = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * (50 << 20)})
    assert src.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="expands to more than"):
        extract_archive(src, tmp_path / "out", LIMITS, "calib")
    assert not (tmp_path / "out").exists()


def test_total_size_and_file_count_limits(tmp_path):
    import os

    src = make_zip(tmp_path / "big.zip", {"r.bin": os.urandom(2 << 20)})
    small = ArchiveLimits(max_bytes=1 << 20, max_files=100, max_ratio=200)
    with pytest.raises(DataError, match="expands to more than 1 MiB"):
        extract_archive(src, tmp_path / "out", small, "calib")
    many = make_zip(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(101)})
    with pytest.raises(DataError, match="more than 100 files"):
        extract_archive(many, tmp_path / "out2", LIMITS, "calib")


def test_not_an_archive_and_empty_archive(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        extract_archive(tmp_path / "x.zip", tmp_path / "out", LIMITS, "calib")
    empty = make_zip(tmp_path / "e.zip", {"dir/": b""})
    with pytest.raises(DataError, match="holds no files"):
        extract_archive(empty, tmp_path / "out2", LIMITS, "calib")


@pytest.mark.parametrize("name,expected", [("../../etc/passwd", "passwd"),
                                           ("C:\\Users\\x\\model.onnx", "model.onnx"),
                                           ("..", "upload"), ("a b;rm -rf.npz", "a_b_rm_-rf.npz")])
def test_safe_filename(name, expected):
    assert safe_filename(name) == expected
