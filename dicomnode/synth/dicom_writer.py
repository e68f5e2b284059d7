"""DICOM objects of a synthetic combo exam, as a PACS would hold them.

- DBT: Breast Tomosynthesis Image (enhanced multi-frame), geometry in the shared or the
  per-frame functional groups; or, for the "single-frame" layout, one Digital Mammography
  X-Ray Image (For Presentation) per slice with Image Plane attributes (position, orientation,
  thickness) added, as older vendor exports do. DX was chosen over Secondary Capture because it
  is what mammography viewers hang and it carries laterality, view and pixel spacing as type 1;
  the plane attributes are standard attributes outside that IOD (dciodvfy warns, no error).
- FFDM: Digital Mammography X-Ray Image For Presentation, ImageType ORIGINAL\\PRIMARY.
- Synthetic 2D: the same SOP class, ImageType DERIVED\\PRIMARY, a Source Image Sequence naming
  the DBT instance(s) and a SeriesDescription "Synthetic 2D".

One patient, study and Frame of Reference for the whole exam. Patient orientation follows the
mammography convention (PS3.3 C.8.11.7.1.3 / PS3.17 mammography views): the column direction
points to the nipple (A for a left breast whose chest wall is at the left edge, P for a right
breast), the row direction to the patient's right/left (CC) or foot-and-side (MLO).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import JPEG2000LosslessEncoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from dicomnode import __version__
from dicomnode.synth.options import DBT_PIXEL_MM, FFDM_PIXEL_MM, SLICE_MM

MANUFACTURER = "dicomnode"
MODEL_NAME = "dicomnode synth"
DEVICE_SERIAL = "SYNTH-0001"


@dataclass(frozen=True)
class VendorStyle:
    """How one (fictional) vendor writes its headers: the differences a node meets in real
    archives, without naming real manufacturers."""

    manufacturer: str
    model_name: str
    serial: str
    voi_lut_function: str = "LINEAR"  # projections: LINEAR or SIGMOID
    monochrome1: bool = False  # projections stored inverted (bright = less attenuation)
    detector_type: str = "DIRECT"
    window_explanation: str = "BREAST"


VENDOR_STYLES = {
    "dicomnode": VendorStyle(MANUFACTURER, MODEL_NAME, DEVICE_SERIAL),
    "style-a": VendorStyle("Synthetic Vendor A", "SVA Tomo 3000", "SVA-0042",
                           voi_lut_function="SIGMOID", window_explanation="NORMAL"),
    "style-b": VendorStyle("Synthetic Vendor B", "SVB Mammo DR", "SVB-1187", monochrome1=True,
                           detector_type="SCINTILLATOR", window_explanation="STANDARD"),
    "style-c": VendorStyle("Synthetic Vendor C", "SVC Breast 3D", "SVC-7",
                           detector_type="SCINTILLATOR", window_explanation="DEFAULT"),
}
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
BREAST_CODE = ("76752008", "SCT", "Breast")
TRANSFER_SYNTAX_UIDS = {"explicit": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless}
MLO_ANGLE_DEG = 45.0
SCAN_MS = 3700.0  # one tomosynthesis sweep: every slice comes from the whole sweep


@dataclass(frozen=True)
class StudyContext:
    patient_name: str
    patient_id: str
    patient_birth_date: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    frame_of_reference_uid: str


@dataclass(frozen=True)
class ImageContext:
    study: StudyContext
    laterality: str  # "L" | "R"
    view: str  # "CC" | "MLO"
    series_uid: str
    series_number: int
    series_description: str
    sop_uid: str
    instance_number: int
    vendor: str = "dicomnode"  # a VENDOR_STYLES key


def orientation(laterality: str, view: str) -> tuple[list[float], list[str]]:
    """ImageOrientationPatient (LPS) and PatientOrientation of an image whose chest wall is at
    the left edge for L and the right edge for R (the mammography hanging convention)."""
    toward_nipple = [0.0, -1.0, 0.0] if laterality == "L" else [0.0, 1.0, 0.0]  # A or P
    row = "A" if laterality == "L" else "P"
    if view == "CC":
        # Top of the image is lateral: going down is towards the other side of the patient.
        down = [-1.0, 0.0, 0.0] if laterality == "L" else [1.0, 0.0, 0.0]
        col = "R" if laterality == "L" else "L"
    else:
        a = math.radians(MLO_ANGLE_DEG)
        side = -1.0 if laterality == "L" else 1.0
        down = [side * math.sin(a), 0.0, -math.cos(a)]
        col = "FR" if laterality == "L" else "FL"
    return toward_nipple + down, [row, col]


def frame_positions(laterality: str, view: str, slices: int) -> list[list[float]]:
    """ImagePositionPatient of each DBT slice: one SLICE_MM apart along the plane normal."""
    iop, _ = orientation(laterality, view)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([90.0 if laterality == "L" else -90.0, -20.0, 1200.0])
    return [[round(float(v), 4) for v in origin + k * SLICE_MM * normal] for k in range(slices)]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _view_code(view: str) -> Sequence:
    value, meaning = VIEW_CODES[view]
    item = _code(value, "SCT", meaning)
    item.ViewModifierCodeSequence = Sequence()
    return Sequence([item])


def _window(pixels: np.ndarray) -> tuple[float, float]:
    sample = pixels[..., ::4, ::4]
    floor = float(np.percentile(sample, 5))
    breast = sample[sample > floor + 1]
    if breast.size == 0:
        return float(sample.mean()) + 1, 2.0
    lo, hi = (float(v) for v in np.percentile(breast, [0.5, 99.5]))
    width = max(hi - lo, 2.0)
    return round(lo + width / 2), round(width)


def _common(ctx: ImageContext, sop_class: str) -> Dataset:
    s = ctx.study
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ctx.sop_uid
    ds.InstanceCreationDate = s.study_date
    ds.InstanceCreationTime = s.study_time
    ds.StudyDate = s.study_date
    ds.StudyTime = s.study_time
    ds.SeriesDate = s.study_date
    ds.SeriesTime = s.study_time
    ds.ContentDate = s.study_date
    ds.ContentTime = s.study_time
    ds.AccessionNumber = s.accession_number
    ds.Modality = "MG"
    style = VENDOR_STYLES[ctx.vendor]
    ds.Manufacturer = style.manufacturer
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic breast screening (DBT + FFDM + synthetic 2D)"
    ds.SeriesDescription = ctx.series_description
    ds.ManufacturerModelName = style.model_name
    ds.PatientName = s.patient_name
    ds.PatientID = s.patient_id
    ds.PatientBirthDate = s.patient_birth_date
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.DeviceSerialNumber = style.serial
    ds.SoftwareVersions = __version__
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = ctx.series_uid
    ds.StudyID = s.study_id
    ds.SeriesNumber = ctx.series_number
    ds.InstanceNumber = ctx.instance_number
    ds.FrameOfReferenceUID = s.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageLaterality = ctx.laterality
    ds.AcquisitionContextSequence = Sequence()
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def _pixel_module(ds: Dataset, rows: int, cols: int, bits: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0


def dbt_enhanced(ctx: ImageContext, volume: np.ndarray, bits: int, geometry: str) -> Dataset:
    """Breast Tomosynthesis Image; `geometry` "shared" or "per-frame" places the plane
    orientation and pixel measures. Pixel data is attached by `write`."""
    ds = _common(ctx, BreastTomosynthesisImageStorage)
    slices, rows, cols = volume.shape
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "TOMOSYNTHESIS"
    ds.ContentQualification = "PRODUCT"
    iop, patient_orientation = orientation(ctx.laterality, ctx.view)
    ds.PatientOrientation = patient_orientation
    ds.ViewCodeSequence = _view_code(ctx.view)
    ds.BreastImplantPresent = "NO"
    _pixel_module(ds, rows, cols, bits)
    ds.NumberOfFrames = slices

    dim_uid = ctx.series_uid + ".1"
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    index = Dataset()
    index.DimensionOrganizationUID = dim_uid
    index.DimensionIndexPointer = 0x00200032  # ImagePositionPatient
    index.FunctionalGroupPointer = 0x00209113  # PlanePositionSequence
    index.DimensionDescriptionLabel = "Slice position"
    ds.DimensionIndexSequence = Sequence([index])
    ds.DimensionOrganizationType = "3D"

    measures = Dataset()
    measures.PixelSpacing = [DBT_PIXEL_MM, DBT_PIXEL_MM]
    measures.SliceThickness = SLICE_MM
    measures.SpacingBetweenSlices = SLICE_MM
    plane = Dataset()
    plane.ImageOrientationPatient = [round(v, 6) for v in iop]
    center, width = _window(volume)
    voi = Dataset()
    voi.WindowCenter = center
    voi.WindowWidth = width
    voi.WindowCenterWidthExplanation = "BREAST"
    transform = Dataset()
    transform.RescaleIntercept = 0
    transform.RescaleSlope = 1
    transform.RescaleType = "US"
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = Sequence([_code(*BREAST_CODE)])
    anatomy.FrameLaterality = ctx.laterality
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "TOMOSYNTHESIS"

    shared = Dataset()
    shared.FrameAnatomySequence = Sequence([anatomy])
    shared.FrameVOILUTSequence = Sequence([voi])
    shared.PixelValueTransformationSequence = Sequence([transform])
    if geometry == "shared":
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    per_frame = []
    for k, position in enumerate(frame_positions(ctx.laterality, ctx.view, slices)):
        item = Dataset()
        content = Dataset()
        acquired = ctx.study.study_date + ctx.study.study_time
        content.FrameAcquisitionDateTime = acquired
        content.FrameReferenceDateTime = acquired
        content.FrameAcquisitionDuration = SCAN_MS
        content.DimensionIndexValues = [k + 1]
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        item.FrameContentSequence = Sequence([content])
        pos = Dataset()
        pos.ImagePositionPatient = position
        item.PlanePositionSequence = Sequence([pos])
        item.XRay3DFrameTypeSequence = Sequence([_copy(frame_type)])
        if geometry != "shared":
            item.PixelMeasuresSequence = Sequence([_copy(measures)])
            item.PlaneOrientationSequence = Sequence([_copy(plane)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def _copy(item: Dataset) -> Dataset:
    out = Dataset()
    for elem in item:
        out.add(elem)
    return out


def to_shared_geometry(ds: Dataset) -> Dataset:
    """A view of a per-frame-geometry DBT with orientation and measures moved to the shared
    groups (what highdicom needs to build a SEG); the original is not modified."""
    out = Dataset()
    for elem in ds:
        if elem.keyword not in ("SharedFunctionalGroupsSequence",
                                "PerFrameFunctionalGroupsSequence", "PixelData"):
            out.add(elem)
    shared = _copy(ds.SharedFunctionalGroupsSequence[0])
    first = ds.PerFrameFunctionalGroupsSequence[0]
    for kw in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if kw in first:
            setattr(shared, kw, getattr(first, kw))
    out.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        new = Dataset()
        new.FrameContentSequence = item.FrameContentSequence
        new.PlanePositionSequence = item.PlanePositionSequence
        new.XRay3DFrameTypeSequence = item.XRay3DFrameTypeSequence
        frames.append(new)
    out.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return out


def dbt_slice(ctx: ImageContext, frame: np.ndarray, bits: int, k: int,
              window: tuple[float, float]) -> Dataset:
    """One DBT slice of the single-frame layout (Digital Mammography X-Ray, For Presentation)."""
    ds = _projection_common(ctx, frame, bits, DBT_PIXEL_MM, window)
    ds.ImageType = ["DERIVED", "PRIMARY", "", "TOMOSYNTHESIS"]
    ds.DerivationDescription = "Tomosynthesis reconstruction, one slice per instance"
    iop, _ = orientation(ctx.laterality, ctx.view)
    ds.ImageOrientationPatient = [round(v, 6) for v in iop]
    ds.ImagePositionPatient = frame_positions(ctx.laterality, ctx.view, k + 1)[k]
    ds.SliceThickness = SLICE_MM
    ds.SpacingBetweenSlices = SLICE_MM
    ds.SliceLocation = round(k * SLICE_MM, 4)
    return ds


def projection_image(ctx: ImageContext, pixels: np.ndarray, bits: int, kind: str,
                     thickness_mm: float, sources: list[tuple[str, str]] | None = None
                     ) -> Dataset:
    """FFDM (`kind` "ffdm") or synthetic 2D ("s2d", derived from `sources`: (class, instance)).
    `pixels` are in the MONOCHROME2 sense; a MONOCHROME1 vendor style stores them inverted
    (see `stored_pixels`)."""
    spacing = FFDM_PIXEL_MM if kind == "ffdm" else DBT_PIXEL_MM
    ds = _projection_common(ctx, pixels, bits, spacing, _window(pixels))
    style = VENDOR_STYLES[ctx.vendor]
    ds.VOILUTFunction = style.voi_lut_function
    ds.DetectorType = style.detector_type
    ds.WindowCenterWidthExplanation = style.window_explanation
    if style.monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PresentationLUTShape = "INVERSE"  # required with MONOCHROME1 (DX, PS3.3 C.8.11.6)
        ds.PixelIntensityRelationshipSign = -1
        ds.WindowCenter = (2**bits - 1) - ds.WindowCenter
    ds.BodyPartThickness = round(thickness_mm, 1)
    if kind == "ffdm":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    else:
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.DerivationDescription = "Synthetic 2D mammogram computed from the tomosynthesis volume"
        refs = []
        for sop_class, sop_instance in sources or []:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_instance
            ref.PurposeOfReferenceCodeSequence = Sequence([
                _code("121322", "DCM", "Source image for image processing operation")])
            refs.append(ref)
        ds.SourceImageSequence = Sequence(refs)
    return ds


def stored_pixels(ctx: ImageContext, pixels: np.ndarray, bits: int) -> np.ndarray:
    """The projection's pixel values as its vendor style stores them."""
    if VENDOR_STYLES[ctx.vendor].monochrome1:
        return (np.uint16(2**bits - 1) - pixels).astype(np.uint16)
    return pixels


