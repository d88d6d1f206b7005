"""Multipart uploads streamed to disk under a size limit, and the checks each input must pass.

The request body is parsed as it arrives (python-multipart's push parser): file parts go to
disk chunk by chunk and the byte count is checked on every chunk, so a 500 MB checkpoint never
sits in memory and an oversized upload stops at the limit. Checkpoints are accepted only in
formats that cannot run code when loaded.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from compress.errors import DataError, ModelLoadError
from compress.recipe import MAX_RECIPE_BYTES

from .archives import ARCHIVE_SUFFIXES, ArchiveLimits, archive_root, extract_archive, is_archive

FILE_FIELDS = ("recipe", "model", "calib", "eval")
MAX_TEXT_FIELD_BYTES = 1 << 20
DATA_SUFFIXES = (".npz", ".npy", ".txt", ".jsonl")
CHECKPOINT_SUFFIXES = (".safetensors", ".onnx", ".pt", ".pth")
MIB = 1 << 20


def mib(n: int) -> str:
    """A byte count in MiB, the unit the size settings use: 20971520 -> '20 MiB'."""
    value = n / MIB
    return f"{value:.0f} MiB" if value >= 10 or value == int(value) else f"{value:.1f} MiB"


class UploadError(Exception):
    """A request body the service refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, field_name: str | None = None):
        self.status = status
        self.field = field_name
        super().__init__(message)


@dataclass
class UploadedFile:
    field: str
    filename: str
    path: Path
    size: int = 0


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None


def safe_filename(name: str) -> str:
    """The last path component with anything but [A-Za-z0-9._-] replaced (never a path)."""
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:120]
    return base or "upload"


def _suffix(filename: str) -> str:
    lower = filename.lower()
    for s in ARCHIVE_SUFFIXES:
        if lower.endswith(s):
            return s
    return Path(lower).suffix


class _FormReceiver:
    """python-multipart callbacks that write file parts straight into ``dest``."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.form = Form()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._file: UploadedFile | None = None
        self._handle = None
        self._data = bytearray()
        self.complete = False

    def on_end(self) -> None:
        self.complete = True

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._file, self._data = b"", "", None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadError(400, "a multipart part has no name in its Content-Disposition")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            return
        if self._name not in FILE_FIELDS:
            raise UploadError(422, f"unknown file field {self._name!r}; send files as "
                                   f"{', '.join(FILE_FIELDS)}", self._name)
        if self._name in self.form.files:
            raise UploadError(422, f"field {self._name!r} was sent twice", self._name)
        filename = safe_filename(options[b"filename"].decode("utf-8", "replace"))
        path = self.dest / f"{self._name}{_suffix(filename)}"
        self._file = UploadedFile(self._name, filename, path)
        self._handle = open(path, "xb")  # noqa: SIM115 - closed in on_part_end / close()
        self.form.files[self._name] = self._file

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._handle.write(data[start:end])
            self._file.size += end - start
            return
        self._data += data[start:end]
        if len(self._data) > MAX_TEXT_FIELD_BYTES:
            raise UploadError(413, f"field {self._name!r} is larger than "
                                   f"{mib(MAX_TEXT_FIELD_BYTES)}", self._name)

    def on_part_end(self) -> None:
        if self._file is not None:
            self._handle.close()
            self._handle = None
        else:
            self.form.fields.setdefault(self._name, []).append(
                self._data.decode("utf-8", "replace"))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


async def receive_form(request: Request, dest: Path, max_bytes: int) -> Form:
    """Parse a multipart/form-data body into ``dest`` (created), at most ``max_bytes`` long."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype == b"application/x-www-form-urlencoded":  # a job without files
        return await _receive_urlencoded(request)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "send the job as multipart/form-data (fields: recipe or "
                               "recipe_name, model, calib, eval, set)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(413, f"upload of {mib(int(declared))} is over the limit of "
                               f"{mib(max_bytes)} (max_upload_mb)")
    dest.mkdir(parents=True)
    receiver = _FormReceiver(dest)
    callbacks = {name: getattr(receiver, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
        "on_header_end", "on_headers_finished", "on_end")}
    parser = MultipartParser(params[b"boundary"], callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, f"upload is over the limit of {mib(max_bytes)} "
                                       "(max_upload_mb)")
            parser.write(chunk)
        parser.finalize()
        if not receiver.complete:
            raise UploadError(400, "the multipart body ended before its closing boundary")
    except UploadError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart's errors: a malformed body
        raise UploadError(400, f"malformed multipart body: {e}") from None
    finally:
        receiver.close()
    return receiver.form


async def _receive_urlencoded(request: Request) -> Form:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_TEXT_FIELD_BYTES + MAX_RECIPE_BYTES:
            raise UploadError(413, "form is too large; upload files as multipart/form-data")
    form = Form()
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.fields.setdefault(key, []).append(value)
    return form


# ------------------------------------------------------------------------ input checks

def check_safetensors(path: Path) -> None:
    """A safetensors file starts with an 8-byte header length and a JSON header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError("model: file is too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, 100 << 20):
            raise ModelLoadError("model: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelLoadError("model: not a safetensors file (header is not JSON)") from None
        except RecursionError:
            raise ModelLoadError("model: not a safetensors file (header is JSON nested too "
                                 "deeply)") from None
    if not isinstance(header, dict):
        raise ModelLoadError("model: not a safetensors file (header is not a JSON object)")


def prepare_model(upload: UploadedFile, limits: ArchiveLimits) -> Path:
    """Check an uploaded checkpoint; returns the path the worker loads (file or folder)."""
    name, path = upload.filename, upload.path
    suffix = _suffix(name)
    if is_archive(name):
        dest = path.parent / "model"
        extract_archive(path, dest, limits, "model")
        path.unlink()
        root = archive_root(dest)
        if root.is_dir() and not list(root.glob("*.safetensors")):
            raise ModelLoadError("model: the archive holds no .safetensors weights; only "
                                 "safetensors are accepted in model folders (no pickle)")
        return root
    if suffix == ".safetensors":
        check_safetensors(path)
    elif suffix in (".pt", ".pth"):
        # torch.save's zip container, later read with weights_only=True; the older raw pickle
        # format is refused outright.
        if not zipfile.is_zipfile(path):
            raise ModelLoadError("model: .pt/.pth files must be torch.save() state dicts "
                                 "(zip format); convert to .safetensors")
    elif suffix != ".onnx":
        raise ModelLoadError(
            f"model: {name!r} is not an accepted checkpoint; upload .safetensors, .onnx, a "
            ".pt/.pth state dict (read with weights_only=True) or a zip/tar of a Hugging Face "
            "folder with .safetensors weights. Pickle formats (.bin, .pkl, .ckpt) are refused")
    return path


def prepare_data(upload: UploadedFile, limits: ArchiveLimits) -> Path:
    """An uploaded calibration or evaluation set: an archive (extracted) or a data file."""
    if is_archive(upload.filename):
        dest = upload.path.parent / upload.field
        extract_archive(upload.path, dest, limits, upload.field)
        upload.path.unlink()
        return archive_root(dest)
    if _suffix(upload.filename) not in DATA_SUFFIXES:
        raise DataError(f"{upload.field}: {upload.filename!r} is not accepted; upload an archive "
                        f"({', '.join(ARCHIVE_SUFFIXES)}) of an image folder, or a "
                        f"{', '.join(DATA_SUFFIXES)} file")
    return upload.path
