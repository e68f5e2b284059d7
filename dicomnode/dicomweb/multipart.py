"""multipart/related bodies (RFC 2046, RFC 2387) read and written as streams.

A STOW-RS body may hold a 500 MB DBT: :class:`MultipartReader` copies each part's bytes to
a sink as they arrive, keeping only one read chunk (plus a delimiter's length) in memory;
:func:`multipart_body` yields a body part by part from files, for a streamed upload.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dicomnode.leftovers import remove_stale

CHUNK = 4 << 20  # most bytes per read (a read returns what has arrived, at least a byte)
WRITE_MIN = 1 << 20  # content is written in pieces of at least this (or a part's end)
MAX_HEADER_BYTES = 16384
MAX_BOUNDARY = 200


class MalformedBody(ValueError):
    """The body is not a multipart/related body with the announced boundary."""


class BodyTooLarge(Exception):
    """The body went past the limit while being read."""


class BodyReader:
    """The request body as ``read(n)``: Content-Length bytes, or decoded chunked transfer
    coding; refuses (BodyTooLarge) past ``limit`` bytes; b"" at the end (or early EOF)."""

    def __init__(self, raw, *, length: int | None, chunked: bool, limit: int) -> None:
        self.raw = raw
        self.remaining = length  # None: chunked
        self.chunked = chunked
        self.limit = limit
        self.received = 0
        self.complete = False  # the body ended as announced (not cut off)
        self._chunk_left = 0

    def read(self, n: int) -> bytes:
        if self.complete:
            return b""
        data = self._read_chunked(n) if self.chunked else self._read_plain(n)
        self.received += len(data)
        if self.received > self.limit:
            raise BodyTooLarge(f"body exceeds {self.limit} bytes")
        return data

    def _read_plain(self, n: int) -> bytes:
        assert self.remaining is not None
        if self.remaining <= 0:
            self.complete = True
            return b""
        data = self.raw.read1(min(n, self.remaining))  # what has arrived, without waiting
        self.remaining -= len(data)
        if self.remaining == 0:
            self.complete = True
        return data

    def _read_chunked(self, n: int) -> bytes:
        if self._chunk_left == 0:
            line = self.raw.readline(1024)
            if not line:
                return b""
            try:
                self._chunk_left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise MalformedBody("bad chunk size in chunked transfer coding") from None
            if self._chunk_left == 0:
                while self.raw.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.complete = True
                return b""
        data = self.raw.read1(min(n, self._chunk_left))
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and data:
            self.raw.readline(16)  # the CRLF after the chunk
        return data


class MultipartReader:
    """Parts of a multipart body, in order: ``next_part()`` gives a part's headers (names
    in lower case) or None after the close delimiter; ``copy_body(write)`` then writes the
    part's content and says whether the part was complete (False: the body ended inside it).
    """

    def __init__(self, read: Callable[[int], bytes], boundary: str, *, chunk: int = CHUNK) -> None:
        # RFC 2046 allows 70 characters; Orthanc sends 73 (two UUIDs): accept what is sent
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise MalformedBody(f"multipart boundary missing or longer than {MAX_BOUNDARY} "
                                "characters")
        self._read = read
        self._chunk = chunk
        self._buf = bytearray()
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._separator = b"\r\n" + self._dash_boundary
        self._started = False
        self.closed = False  # the close delimiter was seen
        self.truncated = False

    def _fill(self) -> bool:
        data = self._read(self._chunk)
        if not data:
            return False
        self._buf += data
        return True

    def _start(self) -> None:
        # the first delimiter may follow a preamble; it need not be preceded by CRLF
        while True:
            if self._buf.startswith(self._dash_boundary):
                del self._buf[:len(self._dash_boundary)]
                break
            i = self._buf.find(self._separator)
            if i >= 0:
                del self._buf[:i + len(self._separator)]
                break
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MalformedBody("no multipart boundary at the start of the body")
            if not self._fill():
                raise MalformedBody("body ended before the first multipart boundary")
        self._started = True
        self._after_delimiter()

    def _after_delimiter(self) -> None:
        """After a delimiter: "--" closes the body, else padding and CRLF open a part."""
        while len(self._buf) < 2 and self._fill():
            pass
        if self._buf.startswith(b"--"):
            self.closed = True
            self._buf.clear()
            return
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                if self._buf[:i].strip(b" \t"):
                    raise MalformedBody("unexpected bytes after a multipart boundary")
                del self._buf[:i + 2]
                return
            if len(self._buf) > 1024:
                raise MalformedBody("unexpected bytes after a multipart boundary")
            if not self._fill():
                self.truncated = True
                self.closed = True
                return

    def next_part(self) -> dict[str, str] | None:
        if not self._started:
            self._start()
        if self.closed:
            return None
        while True:
            if self._buf.startswith(b"\r\n"):  # no headers at all
                del self._buf[:2]
                return {}
            i = self._buf.find(b"\r\n\r\n")
            if i >= 0:
                block = bytes(self._buf[:i])
                del self._buf[:i + 4]
                break
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MalformedBody(f"part headers longer than {MAX_HEADER_BYTES} bytes")
            if not self._fill():
                self.truncated = True
                self.closed = True
                return None
        headers: dict[str, str] = {}
        for line in block.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                raise MalformedBody(f"bad part header line {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        return headers

    def copy_body(self, write: Callable[[memoryview], object], *,
                  write_min: int = WRITE_MIN) -> bool:
        separator = self._separator
        keep = len(separator) - 1
        searched = 0  # the buffer before this holds no separator start
        while True:
            i = self._buf.find(separator, searched)
            if i >= 0:
                with memoryview(self._buf) as view:
                    write(view[:i])
                del self._buf[:i + len(separator)]
                self._after_delimiter()
                return not self.truncated
            searched = max(0, len(self._buf) - keep)
            if searched >= write_min:  # write whole pieces: few, large writes
                with memoryview(self._buf) as view:
                    write(view[:searched])
                del self._buf[:searched]
                searched = 0
            if not self._fill():
                self.truncated = True
                self.closed = True
                return False


def new_boundary() -> str:
    return "dicomnode-" + secrets.token_hex(16)


def part_header(boundary: str, content_type: str = "application/dicom") -> bytes:
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")


def body_length(paths: Sequence[Path], boundary: str,
                content_type: str = "application/dicom") -> int:
    """Bytes :func:`multipart_body` yields for these files (for Content-Length)."""
    head = len(part_header(boundary, content_type)) + 2  # header, CRLF after the content
    return sum(head + os.path.getsize(p) for p in paths) + len(boundary) + 4


def multipart_body(paths: Sequence[Path], boundary: str, content_type: str = "application/dicom",
                   chunk: int = CHUNK) -> Iterator[bytes]:
    """A multipart/related body of these files, one chunk at a time."""
    for path in paths:
        yield part_header(boundary, content_type)
        with open(path, "rb") as fh:
            while data := fh.read(chunk):
                yield data
        yield b"\r\n"
    yield f"--{boundary}--".encode("latin-1")


def receive_part(reader: MultipartReader, directory: Path) -> tuple[Path, bool]:
    """The current part's body, written to a new file in `directory` as it arrives; whether
    it was complete (False: the body ended inside it). The file is removed on any error."""
    fd, name = tempfile.mkstemp(prefix="part-", dir=directory)
    path = Path(name)
    try:
        with open(fd, "wb", buffering=0) as fh:
            complete = reader.copy_body(_write_all(fh))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, complete


STALE_PART_S = 3600.0  # a part file untouched this long belongs to no live request


def sweep_stale_parts(directory: Path, older_than_s: float = STALE_PART_S) -> int:
    """Remove the part files (receive_part's) a killed process left in `directory`; not
    younger ones, which may be another live process's on a shared data directory. How many."""
    return remove_stale(directory, "part-*", older_than_s)


def _write_all(fh):
    def write(view: memoryview) -> None:
        while view:
            n = fh.write(view)
            view = view[n:]
    return write
