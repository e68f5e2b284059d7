"""What a received image must be for the worker to use it, checked at receipt.

An image that is acknowledged and then skipped by the worker is a silent loss: the sender
believes the node has it, the radiologist never sees a result for it. So everything the
worker will need to decode an image and build results on it is checked here, on the header
only (nothing is decoded), and what fails is refused with the standard C-STORE status
(PS3.4 B.2.3) and an Error Comment that says what is wrong:

- 0xA900 (dataset does not match SOP class): a Type 1 attribute of the Image Pixel module
  missing or impossible, colour where the IOD is greyscale, a Breast Tomosynthesis image
  without the Frame of Reference its IOD requires;
- 0xC000 (cannot understand): Pixel Data encoded otherwise than its transfer syntax says
  (native under an encapsulated syntax, encapsulated under a native one).

The ``*_problem`` functions return ``(status, comment)`` or None. The whole-instance checks
below them (``parse_header``, ``check_instance``, ``check_encoding``, ``check_pixel_data``, on
an :class:`EncodedInstance`: the bytes as received, read in place) raise
:class:`StoreRefused`. They know nothing of associations: :mod:`dicomnode.network.scp` (the
C-STORE handler), the STOW-RS receiver, retrieve and ``dicomnode import`` call them, as
pynetdicom keeps its dataset utilities apart from its event handlers.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    BreastTomosynthesisImageStorage,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import _config, evt
from pynetdicom.dsutils import encode_file_meta

from dicomnode.identifiers import (
    BREAST_IMAGE_SOP_CLASSES,
    GREYSCALE_SOP_CLASSES,
    JPEG2000_SYNTAXES,
    JPEG_SYNTAXES,
)

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE

# C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 C.4.2)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORISED = 0x0124

Problem = tuple[int, str]


_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
            "YBR_FULL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3}
_BITS_ALLOCATED = (1, 8, 16, 32)
_UNDEFINED = 0xFFFFFFFF


def _int(ds: Dataset, keyword: str) -> int | None:
    """The attribute as an integer; None when absent or empty; -1 when not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def pixel_module_problem(ds: Dataset) -> Problem | None:
    """The Image Pixel module (PS3.3 C.7.6.3) of an image the worker will decode: its Type 1
    attributes present and consistent with each other."""
    def bad(comment: str) -> Problem:
        return DATASET_DOES_NOT_MATCH, comment

    names = {"PixelRepresentation": "Pixel Representation", "BitsStored": "Bits Stored",
             "BitsAllocated": "Bits Allocated", "SamplesPerPixel": "Samples per Pixel"}
    values = {k: _int(ds, k) for k in names}
    for keyword, name in names.items():
        if values[keyword] is None:
            return bad(f"image without {name}")
    representation, stored = values["PixelRepresentation"], values["BitsStored"]
    allocated, samples = values["BitsAllocated"], values["SamplesPerPixel"]
    if representation not in (0, 1):
        return bad(f"Pixel Representation {representation}: must be 0 or 1")
    if allocated not in _BITS_ALLOCATED:
        return bad(f"Bits Allocated {allocated}: must be 1, 8, 16 or 32")
    if not 1 <= stored <= allocated:  # type: ignore[operator]
        return bad(f"Bits Stored {stored} outside 1..{allocated} (Bits Allocated)")
    high_bit = _int(ds, "HighBit")
    if high_bit is not None and high_bit != stored - 1:  # type: ignore[operator]
        return bad(f"High Bit {high_bit} with Bits Stored {stored}: must be "
                   f"{stored - 1}")  # type: ignore[operator]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if str(ds.get("SOPClassUID", "")) in GREYSCALE_SOP_CLASSES and \
            photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return bad(f"Photometric Interpretation {photometric or '(none)'}: IOD is greyscale")
    if photometric not in _SAMPLES:
        return bad(f"Photometric Interpretation {photometric or '(none)'} is unknown")
    if samples != _SAMPLES[photometric]:
        return bad(f"Samples per Pixel {samples} with {photometric}")
    return None


