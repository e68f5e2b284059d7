"""Mammography CAD SR (SOP class MammographyCADSRStorage, root TID 4000) of a study.

One document per study, covering the images given (the worker passes the study's DBT
analyses). Content, in the template's order:

- Language (TID 1204);
- Image Library (TID 4020): one entry per analysed image (a multi-frame DBT as a whole;
  each instance of a single-frame series), with Image Laterality (CID 6022), Image View
  (CID 4014, copied from the source's View Code Sequence) and its modifiers, and the pixel
  spacing; plus one entry per (instance, frame) of a multi-frame image that a mark is on,
  with its Referenced Frame Number;
- CAD Processing and Findings Summary (TID 4001), "with findings" exactly when it holds an
  Individual Impression, else "without findings"; its TID 4002 body gives the case's
  probability of cancer (the higher breast) and each breast's in its Impression
  Description;
- one Individual Impression / Recommendation (TID 4003) per lesion the model flags: a
  region of malignant saliency at or above the floor (the last of
  ResultOptions.cad_operating_points), found by :func:`dicomnode.results.findings.
  flagged_regions`. Each is a Single Image Finding (TID 4006, "Mammography breast
  density", the mass-like finding code of CID 6014) on the slice where the region is most
  salient, with its Center (POINT, the peak) and Outline (POLYLINE, the region's box), 2D
  SCOORDs SELECTED FROM (by reference) the Image Library entry of that slice, and its
  Probability of cancer (the region's peak malignant saliency: the global network's
  estimate at that place, not calibrated). Where the CC and MLO views of one breast each
  have a mark at the same depth from the chest wall, the two findings are one lesion: a
  Composite Feature (TID 4004, "Target content items are related spatially", "Feature
  detected on multiple images") inferred from both;
- operating points (TID 4023) are discrete, 1 the most specific: a mark reaches
  operating point n when its peak is at or above the n-th threshold. Marks at
  ResultOptions.cad_presentation_required or a more specific point are "Presentation
  Required" at every level; the others "Presentation Optional" with their CAD Operating
  Point. An image with nothing above the floor has no mark;
- Summary of Detections (TID 4015/4017): Succeeded, one Detection Performed per algorithm,
  referencing (by reference) the whole-image entries it ran on, with the number of
  operating points (Maximum CAD Operating Point) and the one marks are required from
  (Recommended CAD Operating Point); the thresholds are in the Algorithm Parameters;
- Summary of Analyses: Not Attempted (no image-quality or other analyses).

Marks are never SCOORD3D: PS3.3 A.35.5.3 does not allow it in this IOD.
highdicom has no TID 4000 document class, so the header modules are written here.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MammographyCADSRStorage,
    generate_uid,
)

from dicomnode.pipeline.analysis import AlgorithmIdentity, BreastAnalysis, ImageAnalysis
from dicomnode.results.common import (
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    SR_SERIES_OFFSET,
    ResultOptions,
    ResultsError,
    algorithm_parameters,
    building,
    model_name,
    serial_number,
)
from dicomnode.results.findings import (
    FlaggedRegion,
    chest_wall_distance_mm,
    flagged_regions,
    operating_point,
)
from dicomnode.results.geometry import read_sources
from dicomnode.results.sr import _box
from gmic.classes import MALIGNANT

CAD_SR_SERIES_NUMBER = SR_SERIES_OFFSET + 999  # one per study, after the per-image SRs


def _dcm(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, "DCM", meaning)


def _sct(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, "SCT", meaning)


REPORT = _dcm("111036", "Mammography CAD Report")
LANGUAGE = _dcm("121049", "Language of Content Item and Descendants")
ENGLISH_US = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
IMAGE_LIBRARY = _dcm("111028", "Image Library")
IMAGE_LATERALITY = _dcm("111027", "Image Laterality")
IMAGE_VIEW = _dcm("111031", "Image View")
IMAGE_VIEW_MODIFIER = _dcm("111032", "Image View Modifier")
HORIZONTAL_SPACING = _dcm("111026", "Horizontal Pixel Spacing")
VERTICAL_SPACING = _dcm("111066", "Vertical Pixel Spacing")
FINDINGS_SUMMARY = _dcm("111017", "CAD Processing and Findings Summary")
WITH_FINDINGS = _dcm("111242", "All algorithms succeeded; with findings")
WITHOUT_FINDINGS = _dcm("111241", "All algorithms succeeded; without findings")
# CID 6047, where an image of the study could not be analysed (left out by the worker)
PARTLY_WITH_FINDINGS = _dcm("111244", "Not all algorithms succeeded; with findings")
PARTLY_WITHOUT_FINDINGS = _dcm("111243", "Not all algorithms succeeded; without findings")
INDIVIDUAL_IMPRESSION = _dcm("111034", "Individual Impression/Recommendation")
RENDERING_INTENT = _dcm("111056", "Rendering Intent")
PRESENTATION_REQUIRED = _dcm("111150", "Presentation Required: Rendering device is expected to "
                                       "present")
PRESENTATION_OPTIONAL = _dcm("111151", "Presentation Optional: Rendering device may present")
SINGLE_IMAGE_FINDING = _dcm("111059", "Single Image Finding")
DENSITY = _sct("129793001", "Mammography breast density")  # CID 6014/6015: mass-like finding
CAD_OPERATING_POINT = _dcm("111071", "CAD Operating Point")
OPERATING_POINT_UNIT = hd.sr.CodedConcept("{1:n}", "UCUM", "range: 1:n")
ALGORITHM_NAME = _dcm("111001", "Algorithm Name")
ALGORITHM_VERSION = _dcm("111003", "Algorithm Version")
ALGORITHM_PARAMETERS = _dcm("111002", "Algorithm Parameters")
PROBABILITY_OF_CANCER = _dcm("111047", "Probability of cancer")
COMPOSITE_FEATURE = _dcm("111015", "Composite Feature")
COMPOSITE_TYPE = _dcm("111016", "Composite Type")
RELATED_SPATIALLY = _dcm("111154", "Target content items are related spatially")
SCOPE_OF_FEATURE = _dcm("111057", "Scope of Feature")
ON_MULTIPLE_IMAGES = _dcm("111158", "Feature detected on multiple images")
IMPRESSION_DESCRIPTION = _dcm("111033", "Impression Description")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")
MILLIMETER = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
CENTER = _dcm("111010", "Center")
OUTLINE = _dcm("111041", "Outline")
SUMMARY_OF_DETECTIONS = _dcm("111064", "Summary of Detections")
SUMMARY_OF_ANALYSES = _dcm("111065", "Summary of Analyses")
SUCCEEDED = _dcm("111222", "Succeeded")
NOT_ATTEMPTED = _dcm("111225", "Not Attempted")
SUCCESSFUL_DETECTIONS = _dcm("111063", "Successful Detections")
DETECTION_PERFORMED = _dcm("111022", "Detection Performed")
# CID 6022 (PixelMed rejects the generic "Right"/"Left" here)
LATERALITY = {"R": _sct("73056007", "Right breast"), "L": _sct("80248007", "Left breast")}
# CID 4014, when the source has no View Code Sequence
VIEWS = {"CC": _sct("399162004", "cranio-caudal"),
         "MLO": _sct("399368009", "medio-lateral oblique"),
         "ML": _sct("399260004", "medio-lateral"),
         "LM": _sct("399352003", "latero-medial")}
MAX_OPERATING_POINT = _dcm("111072", "Maximum CAD Operating Point")
RECOMMENDED_OPERATING_POINT = _dcm("111092", "Recommended CAD Operating Point")
ARBITRARY_UNIT = hd.sr.CodedConcept("[arb'U]", "UCUM", "arbitrary unit")
OPERATING_POINT_RANGE = hd.sr.CodedConcept("{0:n}", "UCUM", "range:0:n")
# CC and MLO marks of one breast within this depth (distance from the chest wall) of each
# other are taken as one lesion (a Composite Feature).
SAME_LESION_DEPTH_MM = 20.0

_CONTENT_SEQUENCE = 0x0040A730
_ROOT_IMAGE_LIBRARY_POSITION = 2  # root children: Language (1), Image Library (2), ...

Relation = hd.sr.RelationshipTypeValues


def study_result_uid(analyses: Sequence[ImageAnalysis], options: ResultOptions,
                     *labels: object) -> hd.UID:
    """Like common.result_uid, over every image of the document: the same source files,
    weights and options give the same UID on a rerun."""
    entropy = sorted(p.name for a in analyses for p in a.image.source_paths)
    entropy += sorted({a.algorithm.checkpoint_sha256 for a in analyses})
    return hd.UID(str(generate_uid(entropy_srcs=[*entropy, repr(options), *map(str, labels)])))


def _nest(parent: Dataset, children: Sequence[Dataset]) -> Dataset:
    """Append children to an item's Content Sequence. Set as a plain element: highdicom's
    ContentSequence refuses by-reference items (they have no Value Type)."""
    if _CONTENT_SEQUENCE in parent:
        parent[_CONTENT_SEQUENCE].value.extend(children)
    else:
        parent.add_new(_CONTENT_SEQUENCE, "SQ", DicomSequence(list(children)))
    return parent


def _by_reference(relationship: Relation, position: tuple[int, ...]) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship.value
    item.ReferencedContentItemIdentifier = list(position)
    return item


def _algorithm_items(alg: AlgorithmIdentity, options: ResultOptions) -> list[Dataset]:
    """TID 4019: name, version and parameters (checkpoint, weights hash, the operating
    points' thresholds)."""
    params = "; ".join(f"{k}={v}" for k, v in algorithm_parameters(alg).items())
    points = ", ".join(f"{n}: >= {t:g}"
                       for n, t in enumerate(options.cad_operating_points, start=1))
    params += f"; operating points (peak malignant saliency)={points}"
    return [hd.sr.TextContentItem(ALGORITHM_NAME, model_name(alg), Relation.HAS_PROPERTIES),
            hd.sr.TextContentItem(ALGORITHM_VERSION, alg.version or "unknown",
                                  Relation.HAS_PROPERTIES),
            hd.sr.TextContentItem(ALGORITHM_PARAMETERS, params, Relation.HAS_PROPERTIES)]


class _Library:
    """Image Library entries, keyed by (SOP instance UID, frame number or None)."""

    def __init__(self) -> None:
        self.items: list[Dataset] = []
        self.keys: dict[tuple[str, int | None], int] = {}  # -> 1-based position

    def add(self, analysis: ImageAnalysis, src: Dataset, frame: int | None) -> int:
        key = (str(src.SOPInstanceUID), frame)
        if key in self.keys:
            return self.keys[key]
        item = hd.sr.ImageContentItem(
            IMAGE_LIBRARY, referenced_sop_class_uid=str(src.SOPClassUID),
            referenced_sop_instance_uid=str(src.SOPInstanceUID),
            referenced_frame_numbers=frame, relationship_type=Relation.CONTAINS)
        del item.ConceptNameCodeSequence  # TID 4020 row 1: IMAGE without a concept name
        _nest(item, _acquisition_context(analysis, src))
        self.items.append(item)
        self.keys[key] = len(self.items)
        return self.keys[key]

    def position(self, key: tuple[str, int | None]) -> tuple[int, ...]:
        return (1, _ROOT_IMAGE_LIBRARY_POSITION, self.keys[key])


def _acquisition_context(analysis: ImageAnalysis, src: Dataset) -> list[Dataset]:
    """TID 4020 rows 2-4, 11-12: laterality, view (+ modifiers), pixel spacing."""
    image = analysis.image
    items: list[Dataset] = []
    if image.laterality in LATERALITY:
        items.append(hd.sr.CodeContentItem(IMAGE_LATERALITY, LATERALITY[image.laterality],
                                           Relation.HAS_ACQ_CONTEXT))
    view_seq = src.get("ViewCodeSequence")
    view, modifiers = None, []
    if view_seq and view_seq[0].get("CodeValue"):
        code = view_seq[0]
        view = hd.sr.CodedConcept(str(code.CodeValue), str(code.CodingSchemeDesignator),
                                  str(code.get("CodeMeaning", code.CodeValue)))
        modifiers = [hd.sr.CodedConcept(str(m.CodeValue), str(m.CodingSchemeDesignator),
                                        str(m.get("CodeMeaning", m.CodeValue)))
                     for m in code.get("ViewModifierCodeSequence", []) if m.get("CodeValue")]
    elif image.view in VIEWS:
        view = VIEWS[image.view]
    if view is not None:
        view_item = hd.sr.CodeContentItem(IMAGE_VIEW, view, Relation.HAS_ACQ_CONTEXT)
        if modifiers:
            _nest(view_item, [hd.sr.CodeContentItem(IMAGE_VIEW_MODIFIER, m,
                                                    Relation.HAS_CONCEPT_MOD)
                              for m in modifiers])
        items.append(view_item)
    row_mm, col_mm = image.pixel_spacing
    if row_mm > 0 and col_mm > 0:
        items += [hd.sr.NumContentItem(HORIZONTAL_SPACING, float(col_mm), MILLIMETER,
                                       relationship_type=Relation.HAS_ACQ_CONTEXT),
                  hd.sr.NumContentItem(VERTICAL_SPACING, float(row_mm), MILLIMETER,
                                       relationship_type=Relation.HAS_ACQ_CONTEXT)]
    return items


def _source_of(analysis: ImageAnalysis, sources: list[Dataset], frame_index: int
               ) -> tuple[Dataset, int | None]:
    """The instance holding one slice, and its frame number when it is multi-frame (as
    sr._region_source)."""
    image = analysis.image
    uid = image.sop_instance_uids[frame_index]
    src = next(s for s in sources if str(s.SOPInstanceUID) == uid)
    multi_frame = int(src.get("NumberOfFrames", 1) or 1) > 1
    return src, (image.frame_numbers[frame_index] if multi_frame else None)


def _whole_image_sources(sources: list[Dataset]) -> list[Dataset]:
    """The instances of one image, each once, in slice order."""
    seen: dict[str, Dataset] = {}
    for src in sources:
        seen.setdefault(str(src.SOPInstanceUID), src)
    return list(seen.values())


def _rendering_intent(required: bool, point: int) -> Dataset:
    """Rendering Intent; a Presentation Optional one carries the CAD Operating Point the
    mark reaches (TID 4006 row 3), so a workstation can present it by its own setting."""
    intent = hd.sr.CodeContentItem(
        RENDERING_INTENT, PRESENTATION_REQUIRED if required else PRESENTATION_OPTIONAL,
        Relation.HAS_CONCEPT_MOD)
    if not required:
        _nest(intent, [hd.sr.NumContentItem(CAD_OPERATING_POINT, point, OPERATING_POINT_UNIT,
                                            relationship_type=Relation.HAS_PROPERTIES)])
    return intent


def _percent(name: hd.sr.CodedConcept, probability: float) -> Dataset:
    return hd.sr.NumContentItem(name, round(100.0 * float(probability), 2), PERCENT,
                                relationship_type=Relation.HAS_PROPERTIES)


@dataclass
class _Mark:
    """A flagged malignant region of one DBT image, with where its slice is in the library."""

    analysis: ImageAnalysis
    region: FlaggedRegion
    point: int  # CAD operating point reached (1 = most specific)
    position: tuple[int, ...]  # Image Library entry of the region's slice
    required: bool


def _finding(mark: _Mark, options: ResultOptions, relationship: Relation) -> Dataset:
    """TID 4006 Single Image Finding: a mass-like density at the region's peak, outlined by
    its box, on the slice where it is most salient; its probability of cancer is the
    region's peak malignant saliency."""
    region = mark.region
    finding = hd.sr.CodeContentItem(SINGLE_IMAGE_FINDING, DENSITY, relationship)
    children: list[Dataset] = [_rendering_intent(mark.required, mark.point),
                               *_algorithm_items(mark.analysis.algorithm, options),
                               _percent(PROBABILITY_OF_CANCER, region.peak)]
    row, col = region.centre
    centre = np.array([[col + 0.5, row + 0.5]])  # pixel centre -> SR image coordinates
    box = _box(*region.box)
    for name, graphic_type, data in ((CENTER, "POINT", centre), (OUTLINE, "POLYLINE", box)):
        scoord = hd.sr.ScoordContentItem(name, graphic_type, data,
                                         relationship_type=Relation.HAS_PROPERTIES)
        children.append(_nest(scoord, [_by_reference(Relation.SELECTED_FROM, mark.position)]))
    return _nest(finding, children)


def _impression(marks: list[_Mark], options: ResultOptions) -> Dataset:
    """TID 4003 holding one Single Image Finding, or, for one lesion marked on two views,
    a Composite Feature (TID 4004) inferred from both findings."""
    required = any(m.required for m in marks)
    point = min(m.point for m in marks)
    container = hd.sr.ContainerContentItem(INDIVIDUAL_IMPRESSION,
                                           relationship_type=Relation.INFERRED_FROM)
    if len(marks) == 1:
        return _nest(container, [_rendering_intent(required, point),
                                 _finding(marks[0], options, Relation.CONTAINS)])
    composite = hd.sr.CodeContentItem(COMPOSITE_FEATURE, DENSITY, Relation.CONTAINS)
    _nest(composite, [
        _rendering_intent(required, point),
        hd.sr.CodeContentItem(COMPOSITE_TYPE, RELATED_SPATIALLY, Relation.HAS_PROPERTIES),
        hd.sr.CodeContentItem(SCOPE_OF_FEATURE, ON_MULTIPLE_IMAGES, Relation.HAS_PROPERTIES),
        *_algorithm_items(marks[0].analysis.algorithm, options),
        _percent(PROBABILITY_OF_CANCER, max(m.region.peak for m in marks)),
        *[_finding(m, options, Relation.INFERRED_FROM) for m in marks]])
    return _nest(container, [_rendering_intent(required, point), composite])


def _same_lesion(cc: _Mark, mlo: _Mark) -> bool:
    """Whether marks on the CC and the MLO view of one breast are taken as one lesion: at
    the same depth from the chest wall, within SAME_LESION_DEPTH_MM."""
    depth_cc = chest_wall_distance_mm(cc.analysis, cc.region.centre[1])
    depth_mlo = chest_wall_distance_mm(mlo.analysis, mlo.region.centre[1])
    return abs(depth_cc - depth_mlo) <= SAME_LESION_DEPTH_MM


def _group_lesions(marks: list[_Mark]) -> list[list[_Mark]]:
    """Per breast, pair CC and MLO marks of the same lesion (the most salient first, each
    mark in one pair at most); every other mark stands alone. Order: as the marks came."""
    groups: list[list[_Mark]] = [[m] for m in marks]
    for laterality in ("R", "L"):
        views = {view: sorted((g for g in groups if len(g) == 1
                               and g[0].analysis.image.laterality == laterality
                               and g[0].analysis.image.view == view),
                              key=lambda g: -g[0].region.peak)
                 for view in ("CC", "MLO")}
        for cc_group in views["CC"]:
            mlo_group = next((g for g in views["MLO"] if len(g) == 1
                              and _same_lesion(cc_group[0], g[0])), None)
            if mlo_group is None:
                continue
            cc_group.append(mlo_group.pop())
    return [g for g in groups if g]


def _case_scores(analyses: list[ImageAnalysis],
                 breasts: Mapping[str, BreastAnalysis] | None) -> dict[str, float]:
    """Probability of cancer per breast ("R", "L"): the given breast-level results, else
    the mean over the document's views of that breast."""
    out: dict[str, float] = {}
    for laterality in ("R", "L"):
        if breasts is not None and laterality in breasts:
            out[laterality] = float(breasts[laterality].final.malignant)
            continue
        views = [float(a.final.malignant) for a in analyses
                 if a.image.laterality == laterality]
        if views:
            out[laterality] = float(np.mean(views))
    return out


def summary_text(scores: dict[str, float]) -> str:
    """The case's and each breast's probability of cancer, in words."""
    case = max(scores.values())
    breasts = "; ".join(f"{LATERALITY[lat].meaning.lower()} {100 * p:.1f}%"
                        for lat, p in scores.items())
    return (f"Probability of cancer (model output, not calibrated): case {100 * case:.1f}% "
            f"(the higher breast); {breasts}")


def _summary_body(analyses: list[ImageAnalysis], scores: dict[str, float],
                  options: ResultOptions, left_out: Sequence[str] = ()) -> list[Dataset]:
    """TID 4002 on the findings summary: the case's and each breast's probability of
    cancer as its Impression Description (row 5), and the algorithm (TID 4019).

    In words only: the template's numeric row (12) takes CID 6142 concepts, which have no
    probability of cancer, and PixelMed reports "Probability of cancer" there as not in the
    template. The TID 1500 SRs carry the same breast probabilities as numbers."""
    if not scores:
        return []
    text = summary_text(scores)
    if left_out:  # the reader must know the case was not read whole
        text += "; not analysed: " + "; ".join(left_out)
    return [hd.sr.TextContentItem(IMPRESSION_DESCRIPTION, text, Relation.HAS_PROPERTIES),
            *_algorithm_items(analyses[0].algorithm, options)]


def build_cad_sr(analyses: Sequence[ImageAnalysis], options: ResultOptions | None = None,
                 sources: Sequence[list[Dataset]] | None = None,
                 breasts: Mapping[str, BreastAnalysis] | None = None,
                 left_out: Sequence[str] = ()) -> Dataset:
    """The Mammography CAD SR of the analysed images of one study (see the module doc).

    sources: the source headers of each analysis (as read_sources returns them), in the
    order of `analyses`; read from the files when not given.
    breasts: the breast-level results by laterality (all modalities of the study); when
    not given, a breast's score is the mean over its images in `analyses`.
    left_out: the study's images that could not be analysed, each with its reason: the
    summary then says "Not all algorithms succeeded" and names them.
    """
    options = options or ResultOptions()
    if not analyses:
        raise ResultsError("a CAD SR needs at least one analysed image")
    with building("CAD SR", analyses[0]):
        studies = {a.image.study_uid for a in analyses}
        if len(studies) != 1:
            raise ResultsError(f"a CAD SR covers one study; got {sorted(studies)}")
        if sources is not None and len(sources) != len(analyses):
            raise ResultsError("sources must hold one header list per analysis")
        headers = list(sources) if sources is not None else [read_sources(a) for a in analyses]
        return _build(list(analyses), headers, options, breasts, left_out)


def _view_order(analysis: ImageAnalysis) -> tuple:
    image = analysis.image
    return (image.modality, image.view != "CC", image.view, image.laterality != "R",
            image.sop_instance_uids[0])


def _build(analyses: list[ImageAnalysis], headers: list[list[Dataset]],
           options: ResultOptions, breasts: Mapping[str, BreastAnalysis] | None,
           left_out: Sequence[str] = ()) -> Dataset:
    order = sorted(range(len(analyses)), key=lambda i: _view_order(analyses[i]))
    analyses = [analyses[i] for i in order]
    headers = [headers[i] for i in order]
    library = _Library()
    whole: list[list[int]] = []  # library positions of each image's own entries
    for analysis, srcs in zip(analyses, headers, strict=True):
        whole.append([library.add(analysis, src, None)
                      for src in _whole_image_sources(srcs)])
    points = tuple(options.cad_operating_points)
    marks: list[_Mark] = []
    for analysis, srcs in zip(analyses, headers, strict=True):
        for region in flagged_regions(analysis, MALIGNANT, points[-1]):
            point = operating_point(region.peak, points)
            if point is None:
                continue
            src, frame = _source_of(analysis, srcs, region.frame_index)
            library.add(analysis, src, frame)
            marks.append(_Mark(analysis, region, point,
                               library.position((str(src.SOPInstanceUID), frame)),
                               point <= options.cad_presentation_required))
    impressions = [_impression(group, options) for group in _group_lesions(marks)]

    root = hd.sr.ContainerContentItem(REPORT, is_content_continuous=False, template_id="4000")
    language = hd.sr.CodeContentItem(LANGUAGE, ENGLISH_US, Relation.HAS_CONCEPT_MOD)
    image_library = _nest(hd.sr.ContainerContentItem(
        IMAGE_LIBRARY, is_content_continuous=False, relationship_type=Relation.CONTAINS),
        library.items)
    if left_out:
        outcome = PARTLY_WITH_FINDINGS if impressions else PARTLY_WITHOUT_FINDINGS
    else:
        outcome = WITH_FINDINGS if impressions else WITHOUT_FINDINGS
    summary = _nest(hd.sr.CodeContentItem(FINDINGS_SUMMARY, outcome, Relation.CONTAINS),
                    [*_summary_body(analyses, _case_scores(analyses, breasts), options,
                                    left_out),
                     *impressions])
    detections = _nest(hd.sr.CodeContentItem(SUMMARY_OF_DETECTIONS, SUCCEEDED,
                                             Relation.CONTAINS),
                       [_successful_detections(analyses, whole, options)])
    analyses_summary = hd.sr.CodeContentItem(SUMMARY_OF_ANALYSES, NOT_ATTEMPTED,
                                             Relation.CONTAINS)
    _nest(root, [language, image_library, summary, detections, analyses_summary])
    return _document(root, analyses, headers, options)


def _successful_detections(analyses: list[ImageAnalysis], whole: list[list[int]],
                           options: ResultOptions) -> Dataset:
    """TID 4015/4017: one Detection Performed per algorithm, with the images it ran on and
    its operating points (TID 4023: how many, and the one marks are required from)."""
    by_algorithm: dict[AlgorithmIdentity, list[int]] = defaultdict(list)
    for analysis, positions in zip(analyses, whole, strict=True):
        by_algorithm[analysis.algorithm] += positions
    items = []
    for alg, positions in by_algorithm.items():
        performed = hd.sr.CodeContentItem(DETECTION_PERFORMED, DENSITY, Relation.CONTAINS)
        _nest(performed, _algorithm_items(alg, options))
        _nest(performed, [_by_reference(Relation.HAS_PROPERTIES,
                                        (1, _ROOT_IMAGE_LIBRARY_POSITION, p))
                          for p in positions])
        _nest(performed, [
            hd.sr.NumContentItem(MAX_OPERATING_POINT, len(options.cad_operating_points),
                                 ARBITRARY_UNIT, relationship_type=Relation.HAS_PROPERTIES),
            hd.sr.NumContentItem(RECOMMENDED_OPERATING_POINT,
                                 options.cad_presentation_required, OPERATING_POINT_RANGE,
                                 relationship_type=Relation.HAS_PROPERTIES)])
        items.append(performed)
    container = hd.sr.ContainerContentItem(SUCCESSFUL_DETECTIONS,
                                           relationship_type=Relation.INFERRED_FROM)
    return _nest(container, items)


# Patient and General Study attributes copied from the first source image.
_COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
           "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
           "StudyDescription")
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _evidence(headers: list[list[Dataset]]) -> list[Dataset]:
    """Current Requested Procedure Evidence: every source instance, by study and series."""
    by_series: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for srcs in headers:
        for src in srcs:
            key = (str(src.StudyInstanceUID), str(src.SeriesInstanceUID))
            by_series[key][str(src.SOPInstanceUID)] = str(src.SOPClassUID)
    studies: dict[str, list[Dataset]] = defaultdict(list)
    for (study_uid, series_uid), instances in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = []
        for uid, sop_class in instances.items():
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = uid
            series.ReferencedSOPSequence.append(ref)
        studies[study_uid].append(series)
    out = []
    for study_uid, series_items in studies.items():
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.ReferencedSeriesSequence = series_items
        out.append(item)
    return out


