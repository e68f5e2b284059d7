"""Ground-truth lesion masks as DICOM SEG (highdicom), one per image.

Two segments, always described (a normal image's SEG is empty but says what it would hold):
1 benign, 2 malignant; BINARY. A DBT SEG holds only the frames that contain a lesion, each
referencing its source frame (or, for the single-frame layout, its source instance).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.synth.dicom_writer import DEVICE_SERIAL, MANUFACTURER, MODEL_NAME, quiet_logger
from gmic.classes import BENIGN_SEGMENT, MALIGNANT_SEGMENT

SEGMENT_LABELS = {BENIGN_SEGMENT: "Benign lesion", MALIGNANT_SEGMENT: "Malignant lesion"}
_PROPERTY_TYPES = {
    BENIGN_SEGMENT: hd.sr.CodedConcept("3898006", "SCT", "Neoplasm, benign"),
    MALIGNANT_SEGMENT: hd.sr.CodedConcept("86049000", "SCT", "Malignant neoplasm, primary"),
}


def _segments() -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="dicomnode synth", version=__version__,
        family=codes.cid7162.ArtificialIntelligence)
    out = []
    for number, label in SEGMENT_LABELS.items():
        out.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_PROPERTY_TYPES[number],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Breast],
        ))
    return out


def build_seg(sources: list[Dataset], labels: np.ndarray | dict[int, np.ndarray],
              series_uid: str, sop_uid: str, content_date: str, content_time: str) -> Dataset:
    """SEG of `labels` (0/1/2) on `sources`.

    `labels` is a 2D array for a single-frame image, or {frame index: 2D array} for DBT: a
    multi-frame source (one dataset) or a series of single-frame slices (one dataset per slice).
    """
    positions = None
    if isinstance(labels, dict):
        frames = sorted(k for k, m in labels.items() if m.any())
        if len(sources) == 1:
            all_positions = _frame_positions(sources[0])
        else:
            all_positions = [_slice_position(ds) for ds in sources]
        if not frames:  # normal image: one empty frame on the first slice
            frames = [0]
        positions = [all_positions[k] for k in frames]
        rows, cols = sources[0].Rows, sources[0].Columns
        array = np.stack([labels.get(k, np.zeros((rows, cols), np.uint8)) for k in frames])
    else:
        array = labels[None]
    with quiet_logger("highdicom"):  # INFO line per copied module otherwise
        seg = _segmentation(sources, array, series_uid, sop_uid, positions)
    if not isinstance(labels, dict):
        # A projection has no slices: the SEG's pixel measures take the compressed breast
        # thickness, and it needs the source's patient orientation (no plane position).
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        measures.SliceThickness = sources[0].get("BodyPartThickness", 1.0)
        seg.PatientOrientation = sources[0].PatientOrientation
    # highdicom stamps the creation time and a random dimension organisation UID; ground
    # truth must be byte-identical per seed.
    dimension_uid = sop_uid + ".1"
    for item in list(seg.get("DimensionOrganizationSequence", [])) + list(
            seg.get("DimensionIndexSequence", [])):
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = content_date + content_time
    for kw in ("ContentDate", "SeriesDate", "InstanceCreationDate"):
        if kw in seg:
            setattr(seg, kw, content_date)
    for kw in ("ContentTime", "SeriesTime", "InstanceCreationTime"):
        if kw in seg:
            setattr(seg, kw, content_time)
    return seg


def _segmentation(sources: list[Dataset], array: np.ndarray, series_uid: str, sop_uid: str,
                  positions: list[hd.PlanePositionSequence] | None) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=array.astype(np.uint8, copy=False),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(),
        series_instance_uid=series_uid,
        series_number=100,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number=DEVICE_SERIAL,
        series_description="Lesion ground truth",
        content_label="LESIONS",
        content_description="Synthetic ground truth: benign and malignant findings",
        plane_positions=positions,
        omit_empty_frames=bool(array.any()),  # a normal image keeps one empty frame
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def _frame_positions(ds: Dataset) -> list[hd.PlanePositionSequence]:
    return [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                     item.PlanePositionSequence[0].ImagePositionPatient)
            for item in ds.PerFrameFunctionalGroupsSequence]


def _slice_position(ds: Dataset) -> hd.PlanePositionSequence:
    return hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, ds.ImagePositionPatient)


def write_seg(seg: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
