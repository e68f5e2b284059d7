"""A bytes object filled in place through a numpy array: the pixel data of a large result
object written once, where `array.tobytes()` would copy it again (a full-size DBT's
float32 Parametric Map: 1 GB, about a second on a busy 2-core machine).

pydicom keeps OB/OW/OF pixel data as `bytes` (a bytearray or memoryview becomes a list of
values), and numpy cannot hand out a `bytes` object over its own memory. CPython's C API
can make a bytes object whose contents are left to the caller to fill before it is
shared (PyBytes_FromStringAndSize(NULL, n)): new_bytes_array makes one and returns a
writable array over its buffer. Elsewhere (not CPython, small sizes) it fills an ordinary
array and copies it once at the end (BytesArray.finish).

On Linux, a large buffer is marked for transparent huge pages (madvise MADV_HUGEPAGE, where
the kernel's THP mode is "madvise"): filling 1 GB of fresh memory then takes 512 page
faults instead of 262,144.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

_MIN_BYTES = 1 << 16  # below this a copy costs nothing: keep the plain path


class BytesArray:
    """`array` (writable, C-contiguous) to fill; `finish()` returns the bytes it filled.
    The array must not be used after finish()."""

    def __init__(self, shape: tuple[int, ...], dtype) -> None:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._data: bytes | None = None
        if sys.implementation.name == "cpython" and size >= _MIN_BYTES:
            self._data = _uninitialised_bytes(size)
            address = _bytes_address(self._data)
            _huge_pages(address, size)
            buffer = (ctypes.c_char * size).from_address(address)
            self.array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        else:
            self.array = np.empty(shape, dtype=dtype)

    def finish(self) -> bytes:
        if self._data is None:
            return self.array.tobytes()
        data, self._data = self._data, None
        self.array = None  # type: ignore[assignment]
        return data


_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14


def _huge_pages(address: int, size: int) -> None:
    """Advise huge pages for the whole 2 MiB pages inside [address, address + size)."""
    if not sys.platform.startswith("linux") or size < 4 * _HUGE:
        return
    start = -(-address // _HUGE) * _HUGE
    end = (address + size) // _HUGE * _HUGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: errors ignored
    except (OSError, AttributeError):
        pass


def _uninitialised_bytes(size: int) -> bytes:
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    return new(None, size)


def _bytes_address(data: bytes) -> int:
    as_string = ctypes.pythonapi.PyBytes_AsString
    as_string.restype = ctypes.c_void_p
    as_string.argtypes = (ctypes.py_object,)
    return as_string(data)
