"""Mammography CAD SR (TID 4000) of a study's DBT images: template structure, Image Library
with the marked frames, a mark per flagged region (none below the floor) on its most
salient slice, probabilities of cancer, operating points and rendering intents, CC+MLO
composite features, the summary code agreeing with the impressions, reproducible content;
dciodvfy, dsrdump and PixelMed's DicomSRValidator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MammographyCADSRStorage as MAMMOGRAPHY_CAD_SR

from dicomnode.pipeline.analysis import (
    AttendedRegion,
    BreastAnalysis,
    ClassProbabilities,
    ImageAnalysis,
)
from dicomnode.results import ResultOptions, ResultsError
from dicomnode.results.cad_sr import build_cad_sr
from dicomnode.results.findings import FlaggedRegion, flagged_regions
from dicomnode.results.sr import _box
from dicomnode.results.validate import (
    dciodvfy_error_lines,
    dciodvfy_output,
    dsrdump_errors,
    dsrdump_output,
    sr_validator_errors,
)
from tests.support.results import code, make_analysis, named, study_root

OPTIONS = ResultOptions(thresholds=(0.5, 0.5), cad_operating_points=(0.5, 0.35, 0.25),
                        cad_presentation_required=1)
# peak malignant saliency per view, in file order (L_CC, L_MLO, R_CC, R_MLO): operating
# point 1 (required), 3 (optional), 1, and one below the floor (no mark)
PEAKS = (0.8125, 0.3, 0.625, 0.125)
LATERALITY = {"R": ("73056007", "SCT"), "L": ("80248007", "SCT")}
VIEW = {"CC": ("399162004", "SCT"), "MLO": ("399368009", "SCT")}
REQUIRED, OPTIONAL = ("111150", "DCM"), ("111151", "DCM")


def _dbt_analyses(tmp_path_factory, layout: str,
                  peaks: tuple[float, ...] = PEAKS) -> list[ImageAnalysis]:
    """One analysis per DBT view of the synthetic study, each with a malignant blob of its
    own peak on its own slice, all at the same place in the breast (so the CC and MLO
    marks of a breast are one lesion); the last view's most attended region is not its
    first one."""
    root = study_root(tmp_path_factory, layout)
    paths = sorted(p for p in (next(root.glob("*/dbt")).iterdir()))
    out = []
    for i, path in enumerate(paths):
        finding = {"path": str(path.relative_to(root)), "frame": 2 + i, "row": 120.0,
                   "col": 90.0, "radius_px": 20.0, "malignant": 1}
        analysis = make_analysis(root, finding, peak=peaks[i])
        if i == len(paths) - 1:
            depth, rows, cols = analysis.image.shape
            analysis.regions = [AttendedRegion(1, 10, 20, 64, 48, 0.2),
                                AttendedRegion(depth - 2, 40, 30, 96, 80, 0.7),
                                AttendedRegion(0, 0, 0, 32, 32, 0.1)]
        analysis.final = ClassProbabilities(benign=0.25, malignant=peaks[i] / 2)
        out.append(analysis)
    return out


def _child(item: Dataset, code: tuple[str, str]) -> Dataset:
    (child,) = named(item, code)
    return child


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
    return {code(c): code(c, "ConceptCodeSequence") for c in entry.ContentSequence
            if c.ValueType == "CODE"}


def _impressions(sr: Dataset) -> list[Dataset]:
    return named(_child(sr, ("111017", "DCM")), ("111034", "DCM"))


def _findings(sr: Dataset) -> list[Dataset]:
    """Every Single Image Finding, standing alone or inside a Composite Feature."""
    out = []
    for container in _impressions(sr):
        out += named(container, ("111059", "DCM"))
        for composite in named(container, ("111015", "DCM")):
            out += named(composite, ("111059", "DCM"))
    return out


def _summary_code(sr: Dataset) -> tuple[str, str]:
    return code(_child(sr, ("111017", "DCM")), "ConceptCodeSequence")


def _intent(item: Dataset) -> tuple[str, str]:
    return code(_child(item, ("111056", "DCM")), "ConceptCodeSequence")


def _num(item: Dataset, code: tuple[str, str]) -> float:
    return float(_child(item, code).MeasuredValueSequence[0].NumericValue)


def _value_types(item: Dataset) -> set[str]:
    out = set()
    for child in item.get("ContentSequence", []):
        out |= {str(child.get("ValueType", ""))} | _value_types(child)
    return out


def _save(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def _mark_key(analysis: ImageAnalysis, region: FlaggedRegion) -> tuple[str, int | None]:
    image = analysis.image
    multi_frame = len(set(image.sop_instance_uids)) == 1 and image.shape[0] > 1
    frame = image.frame_numbers[region.frame_index] if multi_frame else None
    return image.sop_instance_uids[region.frame_index], frame


def _expected(analyses: list[ImageAnalysis]) -> list[tuple[ImageAnalysis, FlaggedRegion]]:
    floor = OPTIONS.cad_operating_points[-1]
    return [(a, r) for a in analyses for r in flagged_regions(a, 1, floor)]


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
    assert code(sr) == ("111036", "DCM")
    assert [code(c) for c in sr.ContentSequence] == [
        ("121049", "DCM"), ("111028", "DCM"), ("111017", "DCM"), ("111064", "DCM"),
        ("111065", "DCM")]
    assert "SCOORD" in _value_types(sr) and "SCOORD3D" not in _value_types(sr)

    # one mark per flagged region (one blob per view), none on the view below the floor
    expected = _expected(analyses)
    assert [a.image.sop_instance_uids[0] for a, _ in expected] == \
        [a.image.sop_instance_uids[0] for a in analyses[:3]]

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
        assert len(whole) == 4 and len(keys) == 4 + len(expected)
    else:
        assert len(keys) == len(whole)  # each marked slice is an instance of its own

    # each mark: Center at the region's peak, Outline its box, on its most salient slice
    findings = _findings(sr)
    assert len(findings) == len(expected)
    by_source = {}
    for finding in findings:
        center, outline = _child(finding, ("111010", "DCM")), _child(finding, ("111041", "DCM"))
        (ref,), (ref2,) = center.ContentSequence, outline.ContentSequence
        assert ref.RelationshipType == "SELECTED FROM"
        assert list(ref.ReferencedContentItemIdentifier) == \
            list(ref2.ReferencedContentItemIdentifier)
        entry = _resolve(sr, ref.ReferencedContentItemIdentifier)
        by_source[_library_key(entry)] = (finding, center, outline, entry)
    for analysis, region in expected:
        finding, center, outline, entry = by_source[_mark_key(analysis, region)]
        assert _acq(entry)[("111027", "DCM")] == LATERALITY[analysis.image.laterality]
        assert center.GraphicType == "POINT" and outline.GraphicType == "POLYLINE"
        row, col = region.centre
        np.testing.assert_allclose(np.array(center.GraphicData, dtype=float),
                                   [col + 0.5, row + 0.5])
        np.testing.assert_allclose(np.array(outline.GraphicData, dtype=float).reshape(-1, 2),
                                   _box(*region.box))
        assert region.contains(row, col)
        # the probability of cancer of the lesion, not a certainty of the finding's type
        assert _num(finding, ("111047", "DCM")) == pytest.approx(100 * region.peak, abs=0.01)
        assert not named(finding, ("111012", "DCM"))
        # on the blob's slice, at the blob
        assert region.frame_index == 2 + next(i for i, a in enumerate(analyses) if a is analysis)
        assert abs(row - 120) <= 20 and abs(col - 90) <= 20

    # the detection summary references the whole images; evidence lists every instance
    performed = _child(_child(sr.ContentSequence[3], ("111063", "DCM")), ("111022", "DCM"))
    refs = [_library_key(_resolve(sr, c.ReferencedContentItemIdentifier))
            for c in performed.ContentSequence if "ReferencedContentItemIdentifier" in c]
    assert sorted(refs) == sorted(whole)
    assert _num(performed, ("111072", "DCM")) == 3  # operating points
    assert _num(performed, ("111092", "DCM")) == 1  # marks required from
    evidence = {str(r.ReferencedSOPInstanceUID)
                for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {u for a in analyses for u in a.image.sop_instance_uids}


def test_operating_points_and_rendering_intents(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    sr = build_cad_sr(analyses, OPTIONS)
    assert _summary_code(sr) == ("111242", "DCM")
    points = OPTIONS.cad_operating_points
    seen = []
    for finding in _findings(sr):
        peak = _num(finding, ("111047", "DCM")) / 100
        point = next(n for n, t in enumerate(points, 1) if peak >= t - 1e-4)
        seen.append(point)
        intent = _child(finding, ("111056", "DCM"))
        if point <= OPTIONS.cad_presentation_required:
            assert _intent(finding) == REQUIRED and "ContentSequence" not in intent
        else:
            assert _intent(finding) == OPTIONAL
            assert _num(intent, ("111071", "DCM")) == point
    assert sorted(seen) == [1, 1, 3]
    # a site that wants every mark drawn
    everything = build_cad_sr(analyses, replace(OPTIONS, cad_presentation_required=3))
    assert {_intent(f) for f in _findings(everything)} == {REQUIRED}
    assert {_intent(c) for c in _impressions(everything)} == {REQUIRED}


def test_cc_and_mlo_marks_of_one_lesion_are_a_composite_feature(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    sr = build_cad_sr(analyses, OPTIONS)
    impressions = _impressions(sr)
    assert len(impressions) == 2  # left: CC + MLO as one lesion; right: CC alone
    composites = [c for imp in impressions for c in named(imp, ("111015", "DCM"))]
    (composite,) = composites
    assert code(_child(composite, ("111016", "DCM")), "ConceptCodeSequence") == \
        ("111154", "DCM")
    assert code(_child(composite, ("111057", "DCM")), "ConceptCodeSequence") == \
        ("111158", "DCM")
    parts = named(composite, ("111059", "DCM"))
    assert [p.RelationshipType for p in parts] == ["INFERRED FROM"] * 2
    views = set()
    for part in parts:
        center = _child(part, ("111010", "DCM"))
        entry = _resolve(sr, center.ContentSequence[0].ReferencedContentItemIdentifier)
        acq = _acq(entry)
        assert acq[("111027", "DCM")] == LATERALITY["L"]
        views.add(acq[("111031", "DCM")])
    assert views == {VIEW["CC"], VIEW["MLO"]}
    # the lesion's probability: the higher of its two views; drawn: one view is required
    assert _num(composite, ("111047", "DCM")) == \
        max(_num(p, ("111047", "DCM")) for p in parts)
    assert _intent(composite) == REQUIRED


def test_nothing_above_the_floor_no_mark_and_without_findings(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced", (0.1, 0.2, 0.24, 0.125))
    sr = build_cad_sr(analyses, OPTIONS)
    assert _summary_code(sr) == ("111241", "DCM")
    assert _impressions(sr) == [] and _findings(sr) == []
    assert "SCOORD" not in _value_types(sr)
    # the case and breast scores are there all the same
    text = str(_child(_child(sr, ("111017", "DCM")), ("111033", "DCM")).TextValue)
    assert "case 9.1%" in text and "right breast 9.1%" in text and "left breast 7.5%" in text
    lower = build_cad_sr(analyses, replace(OPTIONS, cad_operating_points=(0.5, 0.15)))
    assert _summary_code(lower) == ("111242", "DCM") and _impressions(lower)


def test_images_left_out_make_not_all_algorithms_succeeded(tmp_path_factory) -> None:
    """The reader must know the case was not read whole: CID 6047's "Not all algorithms
    succeeded", with the images left out named in the summary's description."""
    reason = "cannot build the SEG of image 1.2.3: no frame of reference"
    with_marks = build_cad_sr(_dbt_analyses(tmp_path_factory, "enhanced"), OPTIONS,
                              left_out=[reason])
    assert _summary_code(with_marks) == ("111244", "DCM") and _impressions(with_marks)
    text = str(_child(_child(with_marks, ("111017", "DCM")), ("111033", "DCM")).TextValue)
    assert text.endswith("not analysed: " + reason)
    quiet = _dbt_analyses(tmp_path_factory, "enhanced", (0.1, 0.2, 0.24, 0.125))
    assert _summary_code(build_cad_sr(quiet, OPTIONS, left_out=[reason])) == ("111243", "DCM")


