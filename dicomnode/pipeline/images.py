"""DICOM breast images -> (D, H, W) float32 arrays plus the metadata later steps need.

Two passes: :func:`scan_images` reads headers only (pixel data deferred, never decoded),
classifies each object, and groups single-frame DBT slices into one volume per series;
:func:`read_pixels` decodes one scanned image frame by frame into a preallocated float32
array. :func:`load_image` / :func:`load_images` do both.

Classification: Breast Tomosynthesis objects are "dbt"; Digital Mammography / Breast
Projection (and other SOP classes from an MG or BREAST exam) are "s2d" when synthetic
(ImageType GENERATED_2D, DERIVED with a DBT source, or a vendor's synthetic-2D series
description), "dbt" slices when ImageType says TOMOSYNTHESIS, else "ffdm".

Conventions of the result (:class:`BreastImage`): MONOCHROME2 sense (MONOCHROME1 inverted
on the stored-value range), modality rescale applied (per frame for enhanced objects),
slices in position order along the slice normal (multi-frame objects keep their frame
order unless it is not monotonic in position).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, BreastTomosynthesisImageStorage

from dicomnode.errors import UnusableImageError
from dicomnode.identifiers import (
    BREAST_PROJECTION_SOP_CLASSES,
    MAMMOGRAPHY_2D_SOP_CLASSES,
    NON_IMAGE_SOP_CLASS_PREFIXES,
)
from dicomnode.ops.logs import kv

__all__ = [
    "BreastImage", "DecodeError", "FrameSizeMismatchError", "ImageHeader", "NoPixelDataError",
    "NotABreastImageError", "NotDicomError", "SliceOrderError", "UnknownLateralityError",
    "UnsupportedPhotometricError", "decode_pool", "describe_dataset", "load_image",
    "load_images", "read_pixels", "scan_images",
]

log = logging.getLogger("dicomnode.volume")

# View for Mammography (CID 4014): SNOMED CT and legacy SRT codes -> short code.
_VIEW_CODES = {
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10228": "LM",
    "399099002": "LMO", "R-10230": "LMO",
    "399196006": "FB", "R-10244": "FB",
    "399188001": "SIO", "R-102D0": "SIO",
    "441555000": "ISO", "R-40AAA": "ISO",
    "399192008": "XCCL", "R-1024A": "XCCL",
    "399101009": "XCCM", "R-1024B": "XCCM",
    "399265009": "XCC", "R-102CF": "XCC",
    "399161006": "CV", "R-102D2": "CV",
    "399110001": "TAN", "R-102C2": "TAN",
}
_VIEW_NAMES = set(_VIEW_CODES.values())
# Words in series descriptions of vendors' synthetic 2D images (Hologic C-View,
# Siemens Insight 2D, GE V-Preview, Fuji S-View, ...).
_SYNTHETIC_WORDS = ("c-view", "cview", "synthe", "v-preview", "vpreview", "s-view",
                    "insight 2d", "intelligent 2d", "2d synth", "generated 2d")


class NotDicomError(UnusableImageError):
    """A file named explicitly is not a DICOM file."""


class NotABreastImageError(UnusableImageError):
    """The object is not a breast image (another SOP class, body part, or a non-image)."""


class NoPixelDataError(UnusableImageError):
    """A breast image object carries no pixel data."""


class UnsupportedPhotometricError(UnusableImageError):
    """The pixels are not greyscale (MONOCHROME1 / MONOCHROME2, one sample per pixel)."""


class FrameSizeMismatchError(UnusableImageError):
    """Slices of one series have different rows/columns."""


class SliceOrderError(UnusableImageError):
    """Slices of a series cannot be put in order (no positions, duplicates)."""


class DecodeError(UnusableImageError):
    """The pixel data cannot be decoded (transfer syntax without a decoder, corrupt data)."""


class UnknownLateralityError(UnusableImageError):
    """No laterality tag, and the image shows no breast to tell the side from."""


@dataclass
class BreastImage:
    """One breast image ready for preprocessing, with what results need to reference it."""

    pixels: np.ndarray  # (D, H, W) float32, MONOCHROME2 sense (higher = denser), rescale applied
    modality: str  # "dbt" | "ffdm" | "s2d"
    laterality: str  # "L" | "R"
    laterality_source: str  # "tag" | "image"
    view: str  # "CC" | "MLO" | other short code ("ML", "XCCL", ...) | "" when unknown
    pixel_spacing: tuple[float, float]  # (row, col) mm
    slice_positions: np.ndarray  # (D, 3) ImagePositionPatient per slice (zeros when absent)
    slice_normal: np.ndarray | None  # unit normal (row x col direction), None without orientation
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: list[str]  # per slice (repeated for a multi-frame object)
    frame_numbers: list[int]  # per slice: 1-based frame number in its SOP instance
    transfer_syntax_uid: str
    source_paths: list[Path]  # the file, or one file per slice of a single-frame series
    patient_orientation: tuple[str, str] | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    def release_pixels(self) -> None:
        """Drop the decoded pixels once the model has read them (a full-size DBT view is
        about 1 GB of float32); what results need, the shape and geometry, stays. `pixels`
        becomes a read-only array of zeros of the same shape that takes no memory."""
        self.pixels = np.broadcast_to(np.zeros((), self.pixels.dtype), self.pixels.shape)


@dataclass
class ImageHeader:
    """What the headers say about one breast image, before any pixel is decoded."""

    display_path: Path  # the file, or the folder of a single-frame series
    modality: str
    laterality: str | None  # "L"/"R" from the tags; None when they do not say
    view: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    photometric: str
    patient_orientation: tuple[str, str] | None
    slice_normal: np.ndarray | None
    # per slice, in volume order
    slice_paths: list[Path] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    frame_numbers: list[int] = field(default_factory=list)
    slice_positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    rescale: list[tuple[float, float]] = field(default_factory=list)  # (slope, intercept)
    stored_range: tuple[int, int] = (0, 65535)
    multi_frame: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.sop_instance_uids), self.rows, self.columns)

    @property
    def uid(self) -> str:
        """The UID to name in messages: the SOP instance, or the series for a slice series."""
        uids = self.sop_instance_uids
        return self.series_uid if len(set(uids)) > 1 else uids[0]

    @property
    def transfer_syntax_name(self) -> str:
        return UID(self.transfer_syntax_uid).name if self.transfer_syntax_uid else "unknown"


# ---------------------------------------------------------------------------- reading headers


def _read_header(path: Path) -> Dataset:
    # defer_size: large values (the pixel data) stay on disk, but "PixelData" in ds works
    return pydicom.dcmread(path, defer_size="64 KB")


def _functional_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of a functional group macro for a frame: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        group = per_frame[frame]
        if sequence in group and len(group[sequence].value):
            return group[sequence][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared):
        group = shared[0]
        if sequence in group and len(group[sequence].value):
            return group[sequence][0]
    return None


def _frame_attr(ds: Dataset, frame: int, sequence: str, keyword: str):
    item = _functional_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return item[keyword].value
    return ds.get(keyword)


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _laterality_from_tags(ds: Dataset, n_frames: int) -> str | None:
    def norm(value) -> str | None:
        text = str(value or "").strip().upper()
        return text if text in ("L", "R") else None  # "B", "U" or empty say nothing

    lat = norm(ds.get("ImageLaterality"))
    if lat:
        return lat
    frame_values = {norm(_frame_attr(ds, i, "FrameAnatomySequence", "FrameLaterality"))
                    for i in range(n_frames)}
    frame_values.discard(None)
    if len(frame_values) == 1:
        return frame_values.pop()
    return norm(ds.get("Laterality"))


def _view(ds: Dataset) -> str:
    seq = ds.get("ViewCodeSequence")
    if seq:
        code = str(seq[0].get("CodeValue", "")).strip()
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
    position = str(ds.get("ViewPosition", "")).strip().upper()
    if position in _VIEW_NAMES:
        return position
    # some senders only name the view in the series description ("L MLO", "RCC")
    words = str(ds.get("SeriesDescription", "")).upper().replace("_", " ").split()
    for word in words:
        for name in ("MLO", "CC", "ML", "LM"):
            if word in (name, "L" + name, "R" + name):
                return name
    return ""


def _is_synthetic_2d(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "GENERATED_2D" in image_type:
        return True
    if image_type and image_type[0] == "DERIVED":
        for item in ds.get("SourceImageSequence", []):
            if str(item.get("ReferencedSOPClassUID", "")) == BreastTomosynthesisImageStorage:
                return True
    text = " ".join(str(ds.get(k, "")) for k in (
        "SeriesDescription", "ProtocolName", "DerivationDescription")).lower()
    text = text.replace("tomosynthe", "")  # "synthe" must not match tomosynthesis slices
    return any(word in text for word in _SYNTHETIC_WORDS)


def _is_non_image(ds: Dataset) -> bool:
    sop = str(ds.get("SOPClassUID", ""))
    if sop.startswith(NON_IMAGE_SOP_CLASS_PREFIXES):
        return True
    return (sop not in MAMMOGRAPHY_2D_SOP_CLASSES and sop != BreastTomosynthesisImageStorage
            and "PixelData" not in ds)


def _sop_name(sop: str) -> str:
    name = UID(sop).name if sop else ""
    return name if name and name != sop else (sop or "no SOP Class UID")


def _classify(ds: Dataset, path: Path) -> str:
    """"dbt" | "ffdm" | "s2d"; raises NotABreastImageError for anything else."""
    sop = str(ds.get("SOPClassUID", ""))
    uid = str(ds.get("SOPInstanceUID", "?"))
    if _is_non_image(ds):
        raise NotABreastImageError(
            f"{path}: {_sop_name(sop)} object {uid} is not an image; "
            "pass breast images (DBT, mammography)")
    if sop == BreastTomosynthesisImageStorage:
        return "dbt"
    if sop not in MAMMOGRAPHY_2D_SOP_CLASSES:
        modality = str(ds.get("Modality", "")).upper()
        body_part = str(ds.get("BodyPartExamined", "")).upper()
        if modality != "MG" and body_part != "BREAST":
            raise NotABreastImageError(
                f"{path}: {_sop_name(sop)} object {uid} (modality {modality or '?'}, body part "
                f"{body_part or '?'}) is not a breast image; send DBT or mammography")
    if sop in BREAST_PROJECTION_SOP_CLASSES and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotABreastImageError(
            f"{path}: {_sop_name(sop)} object {uid} holds {ds.NumberOfFrames} projections of a "
            "tomosynthesis acquisition, not an image to read; send the reconstructed "
            "Breast Tomosynthesis volume")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    synthetic = _is_synthetic_2d(ds)
    if not synthetic and any(v.startswith("TOMO") for v in image_type) \
            and sop not in BREAST_PROJECTION_SOP_CLASSES:
        # DBT slices sent one per instance as another SOP class (older vendor exports)
        return "dbt"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise NotABreastImageError(
            f"{path}: {_sop_name(sop)} object {uid} is a 2D breast image with {frames} frames; "
            "a mammogram has one frame (send DBT as Breast Tomosynthesis)")
    return "s2d" if synthetic else "ffdm"


def describe_dataset(ds: Dataset, where: str | Path = "<dataset>"
                     ) -> tuple[str, str | None, str]:
    """(modality "dbt"/"ffdm"/"s2d", laterality from the tags or None, view) of a header
    already in memory (e.g. a received C-STORE); raises NotABreastImageError for anything
    that is not a breast image. ``where`` names the source in messages."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return _classify(ds, Path(where)), _laterality_from_tags(ds, frames), _view(ds)


