"""TID 1500 SR: probabilities, attended regions on the right frames, breast result, SEG
link, every group placed on an image, evidence, reading it back; dciodvfy, dsrdump and
PixelMed's DicomSRValidator."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.analysis import CLASS_NAMES
from dicomnode.results import ResultOptions, build_segmentation, build_sr
from dicomnode.results.common import SEGMENT_PROPERTIES
from dicomnode.results.geometry import block_mean
from dicomnode.results.read import read_sr_summary
from dicomnode.results.sr import _box
from dicomnode.results.validate import (
    dciodvfy_errors,
    dsrdump_errors,
    dsrdump_output,
    sr_validator_errors,
)
from tests.results_support import CASES, analysis_for, make_breast

THRESHOLDS = (0.2, 0.5)


def _build(tmp_path_factory, tmp_path, layout: str, modality: str, *, breast: bool = True):
    analysis = analysis_for(tmp_path_factory, layout, modality)
    options = ResultOptions(thresholds=THRESHOLDS)
    seg = build_segmentation(analysis, options)
    sr = build_sr(analysis, make_breast(analysis) if breast else None, seg, options)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return analysis, seg, pydicom.dcmread(path), path


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = getattr(item, keyword)[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _groups(sr: Dataset) -> list[Dataset]:
    measurements = next(i for i in sr.ContentSequence if _code(i) == ("126010", "DCM"))
    return [g for g in measurements.ContentSequence if _code(g) == ("125007", "DCM")]


def _children(item: Dataset, value_type: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if c.ValueType == value_type]


def _text(group: Dataset, code: tuple[str, str]) -> str:
    return next(str(c.get("TextValue", c.get("UID", ""))) for c in group.ContentSequence
                if _code(c) == code)


def _tracking(group: Dataset) -> str:
    return _text(group, ("112039", "DCM"))


def _nums(group: Dataset) -> dict[tuple[tuple[str, str], tuple[str, str] | None], float]:
    """{(concept, method or None): value} of a group's NUM items."""
    out = {}
    for num in _children(group, "NUM"):
        method = next((_code(c, "ConceptCodeSequence") for c in _children(num, "CODE")
                       if _code(c) == ("370129005", "SCT")), None)
        out[(_code(num), method)] = float(num.MeasuredValueSequence[0].NumericValue)
    return out


def _region(group: Dataset) -> tuple[np.ndarray, Dataset]:
    """The group's image region: (closed POLYLINE (column, row) points, image reference)."""
    (scoord,) = _children(group, "SCOORD")
    assert scoord.GraphicType == "POLYLINE"
    points = np.array(scoord.GraphicData, dtype=float).reshape(-1, 2)
    return points, scoord.ContentSequence[0].ReferencedSOPSequence[0]


def _slice_of(analysis, ref: Dataset) -> int:
    """The slice index an SCOORD's image reference points at."""
    image = analysis.image
    uid = str(ref.ReferencedSOPInstanceUID)
    if "ReferencedFrameNumber" in ref:
        return next(d for d, (u, f) in enumerate(zip(image.sop_instance_uids,
                                                     image.frame_numbers, strict=True))
                    if u == uid and f == int(ref.ReferencedFrameNumber))
    return image.sop_instance_uids.index(uid)


def _most_attended(analysis) -> int:
    return max(analysis.regions, key=lambda r: r.attention).frame_index


BENIGN = ("BENIGN_PROB", "99DCMNODE")
CANCER = ("111047", "DCM")