def _document(root: Dataset, analyses: list[ImageAnalysis], headers: list[list[Dataset]],
              options: ResultOptions) -> Dataset:
    """The header modules around the content tree (PS3.3 A.35.5)."""
    first = headers[0][0]
    alg = analyses[0].algorithm
    sop_uid = study_result_uid(analyses, options, "cad-sr")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MammographyCADSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # SOP Common, Patient, General Study
    ds.SOPClassUID = MammographyCADSRStorage
    ds.SOPInstanceUID = sop_uid
    for keyword in _COPIED:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
        elif keyword in _TYPE_2:
            setattr(ds, keyword, None)
    now = datetime.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # SR Document Series
    ds.Modality = "SR"
    ds.SeriesInstanceUID = study_result_uid(analyses, options, "cad-sr-series")
    ds.SeriesNumber = CAD_SR_SERIES_NUMBER
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    modalities = "+".join(sorted({a.image.modality.upper() for a in analyses}))
    ds.SeriesDescription = f"{model_name(alg)} CAD {modalities} ({NOT_FOR_CLINICAL_USE})"[:64]
    ds.ReferencedPerformedProcedureStepSequence = []
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model_name(alg)[:64]
    ds.SoftwareVersions = alg.version or "unknown"
    ds.DeviceSerialNumber = serial_number(alg)
    if options.institution_name:
        ds.InstitutionName = options.institution_name
    # SR Document General
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.PerformedProcedureCodeSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(headers)
    # SR Document Content: the root container's attributes (template DCMR 4000)
    for element in root:
        ds[element.tag] = element
    return ds
