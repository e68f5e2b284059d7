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

Each function returns ``(status, comment)`` or None; :mod:`dicomnode.network.scp` raises the
refusal.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

Problem = tuple[int, str]

BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
# IODs whose Image Pixel module is greyscale only (MONOCHROME1/2, one sample): DBT, digital
# mammography, breast projection, digital X-ray.
GREYSCALE_CLASSES = {
    BREAST_TOMOSYNTHESIS,
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.13.1.4", "1.2.840.10008.5.1.4.1.1.13.1.5",
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
}
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
    if str(ds.get("SOPClassUID", "")) in GREYSCALE_CLASSES and \
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
    if str(ds.get("SOPClassUID", "")) == BREAST_TOMOSYNTHESIS and \
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