def frame_of_reference_problem(ds: Dataset) -> Problem | None:
    """The Frame of Reference module is mandatory in the Breast Tomosynthesis IOD: without it
    the slices cannot be placed and no SEG or Parametric Map can be built on them."""
    if str(ds.get("SOPClassUID", "")) == BreastTomosynthesisImageStorage and \
            not str(ds.get("FrameOfReferenceUID", "") or "").strip():
        return DATASET_DOES_NOT_MATCH, "DBT without Frame of Reference UID"
    return None


def pixel_encoding_problem(transfer_syntax: str, length: int) -> Problem | None:
    """Pixel Data must be encapsulated exactly when the transfer syntax is (PS3.5 A.4):
    ``length`` is the element's value length (0xFFFFFFFF: undefined, encapsulated)."""
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        return None
    encapsulated = length == _UNDEFINED
    if syntax.is_encapsulated and not encapsulated:
        return CANNOT_UNDERSTAND, f"native pixel data under {syntax.name}"
    if not syntax.is_encapsulated and encapsulated:
        return CANNOT_UNDERSTAND, f"encapsulated pixel data under {syntax.name}"
    return None


# Whole instances as received: the header parsed in place, checked before archiving. Each
# raises StoreRefused with the status and the Error Comment the peer receives.

# Largest pixel data the node accepts in one instance: far above any breast image
# (a 90-slice 3328x4096 DBT is 2.4 GB), so only absurd declarations are refused.
MAX_PIXEL_BYTES = 4 * 2**30
# (FFFE,E0DD) with length 0, little endian: closes encapsulated Pixel Data, the last element.
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_VRS = {vr.encode() for vr in (
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    "UR US UT UV").split()}
_LONG_VRS = {vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR",
                                     "UT", "SV", "UV")}
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC then SIZ marker
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "
# BTO and the 2D breast classes must carry these to be what they claim.
_IMAGE_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                     "PhotometricInterpretation")


