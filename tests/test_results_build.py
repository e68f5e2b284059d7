"""build_results: one SR, SEG and the Parametric Maps asked for per image, each a new series
in the source study, each with the IHE AI Results identification."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    MammographyCADSRStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from dicomnode.results import (
    ResultOptions,
    ResultsError,
    ResultSet,
    build_results,
    build_segmentation,
)
from dicomnode.results.validate import dciodvfy_errors
from gmic.classes import CLASS_NAMES
from tests.support.results import CASES, analysis_for, make_breast


def test_build_results_makes_one_series_per_object(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    results = build_results(analysis, make_breast(analysis), ResultOptions())
    assert isinstance(results, ResultSet)
    assert results.seg is not None and len(results.pmaps) == 1  # malignant by default
    assert results.datasets == [results.seg, *results.pmaps, results.sr]
    for ds in results.datasets:
        assert ds.StudyInstanceUID == analysis.image.study_uid
        assert ds.PatientID == "SYNTH-1-0001"
        assert ds.Manufacturer == "dicomnode"
        assert ds.SeriesInstanceUID != analysis.image.series_uid
    series = {ds.SeriesInstanceUID for ds in results.datasets}
    assert len(series) == 3  # SR, SEG, malignant PM
    assert len({int(ds.SeriesNumber) for ds in results.datasets}) == 3
    assert len({ds.SOPInstanceUID for ds in results.datasets}) == 3
    both = build_results(analysis, None, ResultOptions(pmap_classes=CLASS_NAMES))
    assert [pm.ContentLabel for pm in both.pmaps] == ["BENIGN_SAL", "MALIG_SAL"]


def test_a_rerun_reproduces_the_uids_and_new_options_do_not(tmp_path_factory) -> None:
    # a job run again after its worker died must rewrite the same objects, not send copies
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")

    def uids(options: ResultOptions) -> list[tuple[str, str, str | None]]:
        out = []
        for ds in build_results(analysis, make_breast(analysis), options).datasets:
            # highdicom draws the Dimension Organization UID at random: derived here too
            organization = {str(i.DimensionOrganizationUID)
                            for i in ds.get("DimensionOrganizationSequence", [])}
            named = {str(i.DimensionOrganizationUID)
                     for i in ds.get("DimensionIndexSequence", [])}
            assert named == organization and len(organization) == (ds.Modality != "SR")
            out.append((ds.SeriesInstanceUID, ds.SOPInstanceUID, min(organization, default=None)))
        return out

    first = uids(ResultOptions())
    assert uids(ResultOptions()) == first
    changed = uids(ResultOptions(thresholds=(0.3, 0.3)))
    assert not {sop for _, sop, _ in changed} & {sop for _, sop, _ in first}
    # the chest-wall window reads another part of a large breast: other objects too
    windowed = dataclasses.replace(analysis, algorithm=dataclasses.replace(
        analysis.algorithm, whole_breast=False))
    other = [ds.SOPInstanceUID for ds in build_results(
        windowed, make_breast(windowed), ResultOptions()).datasets]
    assert not set(other) & {sop for _, sop, _ in first}


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


def _air_item(ds):
    """The Contributing Equipment item that identifies the processing algorithm."""
    items = [i for i in ds.ContributingEquipmentSequence
             if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"]
    assert len(items) == 1, f"one Processing Algorithm item in {ds.SOPClassUID.name}: {items}"
    return items[0]


def test_every_result_kind_carries_the_ihe_air_identification(tmp_path_factory,
                                                              tmp_path) -> None:
    """SR, SEG, Parametric Map (build_results) and the CAD SR (as the worker builds it):
    Contributing Equipment "Processing Algorithm" with the weights' Device UID, Software
    Versions naming node and weights, Series Date/Time, the source's Institution Name."""
    from dicomnode.config import Config
    from dicomnode.pipeline.worker import _default_study_result_builder
    from dicomnode.results import identify_result

    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    source = pydicom.dcmread(analysis.image.source_paths[0], stop_before_pixels=True)
    datasets = build_results(analysis, make_breast(analysis), ResultOptions()).datasets
    job = type("Job", (), {"id": 1, "study_uid": analysis.image.study_uid})()
    cad = [ds for ds, _ in _default_study_result_builder(Config())(job, [analysis])]
    assert len(cad) == 1
    kinds = {str(ds.SOPClassUID) for ds in [*datasets, *cad]}
    assert kinds == {SegmentationStorage, ParametricMapStorage,
                     Comprehensive3DSRStorage, MammographyCADSRStorage}
    device_uids = set()
    for n, built in enumerate([*datasets, *cad]):
        path = tmp_path / f"{n}.dcm"
        built.save_as(path, enforce_file_format=True)
        ds = pydicom.dcmread(path)  # as the PACS reads it
        item = _air_item(ds)
        assert item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
        assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert item.Manufacturer == "dicomnode"
        assert item.ManufacturerModelName == "3D-GMIC"
        versions = list(ds.SoftwareVersions)
        assert list(item.SoftwareVersions) == versions
        assert versions[0] == f"dicomnode {analysis.algorithm.version}"
        assert analysis.algorithm.checkpoint_sha256[:16] in versions[1]
        assert ds.SeriesDate and ds.SeriesTime
        assert ds.InstitutionName == source.InstitutionName
        device_uids.add(str(item.DeviceUID))
    assert len(device_uids) == 1  # the same weights: one device
    (uid,) = device_uids
    assert pydicom.uid.UID(uid).is_valid

    # other weights: another Device UID; a second call replaces its own item
    retrained = dataclasses.replace(analysis, algorithm=dataclasses.replace(
        analysis.algorithm, checkpoint_sha256="f" * 64))
    ds = build_results(retrained, None, ResultOptions()).datasets[0]
    ds = identify_result(ds, retrained.algorithm)
    assert str(_air_item(ds).DeviceUID) != uid
    again = build_results(analysis, None, ResultOptions()).datasets[0]
    assert str(_air_item(again).DeviceUID) == uid
