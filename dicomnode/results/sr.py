"""Comprehensive 3D SR, TID 1500 Measurement Report, of one analysed image.

Every measurement group is a planar ROI (TID 1410) placed on a slice of the image (the
referenced frame of a multi-frame DBT, or the slice's own instance) by a closed POLYLINE,
all with the algorithm's identification. In order:
- image summary: finding "Breast" (no lesion claimed), on the whole image (its identifier
  says so) on its most-attended slice, with the image's malignant and benign probability
  (final, global network, local network) and, when given, its breast's (overall and per
  modality); the final probability of cancer first;
- attended regions: the K patches the local network looked at, each with its attention
  weight (finding: "Region attended by the local network", no diagnosis);
- flagged regions: one group per region the model flags (:mod:`dicomnode.results.findings`:
  a connected region of a class's saliency at or above its operating point, the SEG's
  thresholds), coded with the SEG segment's finding, outlining that region on the slice
  where it is most salient, with its peak saliency, the operating point, its area on that
  slice and (DBT) its volume. An image where nothing reaches an operating point has no
  finding-coded group.

Tracking UIDs derive from the SR's SOP Instance UID (reproducible, see common.result_uid)
and what the group is about, so a rerun sends the same content under the same UIDs.

Why all groups have an image region: OHIF (3.13) opens the report on its first group and
loads the groups from the last, stopping silently at the first without one; it shows a
group's NUM items as the region's label, about five lines of "concept: value" (the method
is not shown), hence the order of the summary's probabilities.

Malignant probabilities use the standard concept (DCM 111047 "Probability of cancer");
concepts without a standard code use the project-private scheme 99DCMNODE, declared in the
Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode.pipeline.analysis import BreastAnalysis, ClassProbabilities, ImageAnalysis
from dicomnode.results.common import (
    LATERALITY_CODES,
    MANUFACTURER,
    NO_UNITS,
    PROBABILITY_UNIT,
    SEGMENT_PROPERTIES,
    SR_SERIES_OFFSET,
    ResultOptions,
    algorithm_parameters,
    building,
    coding_schemes,
    device_uid,
    model_name,
    private_code,
    result_uid,
    serial_number,
    series_description,
    source_series_number,
)
from dicomnode.results.findings import flagged_regions
from dicomnode.results.geometry import read_sources
from dicomnode.results.seg import SegmentationResult, slice_spacing
from gmic.classes import MALIGNANT

PROBABILITY_CONCEPTS = (
    private_code("BENIGN_PROB", "Probability of benign finding"),
    hd.sr.CodedConcept("111047", "DCM", "Probability of cancer"),
)
ATTENTION_WEIGHT = private_code("ATTN_WEIGHT", "Attention weight")
OPERATING_POINT = private_code("OPERATING_POINT", "Saliency operating point")
METHODS = {
    "final": private_code("FINAL", "Mean of global and local network predictions"),
    "global": private_code("GLOBAL", "Global network (top-t saliency pooling)"),
    "local": private_code("LOCAL", "Local network (gated attention over attended regions)"),
    "breast": private_code("BREAST_MEAN", "Mean over the breast's views and modalities"),
}
ATTENDED_REGION = private_code("ATTENDED_REGION", "Region attended by the local network")
REGION_PEAK = private_code("REGION_PEAK", "Highest saliency in the region (global network)")
MODALITY_NAMES = {"dbt": "tomosynthesis", "ffdm": "full-field digital mammography",
                  "s2d": "synthetic 2D mammography"}
# Procedure reported must come from CID 100 (PixelMed checks it), which has no mammography
# code: the generic "Imaging procedure".
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def _algorithm(analysis: ImageAnalysis) -> hd.sr.AlgorithmIdentification:
    alg = analysis.algorithm
    params = [f"{k}={v}" for k, v in algorithm_parameters(alg).items()]
    return hd.sr.AlgorithmIdentification(name=model_name(alg), version=alg.version or "unknown",
                                          parameters=params)


def _finding_site(laterality: str) -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.SCT.Breast,
                              laterality=LATERALITY_CODES.get(laterality))]


def _probabilities(probs: ClassProbabilities, method: hd.sr.CodedConcept,
                   algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """Probability of cancer, then of a benign finding."""
    values = (probs.benign, probs.malignant)
    return [hd.sr.Measurement(name=PROBABILITY_CONCEPTS[i], value=float(values[i]),
                              unit=PROBABILITY_UNIT, method=method, algorithm_id=algorithm)
            for i in (1, 0)]


def _region_source(analysis: ImageAnalysis, sources: list[Dataset], frame_index: int
                   ) -> hd.sr.SourceImageForRegion:
    """The instance (and frame, for a multi-frame image) holding one slice."""
    image = analysis.image
    uid = image.sop_instance_uids[frame_index]
    src = next(s for s in sources if str(s.SOPInstanceUID) == uid)
    frames = None
    if int(src.get("NumberOfFrames", 1) or 1) > 1:
        frames = [image.frame_numbers[frame_index]]
    return hd.sr.SourceImageForRegion(referenced_sop_class_uid=str(src.SOPClassUID),
                                      referenced_sop_instance_uid=uid,
                                      referenced_frame_numbers=frames)


def _box(row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Closed polyline (column, row) around source pixels [row0, row0+h) x [col0, col0+w):
    SR image coordinates put the top-left corner of the first pixel at (0, 0)."""
    c0, r0, c1, r1 = float(col0), float(row0), float(col0 + width), float(row0 + height)
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])


