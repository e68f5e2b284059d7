"""Part 10 bytes of a result object, fast for the large deflated ones.

pydicom's writer encodes a Deflated Explicit VR Little Endian dataset into one buffer
(copying a full-size DBT's 1 GB float32 Parametric Map twice on the way) and deflates it
in one call at zlib's default level 6 on one core: most of the time of building a DBT's
results. :func:`encode_result` writes the same file meta and the same dataset bytes, and
deflates them

- at DEFLATE_LEVEL (1 by default: the maps are runs of 256 levels, mostly zero, and level 1
  costs a fraction of level 6's time for a somewhat larger file; `dicomnode bench results`
  measures levels 1, 6 and 9);
- straight from the pixel array's buffer, without copies;
- in DEFLATE_BLOCK blocks on DEFLATE_THREADS threads (zlib releases the GIL), pigz-style:
  each block is primed with the 32 KiB before it and ends on a sync flush, so the blocks
  make one raw deflate stream that any inflater reads as if deflated in one go. The block
  boundaries do not depend on the number of threads: the bytes are the same on every run;
- with zlib-ng (the `zlib-ng` package, a dependency) where it is installed, else with
  Python's zlib: the same raw deflate format, read by any inflater. On a full-size DBT
  view's real (random-weights) saliency map at level 6, zlib-ng deflates 1.7x as fast as
  zlib (182 against 106 MB/s a thread) to the same size (1.72 % of the raw bytes); its
  level 1 is 2.6x zlib's but gives 30 % more bytes than zlib's level 1. The bytes differ
  from zlib's, the inflated dataset does not.

Early deflation (deflate_early): the bulk pixel data of a Parametric Map or SEG is final as
soon as the object is built, and every block of it but the first (primed with the elements
before it) and the last (whose flush depends on what follows) is deflated from pixel bytes
alone. build_parametric_map and build_segmentation start those blocks on background
threads at ResultOptions.deflate_level while the next object (the SR) is built on the main
thread; encode_result takes the finished blocks when it writes the same pixel bytes object
(identity: bytes are immutable, so they cannot be stale) at the same level, block size and
deflater, and deflates anything else itself. The stream is the same either way.

Inflated, the dataset is byte for byte what pydicom writes (tests/test_results_encode.py).
Other transfer syntaxes go through pydicom's dcmwrite unchanged.
"""

from __future__ import annotations

import io
import os
import queue
import struct
import threading
import types
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

DEFLATER: types.ModuleType  # the same deflate format, faster (module docstring)
try:
    from zlib_ng import zlib_ng as DEFLATER
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a site without it
    DEFLATER = zlib

DEFLATE_LEVEL = 6  # zlib's default; [results] deflate_level
DEFLATE_BLOCK = 8 * 1024 * 1024
DEFLATE_THREADS = max(1, min(4, os.cpu_count() or 1))
_WINDOW = 32 * 1024
# the pixel data elements written straight from their buffer (explicit VR, 32-bit length)
_BULK = {0x7FE00008: b"OF", 0x7FE00009: b"OD", 0x7FE00010: None}


