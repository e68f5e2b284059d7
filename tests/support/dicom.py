"""Small breast DICOM files written directly with pydicom, for loader and CLI tests.

Each writer takes the stored pixel values so a test can compare what loads with what
was written, and options for the cases a loader must handle (geometry in shared or
per-frame groups, shuffled single-frame slices, MONOCHROME1, missing laterality, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SegmentationStorage,
    generate_uid,
)

DBT = BreastTomosynthesisImageStorage
MAMMO = DigitalMammographyXRayImageStorageForPresentation
CT = CTImageStorage
SEG = SegmentationStorage
VIEW = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}


def phantom(depth: int = 5, rows: int = 64, cols: int = 48, laterality: str = "L",
            seed: int = 0, bits: int = 12) -> np.ndarray:
    """(D, H, W) uint16: a half-ellipse breast on the chest-wall edge (left for L, as
    displayed) with random texture, a denser spot that moves with the slice, background 0."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:rows, 0:cols]
    inside = ((rr - rows / 2) / (rows * 0.42)) ** 2 + (cc / (cols * 0.7)) ** 2 <= 1
    top = (1 << bits) - 1
    vol = np.zeros((depth, rows, cols), dtype=np.uint16)
    for d in range(depth):
        tissue = rng.integers(top // 4, top // 2, size=(rows, cols))
        spot = ((rr - rows * 0.4 - d) ** 2 + (cc - cols * 0.3) ** 2) <= 9
        tissue = np.where(spot, top - 5, tissue)
        vol[d] = np.where(inside, tissue, 0)
    if laterality == "R":
        vol = vol[:, :, ::-1].copy()
    return vol


def _meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _base(sop_class: str, study_uid: str | None = None, series_uid: str | None = None,
          modality: str = "MG") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "TEST"
    ds.PatientName = "Test^Breast"
    ds.file_meta = _meta(sop_class, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return ds


def _pixels(ds: Dataset, array: np.ndarray, bits: int = 12,
            photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(array.shape[-2]), int(array.shape[-1])
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    dtype = np.uint8 if bits <= 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(array, dtype=dtype).tobytes()


def _view(ds: Dataset, view: str | None) -> None:
    if view:
        item = Dataset()
        item.CodeValue, item.CodeMeaning = VIEW[view]
        item.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = Sequence([item])
        ds.ViewPosition = view


def _item(**values) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced_dbt(path: Path, volume: np.ndarray, laterality: str | None = "L",
                       view: str | None = "CC", geometry: str = "shared",
                       laterality_in: str = "frame", descending: bool = False,
                       photometric: str = "MONOCHROME2", rescale: tuple[float, float] | None
                       = None, transfer_syntax: str = ExplicitVRLittleEndian,
                       spacing: tuple[float, float] = (0.1, 0.1), **extra) -> Dataset:
    """An enhanced multi-frame Breast Tomosynthesis object. geometry "shared": orientation
    and pixel measures in the shared groups; "per-frame": everything per frame.
    laterality_in: "frame" (FrameLaterality, shared), "image" (ImageLaterality) or
    "series" (Laterality). descending: frame positions decrease along the normal."""
    depth = volume.shape[0]
    ds = _base(DBT)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.NumberOfFrames = depth
    ds.BodyPartExamined = "BREAST"
    _view(ds, view)
    orientation = _item(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    measures = _item(PixelSpacing=list(spacing), SliceThickness=1.0)
    anatomy = _item(FrameLaterality=laterality) if laterality else None
    if laterality and laterality_in == "image":
        ds.ImageLaterality = laterality
    if laterality and laterality_in == "series":
        ds.Laterality = laterality
    shared = Dataset()
    if geometry == "shared":
        shared.PlaneOrientationSequence = Sequence([orientation])
        shared.PixelMeasuresSequence = Sequence([measures])
    if anatomy is not None and laterality_in == "frame":
        shared.FrameAnatomySequence = Sequence([anatomy])
    if rescale:
        shared.PixelValueTransformationSequence = Sequence([_item(
            RescaleSlope=rescale[0], RescaleIntercept=rescale[1], RescaleType="US")])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    normal = np.cross([0, 1, 0], [0, 0, -1])
    for i in range(depth):
        z = (depth - 1 - i) if descending else i
        group = Dataset()
        group.PlanePositionSequence = Sequence([_item(
            ImagePositionPatient=[float(v) for v in normal * z + np.array([0.0, -5.0, 10.0])])])
        if geometry == "per-frame":
            group.PlaneOrientationSequence = Sequence([_item(
                ImageOrientationPatient=[0, 1, 0, 0, 0, -1])])
            group.PixelMeasuresSequence = Sequence([_item(
                PixelSpacing=list(spacing), SliceThickness=1.0)])
        group.FrameContentSequence = Sequence([_item(FrameAcquisitionNumber=1)])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    for key, value in extra.items():
        setattr(ds, key, value)
    _pixels(ds, volume, photometric=photometric)
    _save(ds, path, transfer_syntax)
    return ds


def write_slice_series(folder: Path, volume: np.ndarray, laterality: str = "L",
                       view: str = "MLO", shuffle_seed: int | None = 1,
                       instance_numbers: bool = True, sizes: list[tuple[int, int]] | None
                       = None, transfer_syntax: str = ExplicitVRLittleEndian,
                       classic: bool = False) -> list[Dataset]:
    """A DBT as single-frame Breast Tomosynthesis objects, one per slice, in one series.
    File names are shuffled relative to slice order (shuffle_seed None keeps them).
    classic: Digital Mammography objects (ImageType ...TOMOSYNTHESIS) with the plane
    attributes at the top level, as older vendor exports (and dicomnode synth) write."""
    depth = volume.shape[0]
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    names = list(range(depth))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(names)
    written = []
    for i in range(depth):
        ds = _base(MAMMO if classic else DBT, study, series)
        ds.FrameOfReferenceUID = frame_of_ref
        ds.ImageLaterality = laterality
        _view(ds, view)
        if instance_numbers:
            ds.InstanceNumber = i + 1
        if classic:
            ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS"]
            ds.SeriesDescription = "Tomosynthesis slices"
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
            ds.PixelSpacing = [0.1, 0.1]
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
            ds.NumberOfFrames = 1
            shared = Dataset()
            shared.PlaneOrientationSequence = Sequence([_item(
                ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
            shared.PixelMeasuresSequence = Sequence([_item(PixelSpacing=[0.1, 0.1],
                                                           SliceThickness=1.0)])
            ds.SharedFunctionalGroupsSequence = Sequence([shared])
            ds.PerFrameFunctionalGroupsSequence = Sequence([_item(PlanePositionSequence=Sequence(
                [_item(ImagePositionPatient=[0.0, 0.0, float(i)])]))])
        image = volume[i]
        if sizes:
            h, w = sizes[i % len(sizes)]
            image = np.zeros((h, w), dtype=volume.dtype)
        _pixels(ds, image)
        _save(ds, folder / f"img_{names[i]:03d}.dcm", transfer_syntax)
        written.append(ds)
    return written


def write_mammo(path: Path, image: np.ndarray, laterality: str | None = "L",
                view: str | None = "CC", synthetic: bool = False,
                photometric: str = "MONOCHROME2", bits: int = 12,
                rescale: tuple[float, float] | None = None,
                transfer_syntax: str = ExplicitVRLittleEndian, sop_class: str = MAMMO,
                modality: str = "MG", body_part: str = "BREAST", pixels: bool = True,
                **extra) -> Dataset:
    """A single-frame Digital Mammography image: FFDM, or synthetic 2D (DERIVED, source DBT)."""
    ds = _base(sop_class, modality=modality)
    ds.BodyPartExamined = body_part
    if laterality:
        ds.ImageLaterality = laterality
    _view(ds, view)
    ds.PixelSpacing = [0.07, 0.07]
    if synthetic:
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SourceImageSequence = Sequence([_item(ReferencedSOPClassUID=DBT,
                                                 ReferencedSOPInstanceUID=generate_uid())])
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for key, value in extra.items():
        setattr(ds, key, value)
    if pixels:
        _pixels(ds, image, bits=bits, photometric=photometric)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = image.shape[-2:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    _save(ds, path, transfer_syntax)
    return ds


def write_seg_like(path: Path) -> Dataset:
    """A non-image object (Segmentation SOP class, minimal) that loaders must skip."""
    ds = _base(SEG, modality="SEG")
    _pixels(ds, np.zeros((1, 8, 8), dtype=np.uint8), bits=8)
    _save(ds, path, ExplicitVRLittleEndian)
    return ds


__all__ = ["JPEG2000Lossless", "phantom", "write_enhanced_dbt", "write_mammo",
           "write_seg_like", "write_slice_series"]