def _image_region(analysis: ImageAnalysis, sources: list[Dataset], frame_index: int,
                  box: tuple[int, int, int, int] | None = None) -> hd.sr.ImageRegion:
    """The box (row0, col0, height, width) on one slice, or the whole image when None."""
    row0, col0, height, width = box or (0, 0, *analysis.image.shape[1:])
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_box(row0, col0, height, width),
        source_image=_region_source(analysis, sources, frame_index))


def _most_attended_frame(analysis: ImageAnalysis) -> int:
    """The slice of the attended region with the highest weight; without regions, the slice
    where the malignant saliency peaks."""
    if analysis.regions:
        return max(analysis.regions, key=lambda r: r.attention).frame_index
    peaks = analysis.saliency[:, MALIGNANT].reshape(len(analysis.saliency), -1).max(axis=1)
    return int(np.argmax(peaks))


def _breast_probabilities(breast: BreastAnalysis, algorithm: hd.sr.AlgorithmIdentification
                          ) -> list[hd.sr.Measurement]:
    measurements = _probabilities(breast.final, METHODS["breast"], algorithm)
    for modality, probs in sorted(breast.per_modality.items()):
        method = private_code(f"MEAN_{modality.upper()}"[:16],
                              f"Mean over the breast's {MODALITY_NAMES.get(modality, modality)}"
                              " views")
        measurements += _probabilities(probs, method, algorithm)
    return measurements


