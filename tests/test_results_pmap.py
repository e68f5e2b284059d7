"""Parametric Maps of the saliency: values, geometry, references, validity."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicomnode.analysis import BENIGN, CLASS_NAMES, MALIGNANT
from dicomnode.results import ResultOptions, build_parametric_maps
from dicomnode.results.geometry import block_mean
from dicomnode.results.validate import dciodvfy_errors
from tests.results_support import (
    CASES,
    analysis_for,
    expected_source,
    frame_positions,
    frame_sources,
    slice_of_frames,
)


def _reread(ds, tmp_path, name: str):
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("factor", [1, 3])
def test_pm_values_and_geometry_follow_the_source(tmp_path_factory, tmp_path, layout, modality,
                                                  factor) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    pms = build_parametric_maps(analysis, ResultOptions(pmap_decimation=factor))
    assert len(pms) == len(CLASS_NAMES)
    # one series per class: OHIF shows only the first Parametric Map of a series
    assert pms[0].SeriesInstanceUID != pms[1].SeriesInstanceUID
    assert pms[0].SeriesNumber != pms[1].SeriesNumber
    assert pms[0].SOPInstanceUID != pms[1].SOPInstanceUID
    depth, rows, cols = analysis.image.shape
    for class_index, built in enumerate(pms):
        pm, _ = _reread(built, tmp_path, f"pm{class_index}")
        assert pm.StudyInstanceUID == analysis.image.study_uid
        assert pm.FrameOfReferenceUID == analysis.image.frame_of_reference_uid
        assert pm.SeriesInstanceUID != analysis.image.series_uid
        assert pm.Manufacturer == "dicomnode"
        assert "not for clinical use" in pm.SeriesDescription
        assert f"{CLASS_NAMES[class_index]} saliency" in pm.SeriesDescription
        assert pm.InstanceNumber == 1
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.LUTLabel == ("BENIGN_SAL", "MALIG_SAL")[class_index]
        assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "130402"
        assert int(pm.NumberOfFrames) == depth
        assert (pm.Rows, pm.Columns) == (-(-rows // factor), -(-cols // factor))
        spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == pytest.approx(
            [analysis.image.pixel_spacing[0] * factor, analysis.image.pixel_spacing[1] * factor])
        slices = slice_of_frames(analysis, pm, factor)
        assert sorted(slices) == list(range(depth))
        values = pm.pixel_array.reshape(depth, pm.Rows, pm.Columns)
        saliency = analysis.saliency_on_source(class_index)
        for frame, d in enumerate(slices):
            expected = block_mean(saliency[d], factor)
            np.testing.assert_allclose(values[frame], expected, rtol=1e-6, atol=1e-7)
        # per-frame references: the slice's frame (multi-frame) or instance (series)
        assert frame_sources(pm) == [expected_source(analysis, d) for d in slices]
        # stored along the normal (row x column direction): OHIF copies the frames in
        # storage order into the source's volume, which cornerstone3D stacks that way
        assert np.all(np.diff(_along_normal(pm)) > 0) or depth == 1


def _along_normal(ds) -> np.ndarray:
    iop = np.array(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient, float)
    return frame_positions(ds) @ np.cross(iop[:3], iop[3:])


def test_pm_series_are_reproduced_by_a_rerun(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "ffdm")
    options = ResultOptions(pmap_decimation=4)
    first, again = (build_parametric_maps(analysis, options) for _ in range(2))
    assert [(p.SeriesInstanceUID, p.SOPInstanceUID) for p in first] == \
        [(p.SeriesInstanceUID, p.SOPInstanceUID) for p in again]
    # malignant first in a viewer's series list, series numbers after the source's
    source = int(pydicom.dcmread(analysis.image.source_paths[0],
                                 stop_before_pixels=True).SeriesNumber) % 1000
    assert (int(first[MALIGNANT].SeriesNumber), int(first[BENIGN].SeriesNumber)) == \
        (9000 + source, 10000 + source)


def test_pm_peak_is_on_the_finding_slice(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    pm = build_parametric_maps(analysis, ResultOptions(pmap_decimation=1))[MALIGNANT]
    slices = slice_of_frames(analysis, pm, 1)
    values = pm.pixel_array.reshape(len(slices), pm.Rows, pm.Columns)
    peak_frame = int(np.argmax(values.reshape(len(slices), -1).max(axis=1)))
    assert slices[peak_frame] == int(np.argmax(analysis.saliency[:, MALIGNANT].max(axis=(1, 2))))


def test_pm_size_cap_picks_a_decimation(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    depth, rows, cols = analysis.image.shape
    cap = depth * rows * cols * 4 // 3  # factor 1 is too big, factor 2 (a quarter) fits
    pm = build_parametric_maps(analysis, ResultOptions(max_array_bytes=cap))[BENIGN]
    assert (pm.Rows, pm.Columns) == (-(-rows // 2), -(-cols // 2))


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("factor", [1, 3])
def test_pm_passes_dciodvfy(tmp_path_factory, tmp_path, layout, modality, factor) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    for class_index, pm in enumerate(build_parametric_maps(
            analysis, ResultOptions(pmap_decimation=factor))):
        path = tmp_path / f"pm{class_index}.dcm"
        pm.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
