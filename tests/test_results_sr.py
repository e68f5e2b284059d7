"""TID 1500 SR: probabilities, attended regions on the right frames, breast result, SEG
link, evidence; dciodvfy, dsrdump and PixelMed's DicomSRValidator."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.results import ResultOptions, build_segmentation, build_sr
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

    image_group = next(g for n, g in by_name.items() if n.startswith("Image prediction"))
    nums = _nums(image_group)
    for method, probs in (("FINAL", analysis.final), ("GLOBAL", analysis.global_),
                          ("LOCAL", analysis.local)):
        key = (method, "99DCMNODE")
        assert nums[(BENIGN, key)] == pytest.approx(probs.benign)
        assert nums[(CANCER, key)] == pytest.approx(probs.malignant)

    breast_group = next(g for n, g in by_name.items() if n.startswith("Breast prediction"))
    breast = make_breast(analysis)
    assert _nums(breast_group)[(CANCER, ("BREAST_MEAN", "99DCMNODE"))] == \
        pytest.approx(breast.final.malignant)
    site = next(c for c in breast_group.ContentSequence if _code(c) == ("363698007", "SCT"))
    laterality = _code(site.ContentSequence[0], "ConceptCodeSequence")
    assert laterality == ({"L": "7771000", "R": "24028007"}[image.laterality], "SCT")

    region_groups = [g for n, g in by_name.items() if n.startswith("Attended region")]
    assert len(region_groups) == len(analysis.regions)
    for group, region in zip(region_groups, analysis.regions, strict=True):
        assert _nums(group)[(("ATTN_WEIGHT", "99DCMNODE"), None)] == \
            pytest.approx(region.attention)
        scoord = _children(group, "SCOORD")[0]
        assert scoord.GraphicType == "POLYLINE"
        np.testing.assert_allclose(
            np.array(scoord.GraphicData, dtype=float).reshape(-1, 2),
            _box(region.row0, region.col0, region.height, region.width))
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
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
    names = [_tracking(g) for g in _groups(sr)]
    assert names[0].startswith("Image prediction")
    assert not any(n.startswith(("Breast", "Benign finding", "Malignant finding"))
                   for n in names)


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