def _summary_group(analysis: ImageAnalysis, breast: BreastAnalysis | None,
                   sources: list[Dataset], algorithm: hd.sr.AlgorithmIdentification,
                   sop_uid: str) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The image's probabilities, then its breast's, on the whole image: the finding is
    the breast (not a lesion), and the region says it covers the image."""
    image = analysis.image
    measurements = []
    for key, probs in (("final", analysis.final), ("global", analysis.global_),
                       ("local", analysis.local)):
        measurements += _probabilities(probs, METHODS[key], algorithm)
    if breast is not None:
        measurements += _breast_probabilities(breast, algorithm)
    where = " ".join(p for p in (image.laterality, image.view, image.modality.upper()) if p)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sop_uid, "image"),
            identifier=f"Image prediction {where} (whole image)"[:64]),
        referenced_region=_image_region(analysis, sources, _most_attended_frame(analysis)),
        finding_type=codes.SCT.Breast,
        finding_sites=_finding_site(image.laterality),
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _region_groups(analysis: ImageAnalysis, sources: list[Dataset],
                   algorithm: hd.sr.AlgorithmIdentification, sop_uid: str
                   ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    out = []
    k = len(analysis.regions)
    for n, region in enumerate(analysis.regions, 1):
        if region.height <= 0 or region.width <= 0:
            continue  # clipped away entirely: nothing to draw
        roi = _image_region(analysis, sources, region.frame_index,
                            (region.row0, region.col0, region.height, region.width))
        depth = analysis.image.shape[0]
        out.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(sop_uid, "attended", n),
                identifier=f"Attended region {n} of {k}, slice "
                                          f"{region.frame_index + 1} of {depth}"),
            referenced_region=roi,
            finding_type=ATTENDED_REGION,
            finding_sites=_finding_site(analysis.image.laterality),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=ATTENTION_WEIGHT, value=float(region.attention), unit=NO_UNITS,
                algorithm_id=algorithm)],
        ))
    return out


def _flagged_groups(analysis: ImageAnalysis, options: ResultOptions, sources: list[Dataset],
                    algorithm: hd.sr.AlgorithmIdentification, sop_uid: str,
                    seg: SegmentationResult | None
                    ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One finding-coded group per region the model flags (a class's saliency at or above
    its operating point, as the SEG), each outlining that region on the slice where it is
    most salient, with its peak saliency, the operating point, and its area on that slice
    (and its volume, DBT). Nothing flagged: no group.

    Not a TID 1411 group with a Referenced Segment: PixelMed's TID 1500 rules pick one
    measurement-group template for the whole report from what any group contains, so a
    single segment reference makes every other group fail as TID 1411. The SEG is listed
    in the evidence (Pertinent Other Evidence) and named in the tracking identifier.
    """
    out = []
    image = analysis.image
    row_mm, col_mm = image.pixel_spacing
    between = slice_spacing(analysis) if image.modality == "dbt" else None
    for class_index, (label, property_type) in enumerate(SEGMENT_PROPERTIES):
        regions = flagged_regions(analysis, class_index, options.thresholds[class_index])
        for n, region in enumerate(regions, 1):
            measurements = [
                hd.sr.Measurement(name=PROBABILITY_CONCEPTS[class_index], value=region.peak,
                                  unit=PROBABILITY_UNIT, method=REGION_PEAK,
                                  algorithm_id=algorithm),
                hd.sr.Measurement(name=OPERATING_POINT, value=region.threshold,
                                  unit=PROBABILITY_UNIT, algorithm_id=algorithm),
                hd.sr.Measurement(name=codes.SCT.Area, value=region.area_px * row_mm * col_mm,
                                  unit=codes.UCUM.SquareMillimeter, algorithm_id=algorithm)]
            if between:
                measurements.append(hd.sr.Measurement(
                    name=codes.SCT.Volume, value=region.volume_px * row_mm * col_mm * between,
                    unit=codes.UCUM.CubicMillimeter, algorithm_id=algorithm))
            where = (f", slice {region.frame_index + 1} of {image.shape[0]}"
                     if image.shape[0] > 1 else "")
            in_seg = f" (SEG segment {class_index + 1})" if seg is not None else ""
            identifier = f"{label} {n} of {len(regions)}{where}{in_seg}"
            out.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(sop_uid, label, region.frame_index, *region.box),
                    identifier=identifier[:64]),
                referenced_region=_image_region(analysis, sources, region.frame_index,
                                                region.box),
                finding_type=property_type,
                finding_sites=_finding_site(image.laterality),
                algorithm_id=algorithm, measurements=measurements))
    return out


def tracking_uid(sop_uid: str, *labels: object) -> hd.UID:
    """The Tracking UID of a group: from the SR's SOP Instance UID (itself reproducible)
    and what the group is about, so a rerun tracks the same things under the same UIDs."""
    return hd.UID(str(generate_uid(entropy_srcs=[str(sop_uid), *map(str, labels)])))