def test_breast_scores_come_from_the_breast_results(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    breasts = {lat: BreastAnalysis(lat, ClassProbabilities(0.5, p)) for lat, p in
               (("L", 0.0625), ("R", 0.875))}
    sr = build_cad_sr(analyses, OPTIONS, breasts=breasts)
    text = str(_child(_child(sr, ("111017", "DCM")), ("111033", "DCM")).TextValue)
    assert "case 87.5%" in text and "left breast 6.2%" in text


def test_uids_and_content_are_reproducible(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    a, b = build_cad_sr(analyses, OPTIONS), build_cad_sr(list(reversed(analyses)), OPTIONS)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert [i.to_json_dict() for i in a.ContentSequence] == \
        [i.to_json_dict() for i in b.ContentSequence]
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


def test_a_missing_saliency_map_is_an_error_not_an_empty_report(tmp_path_factory) -> None:
    analyses = _dbt_analyses(tmp_path_factory, "enhanced")
    analyses[0] = replace(analyses[0], saliency=analyses[0].saliency[:0])
    with pytest.raises(ResultsError, match="saliency"):
        build_cad_sr(analyses, OPTIONS)


@pytest.mark.parametrize("points,required", [((0.5, 0.5), 1), ((0.3, 0.5), 1), ((), 1),
                                             ((0.5, 0.25), 3), ((1.0,), 1)])
def test_operating_points_must_be_decreasing_thresholds(points, required) -> None:
    with pytest.raises(ValueError):
        ResultOptions(cad_operating_points=points, cad_presentation_required=required)


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout", ["enhanced", "single-frame"])
def test_cad_sr_passes_dciodvfy(tmp_path_factory, tmp_path, layout) -> None:
    path = _save(build_cad_sr(_dbt_analyses(tmp_path_factory, layout), OPTIONS),
                 tmp_path / "cad.dcm")
    report = dciodvfy_output(path)
    assert dciodvfy_error_lines(report) == []
    assert [line for line in report.splitlines() if line.startswith("Warning")] == []


@pytest.mark.dcmtk
def test_dsrdump_renders_the_cad_sr(tmp_path_factory, tmp_path) -> None:
    path = _save(build_cad_sr(_dbt_analyses(tmp_path_factory, "enhanced"), OPTIONS),
                 tmp_path / "cad.dcm")
    assert dsrdump_errors(path) == []
    text = dsrdump_output(path)
    assert "Mammography CAD SR Document" in text
    assert 'NUM:(,,"Probability of cancer")=' in text and "Certainty of Finding" not in text
    assert "(POINT," in text and "Presentation Optional" in text
    assert 'CODE:(,,"Composite Feature")' in text


@pytest.mark.pixelmed
@pytest.mark.slow
@pytest.mark.parametrize("layout,peaks", [
    pytest.param("enhanced", PEAKS, id="dbt-enhanced"),
    pytest.param("single-frame", PEAKS, id="dbt-single-frame-series"),
    pytest.param("enhanced", (0.1, 0.2, 0.15, 0.125), id="without-findings"),
    pytest.param("enhanced", PEAKS, id="image-left-out"),
])
def test_cad_sr_passes_pixelmed_template_validation(tmp_path_factory, tmp_path, layout,
                                                    peaks, request) -> None:
    left_out = ["image 1.2.3: no frame of reference"] \
        if request.node.callspec.id == "image-left-out" else []
    path = _save(build_cad_sr(_dbt_analyses(tmp_path_factory, layout, peaks), OPTIONS,
                              left_out=left_out), tmp_path / "cad.dcm")
    assert sr_validator_errors(path) == []


def test_worker_builds_it_for_dbt_only_when_enabled(tmp_path_factory) -> None:
    from types import SimpleNamespace

    from dicomnode.config import Config
    from dicomnode.pipeline.worker import _default_study_result_builder

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
