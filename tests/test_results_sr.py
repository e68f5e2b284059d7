"""TID 1500 SR: probabilities, attended regions on the right frames, breast result,
finding-coded groups only for flagged regions (each on its own region), reproducible
Tracking UIDs, every group placed on an image, evidence, reading it back; dciodvfy,
dsrdump and PixelMed's DicomSRValidator."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.results import ResultOptions, build_segmentation, build_sr
from dicomnode.results.common import SEGMENT_PROPERTIES
from dicomnode.results.findings import flagged_regions
from dicomnode.results.geometry import read_sources
from dicomnode.results.read import read_sr_summary
from dicomnode.results.sr import _box
from dicomnode.results.validate import (
    dciodvfy_errors,
    dsrdump_errors,
    dsrdump_output,
    sr_validator_errors,
)
from gmic.classes import CLASS_NAMES
from tests.support.results import CASES, analysis_for, build_differences, code, make_breast

THRESHOLDS = (0.2, 0.5)


def _build(tmp_path_factory, tmp_path, layout: str, modality: str, *, breast: bool = True):
    analysis = analysis_for(tmp_path_factory, layout, modality)
    options = ResultOptions(thresholds=THRESHOLDS)
    seg = build_segmentation(analysis, options)
    sr = build_sr(analysis, make_breast(analysis) if breast else None, seg, options)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return analysis, seg, pydicom.dcmread(path), path


def _groups(sr: Dataset) -> list[Dataset]:
    measurements = next(i for i in sr.ContentSequence if code(i) == ("126010", "DCM"))
    return [g for g in measurements.ContentSequence if code(g) == ("125007", "DCM")]


def _children(item: Dataset, value_type: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if c.ValueType == value_type]


def _text(group: Dataset, concept: tuple[str, str]) -> str:
    return next(str(c.get("TextValue", c.get("UID", ""))) for c in group.ContentSequence
                if code(c) == concept)


def _finding(group: Dataset) -> Dataset:
    return next(c for c in group.ContentSequence if code(c) == ("121071", "DCM"))


def _tracking(group: Dataset) -> str:
    return _text(group, ("112039", "DCM"))


def _nums(group: Dataset) -> dict[tuple[tuple[str, str], tuple[str, str] | None], float]:
    """{(concept, method or None): value} of a group's NUM items."""
    out = {}
    for num in _children(group, "NUM"):
        method = next((code(c, "ConceptCodeSequence") for c in _children(num, "CODE")
                       if code(c) == ("370129005", "SCT")), None)
        out[(code(num), method)] = float(num.MeasuredValueSequence[0].NumericValue)
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
FLAGGED_FINDINGS = {(c.value, c.scheme_designator) for _, c in SEGMENT_PROPERTIES}
CANCER = ("111047", "DCM")


@pytest.mark.parametrize("layout,modality", CASES)
def test_sr_carries_the_probabilities_regions_and_seg_link(tmp_path_factory, tmp_path, layout,
                                                          modality) -> None:
    analysis, seg, sr, _ = _build(tmp_path_factory, tmp_path, layout, modality)
    image = analysis.image
    assert sr.SOPClassUID == Comprehensive3DSRStorage  # Comprehensive 3D SR
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
    assert code(first) == CANCER
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
    site = next(c for c in image_group.ContentSequence if code(c) == ("363698007", "SCT"))
    laterality = code(site.ContentSequence[0], "ConceptCodeSequence")
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

    # one finding-coded group per flagged region, on its own region and slice
    flagged = [g for g in groups if code(_finding(g), "ConceptCodeSequence") in FLAGGED_FINDINGS]
    for class_index, (label, _) in enumerate(SEGMENT_PROPERTIES):
        regions = flagged_regions(analysis, class_index, THRESHOLDS[class_index])
        mine = [g for g in flagged if _tracking(g).startswith(label)]
        assert len(mine) == len(regions) >= 1
        for group, region in zip(mine, regions, strict=True):
            nums = _nums(group)
            assert nums[(("OPERATING_POINT", "99DCMNODE"), None)] == \
                pytest.approx(THRESHOLDS[class_index])
            concept = CANCER if class_index == 1 else BENIGN
            assert nums[(concept, ("REGION_PEAK", "99DCMNODE"))] == pytest.approx(region.peak)
            assert region.peak >= THRESHOLDS[class_index]
            area = region.area_px * np.prod(image.pixel_spacing)
            assert nums[(("42798000", "SCT"), None)] == pytest.approx(area) and area > 0
            if modality == "dbt":
                assert nums[(("118565006", "SCT"), None)] > 0
            points, ref = _region(group)
            np.testing.assert_allclose(points, _box(*region.box))
            assert _slice_of(analysis, ref) == region.frame_index
            # not the whole image: a flagged region is a region
            assert region.height * region.width < image.shape[1] * image.shape[2]
            # the peak saliency on the source grid lies in the region, on that slice
            source = analysis.saliency_on_source(class_index)[region.frame_index]
            row, col = np.unravel_index(int(np.argmax(source)), source.shape)
            assert region.contains(row, col)

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
    # flagged regions do not need the SEG; without it they do not name a segment
    flagged = [n for n in names if n.startswith(tuple(label for label, _ in SEGMENT_PROPERTIES))]
    assert flagged and not any("SEG segment" in n for n in flagged)
    assert not any(method[0].startswith(("BREAST", "MEAN_"))
                   for _, method in _nums(groups[0]) if method)