def _check_pixels(ds: Dataset, path: Path) -> None:
    uid = str(ds.get("SOPInstanceUID", "?"))
    if "PixelData" not in ds:
        raise NoPixelDataError(
            f"{path}: image {uid} has no pixel data (header only?); resend the full object")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise UnsupportedPhotometricError(
            f"{path}: image {uid} has photometric interpretation {photometric or '(none)'} with "
            f"{samples} sample(s) per pixel; only greyscale MONOCHROME1/MONOCHROME2 is supported")
    if not int(ds.get("Rows", 0) or 0) or not int(ds.get("Columns", 0) or 0):
        raise NoPixelDataError(f"{path}: image {uid} has no Rows/Columns")


@dataclass
class _Slice:
    """One frame as scanned: enough to place and decode it."""

    path: Path
    ds: Dataset
    frame: int  # 0-based frame index in its file
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None


def _frame_geometry(ds: Dataset, frame: int):
    pos = _frame_attr(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    ori = _frame_attr(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    return _floats(pos, 3) if pos is not None else None, (
        _floats(ori, 6) if ori is not None else None)


def _spacing(ds: Dataset) -> tuple[float, float]:
    for value in (_frame_attr(ds, 0, "PixelMeasuresSequence", "PixelSpacing"),
                  ds.get("ImagerPixelSpacing"), ds.get("NominalScannedPixelSpacing")):
        spacing = _floats(value, 2) if value is not None else None
        if spacing and spacing[0] > 0 and spacing[1] > 0:
            return spacing  # type: ignore[return-value]
    log.warning(kv(event="no_pixel_spacing", sop_instance_uid=ds.get("SOPInstanceUID", "")))
    return (1.0, 1.0)


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    slope = _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0)


def _patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    value = _frame_attr(ds, 0, "PatientOrientationInFrameSequence", "PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    return (str(value[0]), str(value[1]))


def _normal(orientation: Sequence[float] | None) -> np.ndarray | None:
    if orientation is None:
        return None
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 0 else None


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _order_slices(slices: list[_Slice], uid: str, where: Path) -> list[_Slice]:
    """Slices of a single-frame series in position order along the slice normal; the
    direction follows the instance numbers when there are any (as the sender counted)."""
    normal = _normal(slices[0].orientation)
    if normal is not None and all(s.position is not None for s in slices):
        keys = [float(np.dot(s.position, normal)) for s in slices]  # type: ignore[arg-type]
    elif all("InstanceNumber" in s.ds for s in slices):
        keys = [float(s.ds.InstanceNumber) for s in slices]
    else:
        raise SliceOrderError(
            f"{where}: series {uid} has slices without ImagePositionPatient/orientation or "
            "InstanceNumber; cannot order them")
    if len(set(np.round(keys, 4))) != len(keys):
        raise SliceOrderError(
            f"{where}: series {uid} has {len(keys)} slices but duplicate slice positions; "
            "send one reconstruction per series")
    order = sorted(range(len(slices)), key=keys.__getitem__)
    numbers = [s.ds.get("InstanceNumber") for s in slices]
    if all(n not in (None, "") for n in numbers) and len(order) > 1:
        if float(numbers[order[0]]) > float(numbers[order[-1]]):
            order.reverse()
    return [slices[i] for i in order]


def _header_from_slices(slices: list[_Slice], modality: str, display_path: Path,
                        multi_frame: bool) -> ImageHeader:
    ds = slices[0].ds
    positions = np.array([s.position if s.position is not None else (0.0, 0.0, 0.0)
                          for s in slices], dtype=np.float64)
    # laterality: the tags of every slice must agree, else they say nothing
    lats = {_laterality_from_tags(s.ds, int(s.ds.get("NumberOfFrames", 1) or 1))
            for s in ({id(s.ds): s for s in slices}.values())}
    laterality = lats.pop() if len(lats) == 1 else None
    return ImageHeader(
        display_path=display_path,
        modality=modality,
        laterality=laterality,
        view=_view(ds),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing=_spacing(ds),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        photometric=str(ds.PhotometricInterpretation).strip().upper(),
        patient_orientation=_patient_orientation(ds),
        slice_normal=_normal(slices[0].orientation),
        slice_paths=[s.path for s in slices],
        sop_instance_uids=[str(s.ds.SOPInstanceUID) for s in slices],
        frame_numbers=[s.frame + 1 for s in slices],
        slice_positions=positions,
        rescale=[_rescale(s.ds, s.frame) for s in slices],
        stored_range=_stored_range(ds),
        multi_frame=multi_frame,
    )


def _multi_frame_header(ds: Dataset, path: Path, modality: str) -> ImageHeader:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    slices = []
    for i in range(n_frames):
        pos, ori = _frame_geometry(ds, i)
        slices.append(_Slice(path, ds, i, pos, ori))
    normal = _normal(slices[0].orientation)
    if n_frames > 2 and normal is not None and all(s.position is not None for s in slices):
        steps = np.diff([float(np.dot(s.position, normal))  # type: ignore[arg-type]
                         for s in slices])
        if not (np.all(steps > 0) or np.all(steps < 0)):  # scrambled frames: sort them
            log.warning(kv(event="frames_not_in_position_order",
                           sop_instance_uid=ds.SOPInstanceUID))
            slices.sort(key=lambda s: float(np.dot(s.position, normal)))  # type: ignore[arg-type]
    return _header_from_slices(slices, modality, path, multi_frame=n_frames > 1)


def _iter_files(paths: Iterable[str | Path]) -> Iterable[tuple[Path, bool]]:
    """(file, named explicitly) for files and the files under folders, in sorted order;
    a file reached twice (named and inside a named folder) comes once."""
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        found = ([(f, False) for f in sorted(p.rglob("*")) if f.is_file()] if p.is_dir()
                 else [(p, True)])
        for f, explicit in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                yield f, explicit


def scan_images(paths: Iterable[str | Path], *, skip_non_images: bool = True
                ) -> list[ImageHeader]:
    """Headers of the breast images in files and folders (recursive), no pixels decoded.

    Single-frame DBT slices are grouped into one volume per series (and laterality/view).
    Non-image objects (SEG, SR, PM, ...) are skipped (or raise NotABreastImageError with
    skip_non_images=False); non-DICOM files are skipped inside folders, but a file named
    explicitly that is not DICOM raises NotDicomError. An image that cannot be used raises
    an UnusableImageError subclass naming the file and UID.
    """
    headers: list[ImageHeader] = []
    series: dict[tuple[str, str | None, str], list[_Slice]] = {}
    for path, explicit in _iter_files(paths):
        try:
            ds = _read_header(path)
        except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
            if explicit:
                reason = "no DICM prefix" if isinstance(exc, InvalidDicomError) else exc
                raise NotDicomError(
                    f"{path} is not a readable DICOM file ({reason}); name DICOM files "
                    "or folders") from exc
            continue
        if "SOPClassUID" not in ds:
            media_class = ds.file_meta.get("MediaStorageSOPClassUID") if ds.file_meta else None
            if not media_class:
                if explicit:
                    raise NotDicomError(f"{path} is not a DICOM object (no SOP Class UID)")
                continue
            ds.SOPClassUID = media_class  # e.g. DICOMDIR: classified (and skipped) by it
        if _is_non_image(ds) and skip_non_images:
            log.debug(kv(event="skip_non_image", path=path, sop_class=ds.get("SOPClassUID", "")))
            continue
        modality = _classify(ds, path)
        _check_pixels(ds, path)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if modality == "dbt" and n_frames == 1:
            pos, ori = _frame_geometry(ds, 0)
            key = (str(ds.get("SeriesInstanceUID", "")),
                   _laterality_from_tags(ds, 1), _view(ds))
            series.setdefault(key, []).append(_Slice(path, ds, 0, pos, ori))
        else:
            headers.append(_multi_frame_header(ds, path, modality))
    for (series_uid, _, _), slices in series.items():
        headers.append(_series_header(slices, series_uid))
    return headers


def _series_header(slices: list[_Slice], series_uid: str) -> ImageHeader:
    folders = {s.path.parent for s in slices}
    where = folders.pop() if len(folders) == 1 else slices[0].path
    sizes = {(int(s.ds.Rows), int(s.ds.Columns)) for s in slices}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise FrameSizeMismatchError(
            f"{where}: series {series_uid} has slices of different sizes ({shown}); "
            "a volume needs one size; resend the reconstruction")
    photometrics = {str(s.ds.PhotometricInterpretation).strip().upper() for s in slices}
    if len(photometrics) > 1:
        raise UnsupportedPhotometricError(
            f"{where}: series {series_uid} mixes photometric interpretations "
            f"{sorted(photometrics)}")
    ordered = _order_slices(slices, series_uid, where)
    return _header_from_slices(ordered, "dbt", where, multi_frame=False)


# ---------------------------------------------------------------------------- decoding


def read_pixels(header: ImageHeader, *, workers: int = 1,
                executor: Executor | None = None) -> BreastImage:
    """Decode a scanned image into a BreastImage (float32 allocated once, filled per frame).

    ``workers`` > 1 decodes compressed pixel data in that many processes (the JPEG 2000
    decoder holds the GIL, so threads do not help): about 0.3-0.7 s of CPU per full-size
    JPEG 2000 slice, worth spreading on a many-core worker. ``executor``: a process pool to
    reuse instead (e.g. one kept by a long-running worker). Uncompressed data is always
    read in this process.
    """
    depth, rows, cols = header.shape
    pixels = np.empty((depth, rows, cols), dtype=np.float32)
    invert = header.photometric == "MONOCHROME1"
    lo, hi = header.stored_range

    def put(slot: int, frame: np.ndarray) -> None:
        if frame.shape != (rows, cols):
            raise FrameSizeMismatchError(
                f"{header.slice_paths[slot]}: image {header.sop_instance_uids[slot]} frame "
                f"{header.frame_numbers[slot]} decodes to {frame.shape}, header says "
                f"{rows}x{cols}")
        out = pixels[slot]
        out[...] = frame  # the only conversion to float32
        if invert:
            np.subtract(lo + hi, out, out=out)
        slope, intercept = header.rescale[slot]
        if slope != 1.0:
            out *= slope
        if intercept != 0.0:
            out += intercept

    compressed = UID(header.transfer_syntax_uid).is_compressed if header.transfer_syntax_uid \
        else False
    try:
        if (workers > 1 or executor is not None) and compressed and depth > 1:
            try:
                _decode_in_processes(header, put, workers, executor)
            except BrokenProcessPool as exc:  # the pool, not the image, failed
                log.warning(kv(event="decode_pool_failed", uid=header.uid, error=exc))
                _decode_here(header, put)
        else:
            _decode_here(header, put)
    except UnusableImageError:
        raise
    except Exception as exc:  # decoders raise anything from RuntimeError to ValueError
        raise DecodeError(
            f"{header.display_path}: image {header.uid} ({header.transfer_syntax_name}) "
            f"cannot be decoded: {exc}") from exc

    laterality, source = header.laterality, "tag"
    if laterality is None:
        laterality, source = _laterality_from_image(pixels, header), "image"
    return BreastImage(
        pixels=pixels,
        modality=header.modality,
        laterality=laterality,
        laterality_source=source,
        view=header.view,
        pixel_spacing=header.pixel_spacing,
        slice_positions=header.slice_positions.copy(),
        slice_normal=header.slice_normal,
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        frame_of_reference_uid=header.frame_of_reference_uid,
        sop_class_uid=header.sop_class_uid,
        sop_instance_uids=list(header.sop_instance_uids),
        frame_numbers=list(header.frame_numbers),
        transfer_syntax_uid=header.transfer_syntax_uid,
        source_paths=list(dict.fromkeys(header.slice_paths)),
        patient_orientation=header.patient_orientation,
    )


def _decode_here(header: ImageHeader, put) -> None:
    """Frame by frame in this process; multi-frame files are streamed, never read whole."""
    if header.multi_frame:
        slot_of_frame = {f - 1: slot for slot, f in enumerate(header.frame_numbers)}
        for index, frame in enumerate(pydicom.pixels.iter_pixels(header.slice_paths[0])):
            if index in slot_of_frame:
                put(slot_of_frame[index], frame)
    else:
        for slot, path in enumerate(header.slice_paths):
            put(slot, pydicom.pixels.pixel_array(path))


def _decode_chunk(path: str, indices: list[int] | None) -> list[np.ndarray]:
    """Frames `indices` of a multi-frame file, or the one frame of a single-frame file."""
    if indices is None:
        return [pydicom.pixels.pixel_array(path)]
    return list(pydicom.pixels.iter_pixels(path, indices=indices))


def decode_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for read_pixels/load_images (spawned: the caller may hold CUDA or torch
    threads, which a fork would break)."""
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"))


def _decode_in_processes(header: ImageHeader, put, workers: int,
                         executor: Executor | None) -> None:
    # (path, frame indices, slots) per task; a few tasks per worker balance the load
    tasks: list[tuple[str, list[int] | None, list[int]]] = []
    if header.multi_frame:
        order = sorted(range(len(header.frame_numbers)), key=header.frame_numbers.__getitem__)
        size = max(1, -(-len(order) // (workers * 3)))
        for start in range(0, len(order), size):
            slots = order[start:start + size]
            tasks.append((str(header.slice_paths[0]),
                          [header.frame_numbers[s] - 1 for s in slots], slots))
    else:
        tasks = [(str(p), None, [slot]) for slot, p in enumerate(header.slice_paths)]
    pool = executor or decode_pool(min(workers, len(tasks)))
    try:
        futures = {pool.submit(_decode_chunk, path, indices): slots
                   for path, indices, slots in tasks}
        for future in as_completed(futures):
            for slot, frame in zip(futures[future], future.result(), strict=True):
                put(slot, frame)
    finally:
        if executor is None:
            pool.shutdown(cancel_futures=True)


def _laterality_from_image(pixels: np.ndarray, header: ImageHeader) -> str:
    """Laterality from which image edge the chest wall is on (standard display orientation:
    a left breast has its chest wall on the left of the image)."""
    from gmic.preprocess import chest_wall_side

    mip = pixels[0] if pixels.shape[0] == 1 else pixels.max(axis=0)
    side = chest_wall_side(mip)
    if side is None:
        raise UnknownLateralityError(
            f"{header.display_path}: image {header.uid} has no laterality tag "
            "(ImageLaterality/FrameLaterality/Laterality) and no breast visible to tell the "
            "side from; set ImageLaterality")
    log.debug(kv(event="laterality_from_image", uid=header.uid, side=side))
    return "L" if side == "left" else "R"


def load_image(path: str | Path, *, workers: int = 1) -> BreastImage:
    """One file: an enhanced DBT, an FFDM or a synthetic 2D image (a lone single-frame DBT
    slice gives D = 1). Raises an UnusableImageError subclass for anything else.
    ``workers``: processes decoding compressed frames (see read_pixels)."""
    path = Path(path)
    if path.is_dir():
        raise NotABreastImageError(f"{path} is a folder; load_image reads one file")
    return read_pixels(scan_images([path], skip_non_images=False)[0], workers=workers)


def load_images(paths: Iterable[str | Path], *, workers: int = 1) -> list[BreastImage]:
    """Every breast image in files/folders; single-frame DBT slices become one volume per
    series; non-image objects are skipped; unusable images raise (before any decoding).
    ``workers``: processes decoding compressed frames (see read_pixels)."""
    headers = scan_images(paths)
    if workers <= 1:
        return [read_pixels(h) for h in headers]
    with decode_pool(workers) as pool:  # one pool for all the images
        return [read_pixels(h, workers=workers, executor=pool) for h in headers]