def deflate_blocks(blocks: Sequence[bytes | memoryview], level: int = DEFLATE_LEVEL,
                   threads: int = DEFLATE_THREADS, deflater=None,
                   done: dict[int, Future] | None = None) -> list[bytes]:
    """One raw deflate stream (wbits -15) of the concatenated blocks, as a list of parts.
    Block i is primed with the last 32 KiB of block i-1 (blocks shorter than that prime the
    next with what they have: fewer matches, same stream). `deflater`: a module with
    zlib's compressobj (default DEFLATER: zlib-ng where installed, else zlib). `done`:
    blocks already being deflated (deflate_early), by index."""
    z = deflater or DEFLATER
    done = done or {}

    def one(i: int) -> bytes:
        if i in done:
            return done[i].result()
        primer = blocks[i - 1][-_WINDOW:] if i else b""
        c = (z.compressobj(level, z.DEFLATED, -zlib.MAX_WBITS, zdict=primer)
             if len(primer) else z.compressobj(level, z.DEFLATED, -zlib.MAX_WBITS))
        return c.compress(blocks[i]) + c.flush(
            z.Z_FINISH if i == len(blocks) - 1 else z.Z_SYNC_FLUSH)

    if threads <= 1 or len(blocks) < 2:
        return [one(i) for i in range(len(blocks))]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deflate") as pool:
        return list(pool.map(one, range(len(blocks))))


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """The file meta dcmwrite(..., enforce_file_format=True) writes for `ds`."""
    meta = deepcopy(ds.file_meta)
    if ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID") != ds.SOPClassUID:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if ds.get("SOPInstanceUID") and \
            meta.get("MediaStorageSOPInstanceUID") != ds.SOPInstanceUID:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    validate_file_meta(meta, enforce_standard=True)
    return meta


def _encode_part(ds: Dataset, charset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds, parent_encoding=charset)
    return fp.getvalue()


def _dataset_blocks(ds: Dataset, block: int) -> tuple[list[bytes | memoryview], bytes | None]:
    """The explicit VR little endian encoding of `ds` as blocks of at most ~`block` bytes:
    the elements before the bulk pixel data, its header and value (a view, not a copy) and
    the elements after it; and the bulk value (None when written in one block)."""
    bulk = [tag for tag in _BULK if tag in ds and isinstance(ds[tag].value, bytes)]
    if len(bulk) != 1:  # no bulk pixel data (an SR) or an unusual dataset: all in one go
        return [_encode_part(ds, "iso8859")], None
    tag = bulk[0]
    elem = ds[tag]
    vr = _BULK[tag] or (b"OW" if elem.VR == "OW" else b"OB")
    if elem.VR != vr.decode():
        return [_encode_part(ds, "iso8859")], None
    charset = ds.get("SpecificCharacterSet") or "iso8859"
    head, tail = Dataset(), Dataset()
    for e in ds:
        if e.tag != tag:
            (head if e.tag < tag else tail).add(e)
    value = memoryview(elem.value)
    pad = b"\x00" if len(value) % 2 else b""  # as pydicom's OB writer pads
    header = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value) + len(pad))
    first = _encode_part(head, charset) + header
    blocks: list[bytes | memoryview] = [first]
    blocks += [value[i:i + block] for i in range(0, len(value), block)]
    end = pad + (_encode_part(tail, charset) if len(tail) else b"")
    if end:
        blocks.append(end)
    return blocks, elem.value


def encode_result(ds: Dataset, *, level: int = DEFLATE_LEVEL, threads: int = DEFLATE_THREADS,
                  block: int = DEFLATE_BLOCK, deflater=None) -> list[bytes]:
    """The Part 10 file of `ds` as a list of byte strings to write one after the other
    (what storage's store_result takes): preamble, file meta, dataset. A deflated dataset is
    deflated at `level` in parallel blocks (module docstring); any other goes through
    pydicom's dcmwrite. `ds` is not modified."""
    if ds.file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        return [buffer.getvalue()]
    if any(tag >> 16 in (0, 2) for tag in ds.keys()):
        raise ValueError("command or file meta elements in the dataset: cannot write it")
    meta = DicomBytesIO()
    meta.is_implicit_VR, meta.is_little_endian = False, True
    meta.write(getattr(ds, "preamble", None) or b"\x00" * 128)
    meta.write(b"DICM")
    write_file_meta_info(meta, _file_meta(ds), enforce_standard=True)
    blocks, bulk = _dataset_blocks(ds, block)
    early = _take_early(bulk, level, block, deflater or DEFLATER) if bulk is not None else {}
    # value block j is block j + 1 of the dataset (block 0: the elements before it)
    parts = [meta.getvalue(),
             *deflate_blocks(blocks, level, threads, deflater,
                             done={j + 1: future for j, future in early.items()})]
    if sum(len(p) for p in parts[1:]) % 2:
        parts.append(b"\x00")  # as dcmwrite pads the deflated stream
    return parts


