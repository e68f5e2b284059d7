"""Mammography CAD SR (TID 4000) of a study's DBT images: template structure, Image Library
with the marked frames, rendering intents by operating point, marks on the right slice,
certainties; dciodvfy, dsrdump and PixelMed's DicomSRValidator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.analysis import AttendedRegion, ClassProbabilities, ImageAnalysis
from dicomnode.results import ResultOptions, ResultsError
from dicomnode.results.cad_sr import MAMMOGRAPHY_CAD_SR, build_cad_sr
from dicomnode.results.sr import _box
from dicomnode.results.validate import (
    dciodvfy_errors,
    dsrdump_errors,
    dsrdump_output,
    sr_validator_errors,
)
from tests.results_support import make_analysis, study_root

OPTIONS = ResultOptions(thresholds=(0.5, 0.5))
# malignant probability per view, in file order (L_CC, L_MLO, R_CC, R_MLO): two above the
# operating point, one exactly on it (counts as above), one below
MALIGNANT = (0.8125, 0.25, 0.5, 0.0625)
LATERALITY = {"R": ("73056007", "SCT"), "L": ("80248007", "SCT")}
VIEW = {"CC": ("399162004", "SCT"), "MLO": ("399368009", "SCT")}


def _dbt_analyses(tmp_path_factory, layout: str,
                  malignant: tuple[float, ...] = MALIGNANT) -> list[ImageAnalysis]:
    """One analysis per DBT view of the synthetic study, each with a blob on its own slice;
    the last view's most attended region is not its first one."""
    root = study_root(tmp_path_factory, layout)
    paths = sorted(p for p in (next(root.glob("*/dbt")).iterdir()))
    out = []
    for i, path in enumerate(paths):
        finding = {"path": str(path.relative_to(root)), "frame": 2 + i, "row": 120.0,
                   "col": 90.0, "radius_px": 20.0, "malignant": 1}
        analysis = make_analysis(root, finding)
        if i == len(paths) - 1:
            depth, rows, cols = analysis.image.shape
            analysis.regions = [AttendedRegion(1, 10, 20, 64, 48, 0.2),
                                AttendedRegion(depth - 2, 40, 30, 96, 80, 0.7),
                                AttendedRegion(0, 0, 0, 32, 32, 0.1)]
        analysis.final = ClassProbabilities(benign=1 - malignant[i], malignant=malignant[i])
        out.append(analysis)
    return out


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = getattr(item, keyword)[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _child(item: Dataset, code: tuple[str, str]) -> Dataset:
    return next(c for c in item.ContentSequence if "ConceptNameCodeSequence" in c
                and _code(c) == code)


def _resolve(sr: Dataset, identifier) -> Dataset:
    item = sr
    for position in list(identifier)[1:]:
        item = item.ContentSequence[int(position) - 1]
    return item


def _library_key(entry: Dataset) -> tuple[str, int | None]:
    ref = entry.ReferencedSOPSequence[0]
    frame = ref.get("ReferencedFrameNumber")
    return str(ref.ReferencedSOPInstanceUID), int(frame) if frame is not None else None


def _acq(entry: Dataset) -> dict[tuple[str, str], tuple[str, str]]:
    return {_code(c): _code(c, "ConceptCodeSequence") for c in entry.ContentSequence
            if c.ValueType == "CODE"}


def _findings(sr: Dataset) -> list[tuple[Dataset, Dataset]]:
    """(Individual Impression container, Single Image Finding) pairs."""
    summary = _child(sr, ("111017", "DCM"))
    return [(c, _child(c, ("111059", "DCM"))) for c in summary.ContentSequence]


def _value_types(item: Dataset) -> set[str]:
    out = set()
    for child in item.get("ContentSequence", []):
        out |= {str(child.get("ValueType", ""))} | _value_types(child)
    return out


def _save(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def _expected_mark(analysis: ImageAnalysis) -> tuple[AttendedRegion, tuple[str, int | None]]:
    region = max(analysis.regions, key=lambda r: r.attention)
    image = analysis.image
    multi_frame = len(set(image.sop_instance_uids)) == 1 and image.shape[0] > 1
    frame = image.frame_numbers[region.frame_index] if multi_frame else None
    return region, (image.sop_instance_uids[region.frame_index], frame)


@pytest.mark.parametrize("layout", ["enhanced", "single-frame"])
def test_cad_sr_structure_library_and_marks(tmp_path_factory, tmp_path, layout) -> None:
    analyses = _dbt_analyses(tmp_path_factory, layout)
    sr = pydicom.dcmread(_save(build_cad_sr(analyses, OPTIONS), tmp_path / "cad.dcm"))
    image0 = analyses[0].image
    assert sr.SOPClassUID == MAMMOGRAPHY_CAD_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == image0.study_uid and sr.PatientID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "4000")
    assert _code(sr) == ("111036", "DCM")
    assert [_code(c) for c in sr.ContentSequence] == [
        ("121049", "DCM"), ("111028", "DCM"), ("111017", "DCM"), ("111064", "DCM"),
        ("111065", "DCM")]
    assert "SCOORD" in _value_types(sr) and "SCOORD3D" not in _value_types(sr)

    # Image Library: every instance of every view (whole image), then the marked frames
    library = sr.ContentSequence[1].ContentSequence
    keys = [_library_key(e) for e in library]
    assert len(keys) == len(set(keys))
    for analysis in analyses:
        image = analysis.image
        for uid in set(image.sop_instance_uids):
            entry = library[keys.index((uid, None))]
            acq = _acq(entry)
            assert acq[("111027", "DCM")] == LATERALITY[image.laterality]
            assert acq[("111031", "DCM")] == VIEW[image.view]
    whole = [k for k in keys if k[1] is None]
    assert len(whole) == sum(len(set(a.image.sop_instance_uids)) for a in analyses)
    if layout == "enhanced":
        assert len(whole) == 4 and len(keys) == 8  # 4 views + 4 marked frames
    else:
        assert len(keys) == len(whole)  # each marked slice is an instance of its own

    # one finding per view, its Center and Outline on the most attended region's slice
    findings = _findings(sr)
    assert len(findings) == len(analyses)
    by_source = {}
    for _, finding in findings:
        center = _child(finding, ("111010", "DCM"))
        outline = _child(finding, ("111041", "DCM"))
        (ref,), (ref2,) = center.ContentSequence, outline.ContentSequence
        assert ref.RelationshipType == "SELECTED FROM"
        assert list(ref.ReferencedContentItemIdentifier) == \
            list(ref2.ReferencedContentItemIdentifier)
        entry = _resolve(sr, ref.ReferencedContentItemIdentifier)
        by_source[_library_key(entry)] = (center, outline, entry)
    for analysis in analyses:
        region, key = _expected_mark(analysis)
        center, outline, entry = by_source[key]
        assert _acq(entry)[("111027", "DCM")] == LATERALITY[analysis.image.laterality]
        box = _box(region.row0, region.col0, region.height, region.width)
        assert center.GraphicType == "POINT" and outline.GraphicType == "POLYLINE"
        np.testing.assert_allclose(np.array(center.GraphicData, dtype=float),
                                   [region.col0 + region.width / 2,
                                    region.row0 + region.height / 2])
        np.testing.assert_allclose(np.array(outline.GraphicData, dtype=float).reshape(-1, 2),
                                   box)
    if layout == "enhanced":  # the last view's mark is on its second region's frame
        region, key = _expected_mark(analyses[-1])
        assert region.attention == 0.7 and key[1] == analyses[-1].image.frame_numbers[
            region.frame_index]

    # the detection summary references the whole images; evidence lists every instance
    performed = _child(_child(sr.ContentSequence[3], ("111063", "DCM")), ("111022", "DCM"))
    refs = [_library_key(_resolve(sr, c.ReferencedContentItemIdentifier))
            for c in performed.ContentSequence if "ReferencedContentItemIdentifier" in c]
    assert sorted(refs) == sorted(whole)
    evidence = {str(r.ReferencedSOPInstanceUID)
                for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {u for a in analyses for u in a.image.sop_instance_uids}


def test_rendering_intents_and_certainties_follow_the_operating_point(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    sr = build_cad_sr(analyses, OPTIONS)
    assert _code(_child(sr, ("111017", "DCM")), "ConceptCodeSequence") == ("111242", "DCM")
    findings = _findings(sr)
    uid_to_prob = {a.image.sop_instance_uids[0]: a.final.malignant for a in analyses}
    seen = []
    for container, finding in findings:
        intents = {_code(_child(item, ("111056", "DCM")), "ConceptCodeSequence")
                   for item in (container, finding)}
        center = _child(finding, ("111010", "DCM"))
        entry = _resolve(sr, center.ContentSequence[0].ReferencedContentItemIdentifier)
        probability = uid_to_prob[_library_key(entry)[0]]
        seen.append(probability)
        certainty = _child(finding, ("111012", "DCM"))
        assert float(certainty.MeasuredValueSequence[0].NumericValue) == \
            pytest.approx(100 * probability)
        intent = _child(finding, ("111056", "DCM"))
        if probability >= OPTIONS.thresholds[1]:
            assert intents == {("111150", "DCM")}
            assert "ContentSequence" not in intent
        else:
            assert intents == {("111151", "DCM")}
            point = _child(intent, ("111071", "DCM"))
            assert float(point.MeasuredValueSequence[0].NumericValue) == 2
    assert sorted(seen) == sorted(MALIGNANT)


def test_without_findings_above_the_operating_point(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced", (0.1, 0.2, 0.3, 0.4))
    sr = build_cad_sr(analyses, OPTIONS)
    assert _code(_child(sr, ("111017", "DCM")), "ConceptCodeSequence") == ("111241", "DCM")
    assert len(_findings(sr)) == 4  # all Presentation Optional
    higher = build_cad_sr(analyses, ResultOptions(thresholds=(0.5, 0.05)))
    assert _code(_child(higher, ("111017", "DCM")), "ConceptCodeSequence") == \
        ("111242", "DCM")


def test_uids_are_reproducible(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    a, b = build_cad_sr(analyses, OPTIONS), build_cad_sr(list(reversed(analyses)), OPTIONS)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    other = build_cad_sr(analyses, replace(OPTIONS, thresholds=(0.5, 0.6)))
    assert other.SOPInstanceUID != a.SOPInstanceUID
    assert a.SOPInstanceUID not in {x.image.sop_instance_uids[0] for x in analyses}


def test_rejects_no_images_and_mixed_studies(tmp_path_factory) -> None:
    with pytest.raises(ResultsError):
        build_cad_sr([], OPTIONS)
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    other = _dbt_analyses(tmp_path_factory, "single-frame")
    other[0].image = replace(other[0].image, study_uid="1.2.3.4")
    with pytest.raises(ResultsError, match="one study"):
        build_cad_sr([analyses[0], other[0]], OPTIONS)


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout", ["enhanced", "single-frame"])
def test_cad_sr_passes_dciodvfy(tmp_path_factory, tmp_path, layout) -> None:
    path = _save(build_cad_sr(_dbt_analyses(tmp_path_factory, layout), OPTIONS),
                 tmp_path / "cad.dcm")
    assert dciodvfy_errors(path) == []


@pytest.mark.dcmtk
def test_dsrdump_renders_the_cad_sr(tmp_path_factory, tmp_path) -> None:
    path = _save(build_cad_sr(_dbt_analyses(tmp_path_factory, "enhanced"), OPTIONS),
                 tmp_path / "cad.dcm")
    assert dsrdump_errors(path) == []
    text = dsrdump_output(path)
    assert "Mammography CAD SR Document" in text
    assert 'NUM:(,,"Certainty of Finding")="81.25" (%,UCUM,"Percent")' in text
    assert "(POINT," in text and "Presentation Optional" in text


@pytest.mark.pixelmed
@pytest.mark.slow
@pytest.mark.parametrize("layout,malignant", [
    pytest.param("enhanced", MALIGNANT, id="dbt-enhanced"),
    pytest.param("single-frame", MALIGNANT, id="dbt-single-frame-series"),
    pytest.param("enhanced", (0.1, 0.2, 0.3, 0.4), id="without-findings"),
])
def test_cad_sr_passes_pixelmed_template_validation(tmp_path_factory, tmp_path, layout,
                                                    malignant) -> None:
    path = _save(build_cad_sr(_dbt_analyses(tmp_path_factory, layout, malignant), OPTIONS),
                 tmp_path / "cad.dcm")
    assert sr_validator_errors(path) == []


def test_worker_builds_it_for_dbt_only_when_enabled(tmp_path_factory) -> None:
    from types import SimpleNamespace

    from dicomnode.config import Config
    from dicomnode.worker import _default_study_result_builder

    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    job = SimpleNamespace(id=1, study_uid=analyses[0].image.study_uid)
    config = Config()
    assert config.results.cad_sr
    ((ds, kind),) = _default_study_result_builder(config)(job, analyses)
    assert kind == "cad-sr" and ds.SOPClassUID == MAMMOGRAPHY_CAD_SR
    ffdm = [replace(a, image=replace(a.image, modality="ffdm")) for a in analyses]
    assert _default_study_result_builder(config)(job, ffdm) == []
    config.results.cad_sr = False
    assert _default_study_result_builder(config)(job, analyses) == []
