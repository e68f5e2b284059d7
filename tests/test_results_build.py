"""build_results: one SR, SEG and two PMs per image, each a new series in the source study."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest

from dicomnode.results import (
    ResultOptions,
    ResultsError,
    ResultSet,
    build_results,
    build_segmentation,
)
from dicomnode.results.validate import dciodvfy_errors
from tests.results_support import CASES, analysis_for, make_breast


def test_build_results_makes_one_series_per_object(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    results = build_results(analysis, make_breast(analysis), ResultOptions())
    assert isinstance(results, ResultSet)
    assert results.seg is not None and len(results.pmaps) == 2
    assert results.datasets == [results.seg, *results.pmaps, results.sr]
    for ds in results.datasets:
        assert ds.StudyInstanceUID == analysis.image.study_uid
        assert ds.PatientID == "SYNTH-1-0001"
        assert ds.Manufacturer == "dicomnode"
        assert ds.SoftwareVersions == analysis.algorithm.version
        assert ds.SeriesInstanceUID != analysis.image.series_uid
    series = {ds.SeriesInstanceUID for ds in results.datasets}
    assert len(series) == 4  # SR, SEG, benign PM, malignant PM
    assert len({int(ds.SeriesNumber) for ds in results.datasets}) == 4
    assert len({ds.SOPInstanceUID for ds in results.datasets}) == 4


def test_a_rerun_reproduces_the_uids_and_new_options_do_not(tmp_path_factory) -> None:
    # a job run again after its worker died must rewrite the same objects, not send copies
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")

    def uids(options: ResultOptions) -> list[tuple[str, str]]:
        return [(ds.SeriesInstanceUID, ds.SOPInstanceUID)
                for ds in build_results(analysis, make_breast(analysis), options).datasets]

    first = uids(ResultOptions())
    assert uids(ResultOptions()) == first
    changed = uids(ResultOptions(thresholds=(0.3, 0.3)))
    assert not {sop for _, sop in changed} & {sop for _, sop in first}


def test_no_seg_when_not_asked(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "ffdm")
    results = build_results(analysis, None, ResultOptions(make_seg=False))
    assert results.seg is None and results.segmentation is None
    assert results.datasets == [*results.pmaps, results.sr]


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout,modality", CASES)
def test_every_result_passes_dciodvfy(tmp_path_factory, tmp_path, layout, modality) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    results = build_results(analysis, make_breast(analysis), ResultOptions())
    for n, ds in enumerate(results.datasets):
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.Modality


def test_a_source_highdicom_rejects_is_a_results_error(tmp_path_factory, tmp_path) -> None:
    """A slice series without positions cannot be placed: a named error, not a crash."""
    analysis = analysis_for(tmp_path_factory, "single-frame", "dbt")
    paths = []
    for n, path in enumerate(analysis.image.source_paths[:2]):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1])
    image = dataclasses.replace(analysis.image, pixels=analysis.image.pixels[:2],
                                source_paths=paths,
                                sop_instance_uids=analysis.image.sop_instance_uids[:2],
                                frame_numbers=[1, 1],
                                slice_positions=analysis.image.slice_positions[:2])
    broken = dataclasses.replace(analysis, image=image, saliency=analysis.saliency[:2],
                                 transform=dataclasses.replace(
                                     analysis.transform,
                                     source_shape=(2, *analysis.transform.source_shape[1:])))
    with pytest.raises(ResultsError, match="cannot build the SEG of image"):
        build_segmentation(broken)