def build_sr(analysis: ImageAnalysis, breast: BreastAnalysis | None = None,
             seg: SegmentationResult | None = None, options: ResultOptions | None = None,
             sources: list[Dataset] | None = None) -> Dataset:
    """The TID 1500 report of one analysed image (and its breast, when given)."""
    options = options or ResultOptions()
    sources = sources if sources is not None else read_sources(analysis)
    with building("SR", analysis):
        return _build_sr(analysis, breast, seg, options, sources)


def _build_sr(analysis: ImageAnalysis, breast: BreastAnalysis | None,
              seg: SegmentationResult | None, options: ResultOptions,
              sources: list[Dataset]) -> Dataset:
    alg = analysis.algorithm
    algorithm = _algorithm(analysis)
    # the model as the observer: one device UID per (algorithm, checkpoint)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(alg), name=model_name(alg), manufacturer_name=MANUFACTURER,
            model_name=f"{model_name(alg)} {alg.checkpoint_name}"[:64],
            serial_number=serial_number(alg)))
    # The breast-level figures come from every image of the breast: a breast that gained an
    # image (the study grew) has other figures, so its SRs get other UIDs (and the old ones
    # are superseded) instead of other content under the same UID.
    breast_sources = sorted(p.name for image in (breast.images if breast else [])
                            for p in image.image.source_paths)
    sop_uid = result_uid(analysis, options, "sr", *breast_sources)
    groups = [_summary_group(analysis, breast, sources, algorithm, sop_uid)]
    groups += _region_groups(analysis, sources, algorithm, sop_uid)
    groups += _flagged_groups(analysis, options, sources, algorithm, sop_uid, seg)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    evidence = list(sources) + ([seg.dataset] if seg is not None else [])
    root = report[0]
    content: Dataset = root
    if STUB_CONTENT:
        # highdicom deep-copies and parses the whole content tree and walks it, building a
        # ContentItem per node, to check the references against the evidence: over half of
        # a DBT view's SR (1.8 s with the random-weights model's many regions). It gets the
        # root alone; the tree goes in as highdicom would put it (the same element), and the
        # references are checked here. tests/test_results_sr.py compares the datasets.
        _check_evidence(root, evidence)
        content = Dataset()
        for element in root:
            if element.tag != _CONTENT_SEQUENCE:
                content.add(element)
        content.ContentSequence = Sequence([])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=result_uid(analysis, options, "sr-series"),
        series_number=SR_SERIES_OFFSET + source_series_number(sources),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name(alg),
        software_versions=alg.version or "unknown",
        device_serial_number=serial_number(alg),
        series_description=series_description("report", analysis),
        institution_name=options.institution_name,
        coding_schemes=coding_schemes(),
        is_complete=True,
    )
    if content is not root:
        sr[_CONTENT_SEQUENCE] = root[_CONTENT_SEQUENCE]
    return sr


# _build_sr hands highdicom the content's root without its tree (see there); False: the
# whole tree, highdicom's own path, which the tests compare with.
STUB_CONTENT = True
_CONTENT_SEQUENCE = 0x0040A730
_REFERENCING = ("IMAGE", "COMPOSITE")


def _check_evidence(root: Dataset, evidence: list[Dataset]) -> None:
    """highdicom's check: every instance an IMAGE or COMPOSITE item references is among
    the evidence (ValueError, as highdicom raises)."""
    known = {str(ds.SOPInstanceUID) for ds in evidence}
    stack = [root]
    missing = set()
    while stack:
        node = stack.pop()
        for item in node.get("ContentSequence", ()):
            if item.get("ValueType") in _REFERENCING:
                uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                if uid not in known:
                    missing.add(uid)
            if "ContentSequence" in item:
                stack.append(item)
    if missing:
        raise ValueError("No evidence was provided for the following SOP instances, which "
                         f"are referenced in the document content: {sorted(missing)}")
