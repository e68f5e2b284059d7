"""Result objects in the tests: building them, and reading them back.

Building (the tests/test_results_*.py): small synthetic studies (one per DBT layout/geometry,
generated once per session) and ImageAnalysis objects built from them with a hand-made
saliency: a Gaussian blob at a ground-truth finding, strongest for the finding's class, on
the finding's slice.

Reading (the round-trip tests of the node): returned result objects read as a radiologist
would: the marks of a Mammography CAD SR, its summary code, and the finding-coded measurement
groups of a TID 1500 SR.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, MammographyCADSRStorage

from dicomnode.pipeline.analysis import (
    AlgorithmIdentity,
    AttendedRegion,
    BreastAnalysis,
    ClassProbabilities,
    ImageAnalysis,
)
from dicomnode.pipeline.images import load_image, load_images
from dicomnode.results.common import SEGMENT_PROPERTIES
from gmic.preprocess import preprocess
from tests.support.synth import synth_study

ALGORITHM = AlgorithmIdentity(name="3D-GMIC", version="0.0.test", checkpoint_name="builtin:dbt",
                              checkpoint_sha256="0123456789abcdef" * 4,
                              description="test weights")
SEED = 1  # seed 1's first study is malignant: every image has findings
SALIENCY_DOWN = 8  # saliency map pixels per model-input pixel (the real model: 64)
PEAK = 0.9  # blob peak of the finding's class; the other class gets a third of it
LAYOUTS = {"enhanced": ("enhanced", "shared"), "per-frame": ("enhanced", "per-frame"),
           "single-frame": ("single-frame", "shared")}


def study_root(tmp_path_factory: pytest.TempPathFactory, layout: str) -> Path:
    """The folder of one small synthetic study (generated once per session and layout)."""
    dbt_layout, geometry = LAYOUTS[layout]
    modalities = ("dbt", "ffdm", "s2d") if layout == "enhanced" else ("dbt",)
    return synth_study(tmp_path_factory, studies=1, size="small", seed=SEED,
                       dbt_layout=dbt_layout, dbt_geometry=geometry, modalities=modalities)


def findings(root: Path, modality: str) -> list[dict]:
    return [f for f in json.loads((root / "findings.json").read_text())
            if f["modality"] == modality]


def make_analysis(root: Path, finding: dict, *, peak: float = PEAK,
                  regions: list[AttendedRegion] | None = None) -> ImageAnalysis:
    """An ImageAnalysis of the image holding `finding` with a saliency blob on it."""
    path = root / finding["path"]
    image = load_images([path])[0] if path.is_dir() else load_image(path)
    depth, rows, cols = image.shape
    _, transform = preprocess(image.pixels, image.modality, image.laterality,
                              input_size=(rows, cols))
    h, w = rows // SALIENCY_DOWN, cols // SALIENCY_DOWN
    saliency = np.zeros((depth, 2, h, w), dtype=np.float32)
    frame = finding["frame"] or 0
    _, r, c = transform.to_model(frame, finding["row"], finding["col"])
    rr, cc = np.mgrid[0:h, 0:w]
    sigma = max(finding["radius_px"], 10.0)
    blob = np.exp(-(((rr + 0.5) * SALIENCY_DOWN - r) ** 2 + ((cc + 0.5) * SALIENCY_DOWN - c) ** 2)
                  / (2 * sigma ** 2)).astype(np.float32)
    main = 1 if finding["malignant"] else 0
    saliency[frame, main] = peak * blob
    saliency[frame, 1 - main] = peak / 3 * blob
    if regions is None:  # three 256-pixel patches around the finding, clipped to the image
        height, width = min(256, rows), min(256, cols)
        row0 = int(np.clip(finding["row"] - height // 2, 0, rows - height))
        col0 = int(np.clip(finding["col"] - width // 2, 0, cols - width))
        regions = [AttendedRegion(frame_index=min(depth - 1, frame + k), row0=row0, col0=col0,
                                  height=height, width=width, attention=a)
                   for k, a in enumerate((0.6, 0.3, 0.1))]
    return ImageAnalysis(
        image=image, algorithm=ALGORITHM,
        final=ClassProbabilities(benign=0.125, malignant=0.8125),
        global_=ClassProbabilities(benign=0.25, malignant=0.75),
        local=ClassProbabilities(benign=0.0625, malignant=0.875),
        regions=regions, saliency=saliency, transform=transform)


def make_breast(analysis: ImageAnalysis) -> BreastAnalysis:
    return BreastAnalysis(
        laterality=analysis.image.laterality,
        final=ClassProbabilities(benign=0.1875, malignant=0.6875),
        per_modality={analysis.image.modality: ClassProbabilities(benign=0.1875,
                                                                  malignant=0.6875)},
        images=[analysis])


_ANALYSES: dict[tuple[str, str], ImageAnalysis] = {}


def analysis_for(tmp_path_factory: pytest.TempPathFactory, layout: str,
                 modality: str) -> ImageAnalysis:
    """The (cached) analysis of the first image of `modality` with a finding in a study."""
    key = (layout, modality)
    if key not in _ANALYSES:
        root = study_root(tmp_path_factory, layout)
        _ANALYSES[key] = make_analysis(root, findings(root, modality)[0])
    return _ANALYSES[key]


CASES = [
    pytest.param("enhanced", "dbt", id="dbt-enhanced"),
    pytest.param("per-frame", "dbt", id="dbt-per-frame-geometry"),
    pytest.param("single-frame", "dbt", id="dbt-single-frame-series"),
    pytest.param("enhanced", "ffdm", id="ffdm"),
    pytest.param("enhanced", "s2d", id="s2d"),
]


def frame_positions(ds) -> np.ndarray:
    """(frames, 3) ImagePositionPatient of a multi-frame result object."""
    return np.array([g.PlanePositionSequence[0].ImagePositionPatient
                     for g in ds.PerFrameFunctionalGroupsSequence], dtype=np.float64)


def frame_sources(ds) -> list[tuple[str, int | None]]:
    """Per frame: the (SOP instance UID, frame number or None) it was derived from."""
    out = []
    for group in ds.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        frame = ref.get("ReferencedFrameNumber")
        out.append((str(ref.ReferencedSOPInstanceUID), int(frame) if frame else None))
    return out


def slice_of_frames(analysis: ImageAnalysis, ds, factor: int) -> list[int]:
    """For each frame of a result object on a patient-geometry grid: its slice index."""
    spacing = analysis.image.pixel_spacing
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    shift = (factor - 1) / 2 * (spacing[1] * iop[:3] + spacing[0] * iop[3:])
    expected = np.asarray(analysis.image.slice_positions) + shift
    out = []
    for position in frame_positions(ds):
        distance = np.linalg.norm(expected - position, axis=1)
        assert distance.min() < 1e-3, "a frame lies at no slice position"
        out.append(int(np.argmin(distance)))
    return out


def expected_source(analysis: ImageAnalysis, slice_index: int) -> tuple[str, int | None]:
    """(SOP instance UID, frame number or None) a result frame of that slice references."""
    image = analysis.image
    multi_frame = len(set(image.sop_instance_uids)) == 1 and image.shape[0] > 1
    return (image.sop_instance_uids[slice_index],
            image.frame_numbers[slice_index] if multi_frame else None)


# ------------------------------------------------- reading returned result objects

SR = Comprehensive3DSRStorage
CAD_SR = MammographyCADSRStorage
WITH_FINDINGS, WITHOUT_FINDINGS = ("111242", "DCM"), ("111241", "DCM")
# the one dciodvfy warning the TID 1500 SRs keep (docs/viewer.md says why): the project's
# private coding scheme, declared in the Coding Scheme Identification Sequence
PRIVATE_SCHEME_WARNING = ("Warning - Unrecognized defined term <99DCMNODE> for value 1 of "
                          "attribute <Coding Scheme Designator>")
# and on every result object, IHE AIR's Device UID in Contributing Equipment, which this
# dicom3tools' tables do not list there (docs/viewer.md)
DEVICE_UID_WARNINGS = (
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is "
    "a Standard Extended SOP Class")
# The flagged-region groups: the SEG's segment property type as the Finding (one code for
# both classes), the class by the segment label that starts the tracking identifier.
FLAGGED_FINDINGS = {(c.value, c.scheme_designator) for _, c in SEGMENT_PROPERTIES}
FLAGGED_LABELS = [label for label, _ in SEGMENT_PROPERTIES]  # (benign, malignant)


def code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    value = getattr(item, keyword)[0]
    return str(value.CodeValue), str(value.CodingSchemeDesignator)


def named(item: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if "ConceptNameCodeSequence" in c
            and code(c) == concept]


@dataclass(frozen=True)
class Mark:
    """One Single Image Finding of a CAD SR: where its Center is, on which image and frame."""

    sop_instance_uid: str
    frame: int | None  # Referenced Frame Number, None for a single-frame image
    row: float  # pixel centres at integers
    col: float
    probability: float | None  # Probability of cancer, 0-1
    required: bool  # Presentation Required


def cad_summary(ds: Dataset) -> tuple[tuple[str, str], int]:
    """(CAD Processing and Findings Summary code, number of Individual Impressions)."""
    (summary,) = named(ds, ("111017", "DCM"))
    return code(summary, "ConceptCodeSequence"), len(named(summary, ("111034", "DCM")))


def cad_marks(ds: Dataset) -> list[Mark]:
    """Every Single Image Finding, standing alone or part of a Composite Feature."""
    (library,) = named(ds, ("111028", "DCM"))
    (summary,) = named(ds, ("111017", "DCM"))
    findings = []
    for impression in named(summary, ("111034", "DCM")):
        findings += named(impression, ("111059", "DCM"))
        for composite in named(impression, ("111015", "DCM")):
            findings += named(composite, ("111059", "DCM"))
    out = []
    for finding in findings:
        (center,) = named(finding, ("111010", "DCM"))
        position = list(center.ContentSequence[0].ReferencedContentItemIdentifier)
        ref = library.ContentSequence[int(position[-1]) - 1].ReferencedSOPSequence[0]
        frame = ref.get("ReferencedFrameNumber")
        col, row = (float(v) for v in center.GraphicData)
        probability = named(finding, ("111047", "DCM"))
        (intent,) = named(finding, ("111056", "DCM"))
        out.append(Mark(
            sop_instance_uid=str(ref.ReferencedSOPInstanceUID),
            frame=int(frame) if frame is not None else None, row=row - 0.5, col=col - 0.5,
            probability=(float(probability[0].MeasuredValueSequence[0].NumericValue) / 100
                         if probability else None),
            required=code(intent, "ConceptCodeSequence") == ("111150", "DCM")))
    return out


def finding_groups(ds: Dataset) -> list[tuple[int, str]]:
    """(class index, tracking identifier) of each TID 1500 measurement group that claims a
    region the model flags for a class (its Finding is the flagged-region code)."""
    (measurements,) = named(ds, ("126010", "DCM"))
    out = []
    for group in named(measurements, ("125007", "DCM")):
        (finding,) = named(group, ("121071", "DCM"))
        if code(finding, "ConceptCodeSequence") not in FLAGGED_FINDINGS:
            continue
        (tracking,) = named(group, ("112039", "DCM"))
        text = str(tracking.TextValue)
        (cls,) = [i for i, label in enumerate(FLAGGED_LABELS) if text.startswith(label)]
        out.append((cls, text))
    return out


def dciodvfy_complaints(report: str) -> list[str]:
    """dciodvfy's error and warning lines but the explained ones (private scheme, AIR's
    Device UID)."""
    return [line for line in report.splitlines() if line.startswith(("Error", "Warning"))
            and line.rstrip() not in (PRIVATE_SCHEME_WARNING, *DEVICE_UID_WARNINGS)]


def evidence_uids(ds: Dataset) -> set[str]:
    return {str(r.ReferencedSOPInstanceUID)
            for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}


def dataset_differences(a, b, path="") -> list[str]:
    """Where two datasets differ, element by element (sequences item by item)."""
    out = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        name = f"{path}{pydicom.datadict.keyword_for_tag(tag) or tag}"
        if tag not in a or tag not in b:
            out.append(f"{name}: only in {'the first' if tag in a else 'the second'}")
        elif a[tag].VR == "SQ":
            if len(a[tag].value) != len(b[tag].value):
                out.append(f"{name}: {len(a[tag].value)} != {len(b[tag].value)} items")
            else:
                for i, (x, y) in enumerate(zip(a[tag].value, b[tag].value, strict=True)):
                    out += dataset_differences(x, y, f"{name}[{i}].")
        elif a[tag].VR != b[tag].VR or a[tag].value != b[tag].value:
            out.append(f"{name}: differs")
    return out


# what differs between two builds of the same object: the time of building, highdicom's
# new random Dimension Organization UID (keywords, wherever they are)
BUILD_TO_BUILD = {"ContentTime", "InstanceCreationTime", "SeriesTime", "ContentDate",
                  "InstanceCreationDate", "SeriesDate", "ContributionDateTime",
                  "DimensionOrganizationUID"}


def build_differences(a, b) -> list[str]:
    """dataset_differences less those of BUILD_TO_BUILD."""
    return [d for d in dataset_differences(a, b)
            if d.split(":")[0].rsplit(".", 1)[-1] not in BUILD_TO_BUILD]
