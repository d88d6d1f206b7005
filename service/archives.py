"""Safe extraction of uploaded zip and tar archives.

Every member is checked before a byte is written: relative names only (no ``..``, no absolute
paths, no drive letters), regular files and folders only (no symlinks, hard links, devices or
FIFOs), and the bytes actually written (never the sizes the archive declares) are counted
against a total, a file count and a ratio to the archive's own size, so a zip bomb stops at the
limit instead of filling the disk.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from compress.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1 << 20
# Folders some archivers add that are never data.
SKIPPED_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    max_files: int
    max_ratio: int


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_member_path(field: str, name: str) -> PurePosixPath | None:
    """The member's relative path, or None for entries that are skipped."""
    if name.startswith(SKIPPED_PREFIXES) or PurePosixPath(name).name == ".DS_Store":
        return None
    if "\\" in name or "\x00" in name:
        raise DataError(f"{field}: archive member {name!r} has a backslash or NUL in its name; "
                        "archives must use plain relative paths")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DataError(f"{field}: archive member {name!r} points outside the archive (absolute "
                        "path or '..'); refusing to extract it")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


class _Budget:
    def __init__(self, field: str, limits: ArchiveLimits, archive_bytes: int):
        self.field = field
        self.files = 0
        self.written = 0
        self.max_bytes = min(limits.max_bytes, max(archive_bytes, CHUNK) * limits.max_ratio)
        self.max_files = limits.max_files

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise DataError(f"{self.field}: archive holds more than {self.max_files} files")

    def add_bytes(self, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise DataError(f"{self.field}: archive expands to more than "
                            f"{self.max_bytes / (1 << 20):.0f} MiB; upload a smaller data set "
                            "(or ask the operator to raise max_archive_mb)")


def _copy(src, dst: Path, budget: _Budget) -> None:
    budget.add_file()
    with open(dst, "xb") as out:
        while chunk := src.read(CHUNK):
            budget.add_bytes(len(chunk))
            out.write(chunk)


def _target(dest: Path, rel: PurePosixPath) -> Path:
    target = dest.joinpath(*rel.parts)
    # Belt and braces: the resolved path must stay under dest.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise DataError(f"archive member {rel} points outside the archive")
    return target


def extract_archive(src: Path, dest: Path, limits: ArchiveLimits, field: str) -> None:
    """Extract ``src`` (zip or tar, any compression) into the new folder ``dest``."""
    dest.mkdir(parents=True)
    budget = _Budget(field, limits, src.stat().st_size)
    try:
        if zipfile.is_zipfile(src):
            _extract_zip(src, dest, budget)
        elif tarfile.is_tarfile(src):
            _extract_tar(src, dest, budget)
        else:
            raise DataError(f"{field}: {src.name!r} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise DataError(f"{field}: cannot read archive {src.name!r}: {e}") from None
    except DataError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if budget.files == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise DataError(f"{field}: archive {src.name!r} holds no files")


def _extract_zip(src: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(src) as zf:
        for info in zf.infolist():
            rel = _safe_member_path(budget.field, info.filename)
            if rel is None:
                continue
            # Unix file type in the high bits; 0 when the archiver recorded none (plain file).
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DataError(f"{budget.field}: archive member {info.filename!r} is a link or "
                                "special file; only regular files and folders are allowed")
            target = _target(dest, rel)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as f:
                _copy(f, target, budget)


def _extract_tar(src: Path, dest: Path, budget: _Budget) -> None:
    # Streaming mode ("r|*") reads members in order without seeking or an index in memory.
    with tarfile.open(src, mode="r|*") as tf:
        for member in tf:
            rel = _safe_member_path(budget.field, member.name)
            if rel is None:
                continue
            if not (member.isreg() or member.isdir()):
                raise DataError(f"{budget.field}: archive member {member.name!r} is a link or "
                                "special file; only regular files and folders are allowed")
            target = _target(dest, rel)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy(tf.extractfile(member), target, budget)


def archive_root(dest: Path) -> Path:
    """The data inside an extracted archive: a lone top-level entry is unwrapped."""
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 else dest
