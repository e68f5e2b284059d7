"""The on-disk archive: one file per SOP instance at <study>/<series>/<sop>.dcm.

Only validated UIDs become path components, so nothing a sender writes can escape the
archive directory. A write goes to a temporary file under ``.tmp/`` (same file system), is
fsynced, then renamed into place and the directory fsynced: a reader, or a process restarted
after a crash, sees the old file or the new one, never a partial one. A file whose row was
never committed is an orphan (harmless; :meth:`Archive.sweep_temp` removes leftover temps).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from storage.errors import ArchiveError, InsufficientStorage
from storage.uids import validate_uid

_CHUNK = 1 << 20
# Above this, hashing runs on a second thread while the bytes are written: both release the
# GIL, so a large instance costs about max(hash, write) instead of their sum.
_PARALLEL_HASH_BYTES = 8 << 20

Buffer = bytes | bytearray | memoryview


def _hash_while_writing(digest: hashlib._Hash, fh: BinaryIO, part: Buffer) -> None:
    if len(part) < _PARALLEL_HASH_BYTES:
        digest.update(part)
        fh.write(part)
        return
    hasher = threading.Thread(target=digest.update, args=(part,), name="archive-hash")
    hasher.start()
    try:
        fh.write(part)
    finally:
        hasher.join()
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class TempFile:
    """A durable temporary file, not yet in the archive."""

    path: Path
    size: int
    sha256: str


class Archive:
    def __init__(self, root: str | os.PathLike[str], *, min_free_bytes: int = 0) -> None:
        self.root = Path(root).absolute()
        self.min_free_bytes = int(min_free_bytes)
        self.tmp_dir = self.root / ".tmp"
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(
                f"cannot create archive directory {self.root}: {exc.strerror}; make it writable "
                "or set node.data_dir to a writable place"
            ) from None

    # -- paths ---------------------------------------------------------------------------

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str,
                      version: str | None = None) -> str:
        """The archive-relative path of an instance; ``version`` names a replacement copy.

        '_' cannot occur in a UID, so ``<sop>_<version>.dcm`` never collides with another
        instance's ``<sop>.dcm``.
        """
        parts = (validate_uid(study_uid, "Study Instance UID"),
                 validate_uid(series_uid, "Series Instance UID"))
        sop = validate_uid(sop_instance_uid, "SOP Instance UID")
        if version is not None:
            if not version.isalnum():
                raise ValueError(f"archive file version {version!r} must be alphanumeric")
            sop = f"{sop}_{version}"
        return str(PurePosixPath(*parts, f"{sop}.dcm"))

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ArchiveError(f"archive path {relative!r} leaves the archive; the index is "
                               "corrupt, restore it from a backup")
        return path

    # -- space ---------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free(self, incoming_bytes: int = 0, *, watermark: bool = True) -> None:
        """Raise :class:`InsufficientStorage` when the write would go below the watermark."""
        free = self.free_bytes()
        required = incoming_bytes + (self.min_free_bytes if watermark else 0)
        if free < required:
            raise InsufficientStorage(
                f"archive {self.root} has {free // 2**20} MiB free, below the "
                f"{self.min_free_bytes // 2**20} MiB watermark (storage.min_free_mb) plus "
                f"{incoming_bytes} bytes incoming; free disk space, lower storage.retention_days "
                "or move node.data_dir to a larger disk",
                free_bytes=free, required_bytes=required)

    # -- writes --------------------------------------------------------------------------

    def write_temp(self, data: Buffer | Sequence[Buffer] | BinaryIO, *,
                   watermark: bool = True) -> TempFile:
        """Write ``data`` (bytes, a sequence of buffers written one after the other, or a
        binary file object) to a fsynced temporary file, hashing it on the way."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        in_memory = isinstance(parts, (list, tuple))
        size_hint = sum(len(p) for p in parts) if in_memory else 0
        self.check_free(size_hint, watermark=watermark)
        digest = hashlib.sha256()
        size = 0
        fd, name = _mkstemp(self.tmp_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                if in_memory:
                    for part in parts:
                        _hash_while_writing(digest, fh, part)
                        size += len(part)
                else:
                    stream = cast(BinaryIO, data)
                    while chunk := stream.read(_CHUNK):
                        digest.update(chunk)
                        fh.write(chunk)
                        size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            _unlink_quietly(path)
            if exc.errno in _NO_SPACE:
                raise InsufficientStorage(
                    f"the disk holding archive {self.root} is full ({exc.strerror}); free disk "
                    "space, lower storage.retention_days or move node.data_dir to a larger disk",
                    free_bytes=self._free_or_none(), required_bytes=size_hint or None) from None
            raise ArchiveError(f"cannot write to archive {self.root}: {exc}; check the disk "
                               "and the directory's permissions") from None
        except BaseException:
            _unlink_quietly(path)
            raise
        return TempFile(path, size, digest.hexdigest())

    def adopt_temp(self, source: str | os.PathLike[str], *, watermark: bool = True) -> TempFile:
        """Take over a complete file written elsewhere (e.g. by the network layer while it
        received the instance): moved into the temporary area without copying where it is
        on the same file system, then fsynced and hashed (the two in parallel)."""
        source = Path(source)
        self.check_free(0, watermark=watermark)
        fd, name = _mkstemp(self.tmp_dir)
        os.close(fd)
        path = Path(name)
        try:
            os.replace(source, path)
        except OSError as exc:
            _unlink_quietly(path)
            if exc.errno != errno.EXDEV:
                raise ArchiveError(f"cannot move {source} into archive {self.root}: {exc}; "
                                   "check the disk and the directory's permissions") from None
            with open(source, "rb") as fh:  # another file system: copy, then drop the source
                temp = self.write_temp(fh, watermark=watermark)
            _unlink_quietly(source)
            return temp
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                hasher = threading.Thread(target=lambda: hashlib.file_digest(fh, lambda: digest),
                                          name="archive-hash")
                hasher.start()
                try:
                    os.fsync(fh.fileno())
                finally:
                    hasher.join()
            return TempFile(path, path.stat().st_size, digest.hexdigest())
        except BaseException:
            _unlink_quietly(path)
            raise

    def commit(self, temp: TempFile, relative: str) -> Path:
        """Atomically move ``temp`` to ``relative``; durable once this returns."""
        final = self.absolute(relative)
        try:
            _makedirs_durable(final.parent, self.root)
            os.replace(temp.path, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise ArchiveError(f"cannot move {temp.path.name} into archive at {final}: {exc}; "
                               "check the disk and the directory's permissions") from None
        return final

    def discard(self, temp: TempFile) -> None:
        _unlink_quietly(temp.path)

    def remove(self, relative: str) -> int:
        """Delete an archived file and empty parents; return the bytes freed (0 if gone)."""
        path = self.absolute(relative)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
        return size

    def sweep_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files a killed writer left behind; return how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self.tmp_dir.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _free_or_none(self) -> int | None:
        try:
            return self.free_bytes()
        except OSError:
            return None


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="incoming-", suffix=".part", dir=directory)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path, root: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry list changed, so the new file is findable."""
    missing = []
    current = path
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(directory.parent)