@pytest.mark.parametrize("layout,modality", CASES)
def test_sr_carries_the_probabilities_regions_and_seg_link(tmp_path_factory, tmp_path, layout,
                                                          modality) -> None:
    analysis, seg, sr, _ = _build(tmp_path_factory, tmp_path, layout, modality)
    image = analysis.image
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == image.study_uid
    assert sr.SeriesInstanceUID not in (image.series_uid, seg.dataset.SeriesInstanceUID)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "not for clinical use" in sr.SeriesDescription
    assert any(i.CodingSchemeDesignator == "99DCMNODE"
               for i in sr.CodingSchemeIdentificationSequence)
    groups = _groups(sr)
    by_name = {_tracking(g): g for g in groups}

    # the first group: the image summary, the final probability of cancer first (OHIF labels
    # a region with its first few NUM items), then the breast's probabilities
    image_group = groups[0]
    assert _tracking(image_group).startswith("Image prediction")
    first = _children(image_group, "NUM")[0]
    assert _code(first) == CANCER
    assert float(first.MeasuredValueSequence[0].NumericValue) == \
        pytest.approx(analysis.final.malignant)
    nums = _nums(image_group)
    for method, probs in (("FINAL", analysis.final), ("GLOBAL", analysis.global_),
                          ("LOCAL", analysis.local)):
        key = (method, "99DCMNODE")
        assert nums[(BENIGN, key)] == pytest.approx(probs.benign)
        assert nums[(CANCER, key)] == pytest.approx(probs.malignant)
    breast = make_breast(analysis)
    assert nums[(CANCER, ("BREAST_MEAN", "99DCMNODE"))] == pytest.approx(breast.final.malignant)
    assert nums[(BENIGN, ("BREAST_MEAN", "99DCMNODE"))] == pytest.approx(breast.final.benign)
    per_modality = (f"MEAN_{image.modality.upper()}", "99DCMNODE")
    assert nums[(CANCER, per_modality)] == \
        pytest.approx(breast.per_modality[image.modality].malignant)
    site = next(c for c in image_group.ContentSequence if _code(c) == ("363698007", "SCT"))
    laterality = _code(site.ContentSequence[0], "ConceptCodeSequence")
    assert laterality == ({"L": "7771000", "R": "24028007"}[image.laterality], "SCT")
    # ... placed on the whole image, on its most-attended slice
    points, ref = _region(image_group)
    np.testing.assert_allclose(points, _box(0, 0, *image.shape[1:]))
    assert _slice_of(analysis, ref) == _most_attended(analysis)

    region_groups = [g for n, g in by_name.items() if n.startswith("Attended region")]
    assert len(region_groups) == len(analysis.regions)
    for group, region in zip(region_groups, analysis.regions, strict=True):
        assert _nums(group)[(("ATTN_WEIGHT", "99DCMNODE"), None)] == \
            pytest.approx(region.attention)
        points, ref = _region(group)
        np.testing.assert_allclose(
            points, _box(region.row0, region.col0, region.height, region.width))
        assert ref.ReferencedSOPInstanceUID == image.sop_instance_uids[region.frame_index]
        if image.modality == "dbt" and len(set(image.sop_instance_uids)) == 1:
            assert int(ref.ReferencedFrameNumber) == image.frame_numbers[region.frame_index]
        else:
            assert "ReferencedFrameNumber" not in ref

    for class_index, uid in enumerate(seg.tracking_uids):
        group = next(g for g in groups if _text(g, ("112040", "DCM")) == uid)
        nums = _nums(group)
        assert nums[(("OPERATING_POINT", "99DCMNODE"), None)] == \
            pytest.approx(THRESHOLDS[class_index])
        size = seg.flagged_mm3(class_index) if modality == "dbt" else seg.flagged_mm2(class_index)
        concept = ("118565006", "SCT") if modality == "dbt" else ("42798000", "SCT")
        assert nums[(concept, None)] == pytest.approx(size) and size > 0
        # placed around the SEG's flagged pixels on the slice where it flags the most
        masks = [block_mean(frame, seg.factor) > THRESHOLDS[class_index]
                 for frame in analysis.saliency_on_source(class_index)]
        d = int(np.argmax([m.sum() for m in masks]))
        rr, cc = np.nonzero(masks[d])
        f = seg.factor
        row1 = min((rr.max() + 1) * f, image.shape[1])
        col1 = min((cc.max() + 1) * f, image.shape[2])
        points, ref = _region(group)
        np.testing.assert_allclose(points, _box(rr.min() * f, cc.min() * f,
                                                row1 - rr.min() * f, col1 - cc.min() * f))
        assert _slice_of(analysis, ref) == d

    # every group is a planar ROI on an image of the source (OHIF stops at one without)
    for group in groups:
        assert _children(group, "SCOORD"), _tracking(group)
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"

    evidence = {str(ref.ReferencedSOPInstanceUID)
                for kw in ("CurrentRequestedProcedureEvidenceSequence",
                           "PertinentOtherEvidenceSequence")
                for study in sr.get(kw, []) for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert set(image.sop_instance_uids) <= evidence
    assert str(seg.dataset.SOPInstanceUID) in evidence


def test_sr_without_breast_or_seg(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    sr = build_sr(analysis)
    groups = _groups(sr)
    names = [_tracking(g) for g in groups]
    assert names[0].startswith("Image prediction")
    assert not any(n.startswith(tuple(label for label, _ in SEGMENT_PROPERTIES)) for n in names)
    assert not any(method[0].startswith(("BREAST", "MEAN_"))
                   for _, method in _nums(groups[0]) if method)


def test_nothing_flagged_places_the_segment_groups_on_the_whole_image(tmp_path_factory
                                                                      ) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    options = ResultOptions(thresholds=(0.99, 0.99))
    seg = build_segmentation(analysis, options)
    assert seg.flagged_boxes == (None, None)
    groups = _groups(build_sr(analysis, None, seg, options))
    for uid in seg.tracking_uids:
        group = next(g for g in groups if _text(g, ("112040", "DCM")) == uid)
        points, ref = _region(group)
        np.testing.assert_allclose(points, _box(0, 0, *analysis.image.shape[1:]))
        assert _slice_of(analysis, ref) == _most_attended(analysis)


def test_read_sr_summary_reads_the_probabilities_back(tmp_path_factory, tmp_path) -> None:
    analysis, _, sr, _ = _build(tmp_path_factory, tmp_path, "enhanced", "dbt")
    summary = read_sr_summary(sr)
    assert summary.study_uid == analysis.image.study_uid
    breast = make_breast(analysis)
    for method, probs in (("final", analysis.final), ("global", analysis.global_),
                          ("local", analysis.local), ("breast", breast.final)):
        assert summary.probabilities[method] == pytest.approx(
            dict(zip(CLASS_NAMES, (probs.benign, probs.malignant), strict=True)))
    assert summary.attention == pytest.approx([r.attention for r in analysis.regions])


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout,modality", CASES)
def test_sr_passes_dciodvfy(tmp_path_factory, tmp_path, layout, modality) -> None:
    *_, path = _build(tmp_path_factory, tmp_path, layout, modality)
    assert dciodvfy_errors(path) == []


@pytest.mark.dcmtk
def test_dsrdump_reads_the_sr(tmp_path_factory, tmp_path) -> None:
    *_, path = _build(tmp_path_factory, tmp_path, "single-frame", "dbt")
    assert dsrdump_errors(path) == []
    text = dsrdump_output(path)
    assert "Imaging Measurement Report" in text
    assert 'NUM:(,,"Probability of cancer")="0.8125"' in text
    assert "SCOORD" in text and "POLYLINE" in text


@pytest.mark.pixelmed
@pytest.mark.slow
@pytest.mark.parametrize("layout,modality", [
    pytest.param("enhanced", "dbt", id="dbt-enhanced"),
    pytest.param("enhanced", "ffdm", id="ffdm"),
])
def test_sr_passes_pixelmed_template_validation(tmp_path_factory, tmp_path, layout,
                                                modality) -> None:
    *_, path = _build(tmp_path_factory, tmp_path, layout, modality)
    assert sr_validator_errors(path) == []