class StoreRefused(Exception):
    """A C-STORE the node refuses: the status and the Error Comment the peer receives."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        # Error Comment is LO: one value (no backslash, which separates values), at most 64
        # characters; the message may quote what the peer sent
        self.comment = comment.replace("\\", "/")[:64]


class EncodedInstance:
    """A DICOM file's bytes held as buffers (file meta, then the dataset as received),
    read in place: slices and a stream for the header parser, never one joined copy of a
    DBT of several hundred MB."""

    def __init__(self, *parts: bytes | memoryview | mmap.mmap,
                 path: Path | None = None) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self._starts = list(itertools.accumulate((len(p) for p in self.parts), initial=0))
        self.path = path  # the bytes are this file's: storage takes it over instead of copying
        self._mapping: mmap.mmap | None = None

    @classmethod
    def from_c_store(cls, event: evt.Event) -> EncodedInstance:
        if _config.STORE_RECV_CHUNKED_DATASET:
            return cls.from_file(Path(event.dataset_path))
        prefix = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        request = cast("C_STORE", event.request)  # a C-STORE event's request
        return cls(prefix, cast(io.BytesIO, request.DataSet).getbuffer())

    @classmethod
    def from_file(cls, path: Path) -> EncodedInstance:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return cls(path=path)
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        instance = cls(mapping, path=path)
        instance._mapping = mapping
        return instance

    @property
    def storable(self) -> list[memoryview] | Path:
        """What storage writes: the file to take over, or the buffers."""
        return self.path if self.path is not None else self.parts

    def close(self) -> None:
        if self._mapping is not None:
            self.parts.clear()
            self._mapping.close()
            self._mapping = None

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(len(self))
        out = bytearray()
        for part, first in zip(self.parts, self._starts, strict=False):
            lo, hi = max(start - first, 0), min(stop - first, len(part))
            if lo < hi:
                out += part[lo:hi]
        return bytes(out)

    def stream(self) -> io.BufferedReader:
        return io.BufferedReader(_PartsReader(self), buffer_size=65536)

    def header_source(self) -> _HeaderSource:
        """A stream for pydicom that its deferred reads come back to (see parse_header)."""
        return _HeaderSource(self.stream())


class _HeaderSource:
    """A readable, seekable buffer that pydicom keeps as the dataset's source.

    pydicom takes an io.BufferedReader for an open file and re-opens it by name to read a
    deferred value (a large Per-frame Functional Groups Sequence, say); the received bytes
    have no such name ("Deferred read -- original file <received> is missing"). Any other
    object with read/seek/tell is kept and read again in place, for as long as the
    EncodedInstance is open."""

    def __init__(self, stream: io.BufferedReader) -> None:
        self._stream = stream
        self.read, self.seek, self.tell = stream.read, stream.seek, stream.tell

    @property
    def closed(self) -> bool:
        return self._stream.closed


class _PartsReader(io.RawIOBase):
    name = "<received>"  # pydicom names its source in messages

    def __init__(self, data: EncodedInstance) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.data)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        chunk = self.data[self.pos:self.pos + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def parse_header(encoded: EncodedInstance) -> Dataset:
    """The dataset without reading large values (pixel data stays as its length)."""
    try:
        return dcmread(encoded.header_source(), defer_size=1024, force=False)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}") from None


def _declared_pixel_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    # bits rounded up to whole bytes: 1-bit (BINARY SEG) pixel data is packed
    return (int(ds.Rows) * int(ds.Columns) * frames * int(ds.SamplesPerPixel) * bits + 7) // 8


def check_instance(ds: Dataset, context_sop_class: str, request_sop_instance: str) -> None:
    """Refuse what cannot be archived and processed; the status says why (PS3.4 B.2.3)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                           "SeriesInstanceUID") if not str(ds.get(k, "")).strip()]
    if missing:
        raise StoreRefused(CANNOT_UNDERSTAND, f"missing {', '.join(missing)}")
    if sop_class != context_sop_class:
        raise StoreRefused(DATASET_DOES_NOT_MATCH,
                           f"SOP Class {sop_class} sent as {context_sop_class}")
    if request_sop_instance and sop_instance != request_sop_instance:
        raise StoreRefused(DATASET_DOES_NOT_MATCH, "SOP Instance UID differs from the request")
    if sop_class not in BREAST_IMAGE_SOP_CLASSES:
        return
    absent = [k for k in _IMAGE_ATTRIBUTES if k not in ds]
    if absent or "PixelData" not in ds:
        raise StoreRefused(DATASET_DOES_NOT_MATCH,
                           f"image without {', '.join(absent or ['Pixel Data'])}")
    if sop_class == BreastTomosynthesisImageStorage and (
            "NumberOfFrames" not in ds or "SharedFunctionalGroupsSequence" not in ds):
        raise StoreRefused(DATASET_DOES_NOT_MATCH, "DBT without frames or functional groups")
    # what the worker needs to decode the image and place results on it
    # (dicomnode.network.instance_checks)
    problem = frame_of_reference_problem(ds) or pixel_module_problem(ds)
    if problem is not None:
        raise StoreRefused(*problem)
    try:
        declared = _declared_pixel_bytes(ds)
    except (TypeError, ValueError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"bad image dimensions: {exc}") from None
    if declared <= 0 or declared > MAX_PIXEL_BYTES:
        raise StoreRefused(CANNOT_UNDERSTAND, f"declared pixel data of {declared} bytes")