def encode_result_bytes(ds: Dataset, **kwargs) -> bytes:
    """encode_result joined into one bytes object."""
    return b"".join(encode_result(ds, **kwargs))


# --- early deflation of bulk pixel data (module docstring) ---------------------------------

_EARLY_KEEP = 4  # pixel values with early blocks kept (a SEG, two maps; each held alive)


@dataclass
class _Early:
    value: bytes
    level: int
    block: int
    deflater: object
    parts: dict[int, Future]  # value block index -> its deflated bytes


_early_lock = threading.Lock()
_early: OrderedDict[int, _Early] = OrderedDict()
_early_queue: queue.SimpleQueue = queue.SimpleQueue()
_early_threads: list[threading.Thread] = []


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: start afresh (queued blocks and
    entries would otherwise wait for threads that do not exist there)."""
    global _early_lock, _early_queue
    _early_lock = threading.Lock()
    _early_queue = queue.SimpleQueue()
    _early_threads.clear()
    _early.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _early_worker() -> None:
    while True:
        future, fn = _early_queue.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits on it
            future.set_exception(exc)


def _submit(fn: Callable[[], bytes]) -> Future:
    """Run fn on a background daemon thread (never holding up the interpreter's exit, as a
    ThreadPoolExecutor's threads would with queued blocks)."""
    with _early_lock:
        while len(_early_threads) < DEFLATE_THREADS:
            thread = threading.Thread(target=_early_worker, name="deflate-early", daemon=True)
            thread.start()
            _early_threads.append(thread)
    future: Future = Future()
    _early_queue.put((future, fn))
    return future


def deflate_early(value: bytes, level: int = DEFLATE_LEVEL, block: int = DEFLATE_BLOCK,
                  deflater=None) -> int:
    """Start deflating, in the background, the blocks of a bulk pixel value that do not
    depend on the rest of the dataset: all but its first and last `block`-sized block.
    encode_result of a dataset holding this very bytes object at the same level, block size
    and deflater uses them. Returns the number of blocks started."""
    if not isinstance(value, bytes):
        return 0
    z = deflater or DEFLATER
    count = -(-len(value) // block)
    if count < 3:
        return 0
    view = memoryview(value)

    def one(j: int) -> Callable[[], bytes]:
        def run() -> bytes:
            start = j * block
            primer = view[max(start - block, start - _WINDOW):start]
            c = z.compressobj(level, z.DEFLATED, -zlib.MAX_WBITS, zdict=primer)
            return c.compress(view[start:start + block]) + c.flush(z.Z_SYNC_FLUSH)
        return run

    entry = _Early(value, level, block, z, {})
    with _early_lock:
        old = _early.pop(id(value), None)
        _early[id(value)] = entry
        evicted = [_early.popitem(last=False)[1] for _ in range(len(_early) - _EARLY_KEEP)]
    for stale in ([old] if old is not None else []) + evicted:
        discard(stale)
    for j in range(1, count - 1):
        entry.parts[j] = _submit(one(j))
    return count - 2


def discard(entry: _Early | None = None) -> None:
    """Cancel the blocks not started yet of one early entry, or of all of them."""
    if entry is None:
        with _early_lock:
            entries = list(_early.values())
            _early.clear()
    else:
        entries = [entry]
    for e in entries:
        for future in e.parts.values():
            future.cancel()


def _take_early(value: bytes, level: int, block: int, deflater) -> dict[int, Future]:
    with _early_lock:
        entry = _early.get(id(value))
        if entry is None or entry.value is not value:
            return {}
        del _early[id(value)]
    if (entry.level, entry.block, entry.deflater) != (level, block, deflater):
        discard(entry)
        return {}
    return {j: f for j, f in entry.parts.items() if not f.cancelled()}
