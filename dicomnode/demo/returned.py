"""What came back from the node, read from the received DICOM objects only: per source image
its SR (probabilities, attended regions), its two Parametric Maps (saliency) and its SEG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    Comprehensive3DSRStorage,
    MammographyCADSRStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from dicomnode.results.read import SRSummary, read_sr_summary
from dicomnode.results.sr import ATTENDED_REGION, ATTENTION_WEIGHT

PM_LABELS = {"BENIGN_SAL": "benign", "MALIG_SAL": "malignant"}


@dataclass(frozen=True)
class SourceImage:
    """A sent image as the demo knows it: its UID(s) and where its pixels are."""

    sop_instance_uid: str
    modality: str  # dbt | ffdm | s2d
    laterality: str
    view: str
    paths: list[Path]  # one file, or one per slice (single-frame DBT)
    frame_uids: list[str] = field(default_factory=list)  # single-frame DBT: slice UIDs

    @property
    def uids(self) -> set[str]:
        return {self.sop_instance_uid, *self.frame_uids}

    def slice_index(self, sop_instance_uid: str, frame_number: int | None) -> int:
        """0-based slice of a reference (instance + frame number)."""
        if self.frame_uids and sop_instance_uid in self.frame_uids:
            return self.frame_uids.index(sop_instance_uid)
        return max(int(frame_number or 1) - 1, 0)


@dataclass(frozen=True)
class Region:
    """An attended region from the SR: source pixels [row0, row1) x [col0, col1) of a slice."""

    slice_index: int  # 0-based
    row0: float
    col0: float
    row1: float
    col1: float
    attention: float

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col), pixel centres at integers."""
        return (self.row0 + self.row1) / 2 - 0.5, (self.col0 + self.col1) / 2 - 0.5

    def contains(self, row: float, col: float) -> bool:
        return self.row0 - 0.5 <= row < self.row1 - 0.5 and self.col0 - 0.5 <= col < self.col1 - 0.5


@dataclass
class ReturnedImage:
    """The results of one source image."""

    source: SourceImage
    sr_path: Path | None = None
    summary: SRSummary | None = None
    regions: list[Region] = field(default_factory=list)  # highest attention first
    pm_paths: dict[str, Path] = field(default_factory=dict)  # "benign" / "malignant"
    seg_path: Path | None = None

    @property
    def complete(self) -> bool:
        """The SR and the malignant map came back (the benign map is sent on request only:
        [results] parametric_maps)."""
        return self.summary is not None and "malignant" in self.pm_paths


@dataclass
class Returned:
    images: list[ReturnedImage]
    cad_sr: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)  # referenced nothing that was sent


def _code(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _first_int(value: object) -> int | None:
    """The first of a DICOM IS value that may hold one number, several, or none."""
    if value in (None, ""):
        return None
    if isinstance(value, MultiValue):
        return int(value[0]) if len(value) else None
    return int(value)


def _referenced_uids(ds: Dataset) -> set[str]:
    uids = {str(r.ReferencedSOPInstanceUID)
            for s in ds.get("ReferencedSeriesSequence", [])
            for r in s.get("ReferencedInstanceSequence", [])}
    uids |= {str(r.ReferencedSOPInstanceUID)
             for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
             for s in e.get("ReferencedSeriesSequence", [])
             for r in s.get("ReferencedSOPSequence", [])}
    return uids


def read_regions(sr: Dataset, source: SourceImage) -> list[Region]:
    """The attended regions (TID 1410 groups of the SR): their box, slice and weight."""
    region_code = (ATTENDED_REGION.value, ATTENDED_REGION.scheme_designator)
    weight_code = (ATTENTION_WEIGHT.value, ATTENTION_WEIGHT.scheme_designator)
    regions = []
    for section in sr.ContentSequence:
        for group in section.get("ContentSequence", []):
            items = group.get("ContentSequence", [])
            if not any(i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeValue
                       == region_code[0] for i in items):
                continue
            weight = next((float(i.MeasuredValueSequence[0].NumericValue) for i in items
                           if i.ValueType == "NUM" and _code(i) == weight_code), None)
            scoord = next((i for i in items if i.ValueType == "SCOORD"), None)
            if weight is None or scoord is None:
                continue
            xy = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)  # (col, row)
            image = next(i for i in scoord.ContentSequence if i.ValueType == "IMAGE")
            ref = image.ReferencedSOPSequence[0]
            regions.append(Region(
                slice_index=source.slice_index(str(ref.ReferencedSOPInstanceUID),
                                               _first_int(ref.get("ReferencedFrameNumber"))),
                row0=float(xy[:, 1].min()), col0=float(xy[:, 0].min()),
                row1=float(xy[:, 1].max()), col1=float(xy[:, 0].max()), attention=weight))
    return sorted(regions, key=lambda r: -r.attention)


