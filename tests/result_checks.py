"""Reading returned result objects as a radiologist would (imported by the round-trip tests):
the marks of a Mammography CAD SR, its summary code, and the finding-coded measurement
groups of a TID 1500 SR."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicomnode.results.common import SEGMENT_PROPERTIES

SR = "1.2.840.10008.5.1.4.1.1.88.34"
CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
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


def _named(item: Dataset, concept: tuple[str, str]) -> list[Dataset]:
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
    (summary,) = _named(ds, ("111017", "DCM"))
    return code(summary, "ConceptCodeSequence"), len(_named(summary, ("111034", "DCM")))


def cad_marks(ds: Dataset) -> list[Mark]:
    """Every Single Image Finding, standing alone or part of a Composite Feature."""
    (library,) = _named(ds, ("111028", "DCM"))
    (summary,) = _named(ds, ("111017", "DCM"))
    findings = []
    for impression in _named(summary, ("111034", "DCM")):
        findings += _named(impression, ("111059", "DCM"))
        for composite in _named(impression, ("111015", "DCM")):
            findings += _named(composite, ("111059", "DCM"))
    out = []
    for finding in findings:
        (center,) = _named(finding, ("111010", "DCM"))
        position = list(center.ContentSequence[0].ReferencedContentItemIdentifier)
        ref = library.ContentSequence[int(position[-1]) - 1].ReferencedSOPSequence[0]
        frame = ref.get("ReferencedFrameNumber")
        col, row = (float(v) for v in center.GraphicData)
        probability = _named(finding, ("111047", "DCM"))
        (intent,) = _named(finding, ("111056", "DCM"))
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
    (measurements,) = _named(ds, ("126010", "DCM"))
    out = []
    for group in _named(measurements, ("125007", "DCM")):
        (finding,) = _named(group, ("121071", "DCM"))
        if code(finding, "ConceptCodeSequence") not in FLAGGED_FINDINGS:
            continue
        (tracking,) = _named(group, ("112039", "DCM"))
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