def check_pixel_data(ds: Dataset, encoded: EncodedInstance) -> None:
    """Pixel Data must be all there: a native value as long as the dimensions declare, an
    encapsulated one closed by its sequence delimiter (a truncated send fails here)."""
    element = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(element, "length", None)
    offset = getattr(element, "value_tell", None)
    if length is None or offset is None:
        return
    problem = pixel_encoding_problem(str(ds.file_meta.TransferSyntaxUID), length)
    if problem is not None:
        raise StoreRefused(*problem)
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return  # offsets are in the inflated stream: parsing it already proved it whole
    if length == 0xFFFFFFFF:  # encapsulated: ends with the sequence delimitation item
        if encoded[-8:] != _SEQUENCE_DELIMITER:
            raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated pixel data is truncated")
        check_first_fragment(encoded, offset, str(ds.file_meta.TransferSyntaxUID))
        return
    if offset + length > len(encoded):
        raise StoreRefused(CANNOT_UNDERSTAND,
                           f"pixel data truncated: {len(encoded) - offset} of {length} bytes")
    if "Rows" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
        declared = _declared_pixel_bytes(ds)
        if length not in (declared, declared + 1):
            raise StoreRefused(CANNOT_UNDERSTAND,
                               f"pixel data is {length} bytes, dimensions say {declared}")


def dataset_offset(encoded: EncodedInstance) -> int | None:
    """Where the dataset starts after the preamble and the File Meta (always Explicit VR
    Little Endian); None without a preamble."""
    if encoded[128:132] != b"DICM":
        return None
    pos = 132
    while len(encoded) >= pos + 8 and encoded[pos:pos + 2] == b"\x02\x00":
        if encoded[pos + 4:pos + 6] in _LONG_VRS:
            pos += 12 + int.from_bytes(encoded[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(encoded[pos + 6:pos + 8], "little")
    return pos


def check_encoding(encoded: EncodedInstance, transfer_syntax: str) -> None:
    """The dataset must be encoded as the negotiated transfer syntax says: a body sent as
    Implicit VR on an Explicit VR context (or the reverse) is parsed by guesswork, and would
    be archived as a file whose meta lies. Checks the first element's VR bytes only."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return
    offset = dataset_offset(encoded)
    if offset is None or len(encoded) < offset + 8:
        return
    looks_explicit = encoded[offset + 4:offset + 6] in _VRS
    explicit = transfer_syntax != ImplicitVRLittleEndian
    if looks_explicit != explicit:
        raise StoreRefused(CANNOT_UNDERSTAND, "dataset not encoded in its transfer syntax "
                           f"({'explicit' if looks_explicit else 'implicit'} VR)")


def check_first_fragment(encoded: EncodedInstance, offset: int, transfer_syntax: str) -> None:
    """Encapsulated Pixel Data must be items (Basic Offset Table, then fragments) and its
    first fragment must start as its codec's stream does, so that a frame that is not what
    the transfer syntax says is refused now, not found undecodable by the worker later.
    Only a few bytes are read: nothing is decoded."""
    items = []
    pos = offset
    for _ in range(2):  # the Basic Offset Table item, then the first fragment
        if encoded[pos:pos + 4] != _ITEM_TAG or pos + 8 > len(encoded):
            raise StoreRefused(CANNOT_UNDERSTAND,
                               "encapsulated pixel data without its items (no fragments)")
        size = int.from_bytes(encoded[pos + 4:pos + 8], "little")
        if size == 0xFFFFFFFF or pos + 8 + size > len(encoded):
            raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated fragment length is invalid")
        items.append(encoded[pos + 8:pos + 8 + min(size, 64)])
        pos += 8 + size
    fragment = items[1]
    if transfer_syntax in JPEG2000_SYNTAXES:
        ok = fragment.startswith(_J2K_CODESTREAM) or fragment.startswith(_JP2_SIGNATURE)
    elif transfer_syntax in JPEG_SYNTAXES:
        ok = fragment.startswith(b"\xff\xd8")
    elif transfer_syntax == RLELossless:
        segments = int.from_bytes(fragment[:4], "little") if len(fragment) >= 64 else 0
        ok = 1 <= segments <= 15
    else:
        return
    if not ok:
        raise StoreRefused(CANNOT_UNDERSTAND,
                           f"first frame is not a {transfer_syntax} stream")