def collect(paths: list[Path], sources: list[SourceImage]) -> Returned:
    """Sort the received objects by the source image they belong to."""
    by_uid: dict[str, ReturnedImage] = {}
    images = []
    for source in sources:
        item = ReturnedImage(source)
        images.append(item)
        for uid in source.uids:
            by_uid[uid] = item
    out = Returned(images)
    for path in sorted(paths):
        ds = dcmread(path, stop_before_pixels=True)
        sop_class = str(ds.SOPClassUID)
        if sop_class == MammographyCADSRStorage:
            out.cad_sr.append(path)
            continue
        owners = {id(by_uid[u]): by_uid[u] for u in _referenced_uids(ds) if u in by_uid}
        if len(owners) != 1:
            out.other.append(path)
            continue
        (item,) = owners.values()
        if sop_class == Comprehensive3DSRStorage:
            sr = dcmread(path)
            item.sr_path, item.summary = path, read_sr_summary(sr)
            item.regions = read_regions(sr, item.source)
        elif sop_class == ParametricMapStorage:
            label = PM_LABELS.get(str(ds.get("ContentLabel", "")))
            if label:
                item.pm_paths[label] = path
        elif sop_class == SegmentationStorage:
            item.seg_path = path
        else:
            out.other.append(path)
    return out


def _frame_source(group: Dataset, source: SourceImage) -> int:
    ref = group.DerivationImageSequence[0].SourceImageSequence[0]
    return source.slice_index(str(ref.ReferencedSOPInstanceUID),
                              _first_int(ref.get("ReferencedFrameNumber")))


def _frames(ds: Dataset) -> np.ndarray:
    array = ds.pixel_array
    return array[np.newaxis] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else array


def read_saliency(path: Path, source: SourceImage, depth: int) -> np.ndarray:
    """A Parametric Map as (depth, rows, cols) float32 in source slice order, real-world
    values. Its grid may be coarser than the source's (an integer multiple, same extent)."""
    ds = dcmread(path)
    frames = _frames(ds).astype(np.float32)
    volume = np.zeros((depth, *frames.shape[1:]), dtype=np.float32)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds \
        else Dataset()
    for i, frame in enumerate(frames):
        group = per_frame[i] if i < len(per_frame) else Dataset()
        mapping = (group.get("RealWorldValueMappingSequence")
                   or shared.get("RealWorldValueMappingSequence"))
        slope, intercept = 1.0, 0.0
        if mapping:
            slope = float(mapping[0].get("RealWorldValueSlope", 1.0))
            intercept = float(mapping[0].get("RealWorldValueIntercept", 0.0))
        index = _frame_source(group, source) if "DerivationImageSequence" in group else i
        if 0 <= index < depth:
            volume[index] = frame * slope + intercept
    return volume


def read_segments(path: Path, source: SourceImage, shape: tuple[int, int, int]
                  ) -> dict[str, np.ndarray]:
    """The SEG's flagged regions as {"benign" | "malignant": (depth, rows, cols) bool}."""
    ds = dcmread(path)
    names = {}
    for segment in ds.SegmentSequence:
        label = str(segment.get("SegmentLabel", "")).lower()
        names[int(segment.SegmentNumber)] = ("malignant" if "malignant" in label else
                                             "benign" if "benign" in label else label)
    masks = {name: np.zeros(shape, dtype=bool) for name in names.values()}
    if int(ds.get("NumberOfFrames", 0) or 0) == 0:
        return masks
    frames = _frames(ds)
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = float(ds.get("MaximumFractionalValue", 1)) / 2 if fractional else 0
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        index = _frame_source(group, source)
        name = names.get(number)
        if name is None or not 0 <= index < shape[0] or frames[i].shape != shape[1:]:
            continue
        masks[name][index] |= frames[i] > threshold
    return masks


def read_source_pixels(source: SourceImage) -> tuple[np.ndarray, Dataset]:
    """The sent image's pixels as (depth, rows, cols) float32, and its (first) header."""
    datasets = [dcmread(p) for p in source.paths]
    arrays = [_frames(ds).astype(np.float32) for ds in datasets]
    return np.concatenate(arrays, axis=0), datasets[0]