def _projection_common(ctx: ImageContext, pixels: np.ndarray, bits: int, spacing: float,
                       window: tuple[float, float]) -> Dataset:
    ds = _common(ctx, DigitalMammographyXRayImageStorageForPresentation)
    ds.PresentationIntentType = "FOR PRESENTATION"
    _, patient_orientation = orientation(ctx.laterality, ctx.view)
    ds.PatientOrientation = patient_orientation
    ds.AnatomicRegionSequence = Sequence([_code(*BREAST_CODE)])
    ds.ViewCodeSequence = _view_code(ctx.view)
    ds.OrganExposed = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.BreastImplantPresent = "NO"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = window
    ds.WindowCenterWidthExplanation = "BREAST"
    ds.VOILUTFunction = "LINEAR"
    rows, cols = pixels.shape
    _pixel_module(ds, rows, cols, bits)
    return ds


def write(ds: Dataset, pixels: np.ndarray, path: Path, transfer_syntax: str) -> None:
    """Attach `pixels` (uint16) in the transfer syntax and write a Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if "PixelData" in ds:
        del ds.PixelData
    if transfer_syntax == "j2k":
        _write_j2k(ds, pixels, path)
        return
    # Native pixel data is the last element: write the rest with pydicom, then append Pixel
    # Data straight from the array, sparing a full-size bytes copy of a DBT volume.
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    data = np.ascontiguousarray(pixels, dtype="<u2")
    with path.open("ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, data.nbytes))
        fh.write(memoryview(data).cast("B"))


def _write_j2k(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
    """Encapsulated JPEG 2000 lossless, encoded and appended one frame at a time (PS3.5
    A.4: undefined-length Pixel Data, empty Basic Offset Table, one fragment per frame), so a
    DBT volume is never held twice in memory."""
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    frames = pixels if pixels.ndim == 3 else pixels[None]
    options = dict(rows=frames.shape[1], columns=frames.shape[2], samples_per_pixel=1,
                   bits_allocated=16, bits_stored=int(ds.BitsStored), pixel_representation=0,
                   photometric_interpretation="MONOCHROME2", number_of_frames=1)
    item = struct.Struct("<HHI")
    with path.open("ab") as fh, quiet_logger("openjpeg"):  # an INFO line per frame otherwise
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        fh.write(item.pack(0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        for frame in frames:
            encoded = JPEG2000LosslessEncoder.encode(np.ascontiguousarray(frame), **options)
            if len(encoded) % 2:
                encoded += b"\x00"
            fh.write(item.pack(0xFFFE, 0xE000, len(encoded)))
            fh.write(encoded)
        fh.write(item.pack(0xFFFE, 0xE0DD, 0))


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Raise a chatty library logger to WARNING for the duration."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