def test_nothing_flagged_gives_no_finding_coded_group(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    options = ResultOptions(thresholds=(0.99, 0.99))
    seg = build_segmentation(analysis, options)
    assert seg.flagged_boxes == (None, None)
    groups = _groups(build_sr(analysis, make_breast(analysis), seg, options))
    assert groups and not any(code(_finding(g), "ConceptCodeSequence") in FLAGGED_FINDINGS
                              for g in groups)
    # the probabilities stay, on a group that says it covers the image and claims no lesion
    assert code(_finding(groups[0]), "ConceptCodeSequence") == ("76752008", "SCT")
    assert "whole image" in _tracking(groups[0])


def test_tracking_uids_are_reproducible_and_distinct(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    options = ResultOptions(thresholds=THRESHOLDS)
    seg = build_segmentation(analysis, options)
    first = build_sr(analysis, make_breast(analysis), seg, options)
    again = build_sr(analysis, make_breast(analysis), seg, options)
    uids = [_text(g, ("112040", "DCM")) for g in _groups(first)]
    assert uids == [_text(g, ("112040", "DCM")) for g in _groups(again)]
    assert len(set(uids)) == len(uids)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    # the same content under the same UIDs (dates and times aside)
    assert _content(first) == _content(again)
    other = build_sr(analysis, make_breast(analysis), seg,
                     ResultOptions(thresholds=(0.2, 0.6)))
    assert not set(uids) & {_text(g, ("112040", "DCM")) for g in _groups(other)}


def _content(sr: Dataset) -> list:
    return [item.to_json_dict() for item in sr.ContentSequence]


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


def test_sr_uid_follows_the_images_its_breast_figures_come_from(tmp_path_factory) -> None:
    """A study that grew gives the breast other figures: other UIDs, never other content
    under the UID already sent; the same breast gives the same UID."""
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    other = analysis_for(tmp_path_factory, "enhanced", "s2d")
    alone = make_breast(analysis)
    grown = make_breast(analysis)
    grown.images = [analysis, other]
    first = build_sr(analysis, alone).SOPInstanceUID
    assert build_sr(analysis, make_breast(analysis)).SOPInstanceUID == first
    assert build_sr(analysis, grown).SOPInstanceUID != first


@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("with_breast_and_seg", [True, False])
def test_sr_is_the_dataset_highdicom_builds_from_the_whole_tree(
        tmp_path_factory, monkeypatch, layout, modality, with_breast_and_seg) -> None:
    """build_sr gives highdicom the content's root alone and puts the tree in itself: the
    same dataset, element for element, as highdicom builds from the whole tree."""
    from dicomnode.results import sr as sr_module

    analysis = analysis_for(tmp_path_factory, layout, modality)
    breast = make_breast(analysis) if with_breast_and_seg else None
    seg = build_segmentation(analysis) if with_breast_and_seg else None
    fast = build_sr(analysis, breast, seg)
    monkeypatch.setattr(sr_module, "STUB_CONTENT", False)
    slow = build_sr(analysis, breast, seg)
    assert build_differences(fast, slow) == []
    assert len(fast.ContentSequence) > 2


def test_sr_content_must_reference_its_evidence(tmp_path_factory) -> None:
    """A reference to an instance that is not evidence is refused, as highdicom does."""
    from dicomnode.results.sr import _check_evidence

    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    seg = build_segmentation(analysis)
    sr = build_sr(analysis, None, seg)
    sources = read_sources(analysis)
    _check_evidence(sr, [*sources, seg.dataset])
    with pytest.raises(ValueError, match="No evidence"):
        _check_evidence(sr, [seg.dataset])  # the image is referenced
