"""Parametric Maps of the saliency: integer values through the real-world value mapping,
geometry, frame anatomy, transfer syntax, references, validity."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomnode.results import ResultOptions, build_parametric_map, build_parametric_maps
from dicomnode.results.geometry import block_mean
from dicomnode.results.pmap import real_world_values, reference_parametric_map
from dicomnode.results.validate import dciodvfy_errors
from gmic.classes import BENIGN, CLASS_NAMES, MALIGNANT
from tests.support.results import (
    CASES,
    analysis_for,
    build_differences,
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
@pytest.mark.parametrize("factor,encoding", [(1, "float"), (3, "float"), (1, "integer"),
                                           (3, "integer")])
def test_pm_values_and_geometry_follow_the_source(tmp_path_factory, tmp_path, layout, modality,
                                                  factor, encoding) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    pms = build_parametric_maps(analysis, ResultOptions(
        pmap_decimation=factor, pmap_classes=CLASS_NAMES, pmap_values=encoding))
    assert len(pms) == len(CLASS_NAMES)
    # one series per class: OHIF shows only the first Parametric Map of a series
    assert pms[0].SeriesInstanceUID != pms[1].SeriesInstanceUID
    assert pms[0].SeriesNumber != pms[1].SeriesNumber
    assert pms[0].SOPInstanceUID != pms[1].SOPInstanceUID
    depth, rows, cols = analysis.image.shape
    for class_index, built in enumerate(pms):
        pm, _ = _reread(built, tmp_path, f"pm{class_index}")
        assert pm.StudyInstanceUID == analysis.image.study_uid
        if modality == "dbt":
            assert pm.FrameOfReferenceUID == analysis.image.frame_of_reference_uid
        else:  # a projection has no place in the DBT's frame of reference: its own
            assert pm.FrameOfReferenceUID != analysis.image.frame_of_reference_uid
        assert built.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian  # lossless
        shared = pm.SharedFunctionalGroupsSequence[0]
        mapping = shared.RealWorldValueMappingSequence[0]
        if encoding == "integer":  # 16-bit words (what OHIF 3.13 reads), levels 0..255
            assert (pm.BitsAllocated, pm.PixelRepresentation) == (16, 0)
            assert "FloatPixelData" not in pm
            assert float(mapping.RealWorldValueSlope) == pytest.approx(1 / 255)
            assert int(mapping.RealWorldValueLastValueMapped) == 255
        else:  # float32 on the same 256 levels: values 0..1 (what OHIF 3.13 colours)
            assert pm.BitsAllocated == 32 and "PixelData" not in pm
            assert float(mapping.RealWorldValueSlope) == 1.0
            stored = pm.pixel_array.astype(np.float64) * 255
            np.testing.assert_allclose(stored, np.rint(stored), atol=1e-3)
        anatomy = shared.FrameAnatomySequence[0]
        assert anatomy.FrameLaterality == analysis.image.laterality
        assert anatomy.AnatomicRegionSequence[0].CodeValue == "76752008"  # breast
        assert "Laterality" not in pm  # Frame Laterality says it (IOD condition)
        voi = shared.FrameVOILUTSequence[0]
        assert voi.WindowCenterWidthExplanation == "SALIENCY 0-1"  # one value, not split
        assert pm.SeriesInstanceUID != analysis.image.series_uid
        assert pm.Manufacturer == "dicomnode"
        assert "not for clinical use" in pm.SeriesDescription
        assert f"{CLASS_NAMES[class_index]} saliency" in pm.SeriesDescription
        assert pm.InstanceNumber == 1
        assert mapping.LUTLabel == ("BENIGN_SAL", "MALIG_SAL")[class_index]
        assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "130402"
        assert int(pm.NumberOfFrames) == depth
        assert (pm.Rows, pm.Columns) == (-(-rows // factor), -(-cols // factor))
        spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == pytest.approx(
            [analysis.image.pixel_spacing[0] * factor, analysis.image.pixel_spacing[1] * factor])
        slices = slice_of_frames(analysis, pm, factor)
        assert sorted(slices) == list(range(depth))
        values = real_world_values(pm)
        assert values.max() <= 1.0 and values.min() >= 0.0
        saliency = analysis.saliency_on_source(class_index)
        for frame, d in enumerate(slices):
            expected = np.clip(block_mean(saliency[d], factor), 0.0, 1.0)
            # 8-bit quantisation: within half a level of the saliency
            np.testing.assert_allclose(values[frame], expected, rtol=0, atol=0.5 / 255 + 1e-6)
        # per-frame references: the slice's frame (multi-frame) or instance (series)
        assert frame_sources(pm) == [expected_source(analysis, d) for d in slices]
        # stored along the normal (row x column direction): OHIF copies the frames in
        # storage order into the source's volume, which cornerstone3D stacks that way
        assert np.all(np.diff(_along_normal(pm)) > 0) or depth == 1


def _along_normal(ds) -> np.ndarray:
    iop = np.array(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient, float)
    return frame_positions(ds) @ np.cross(iop[:3], iop[3:])


def test_malignant_map_only_by_default_and_explicit_vr_on_request(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    pms = build_parametric_maps(analysis, ResultOptions(deflate=False))
    assert [pm.ContentLabel for pm in pms] == ["MALIG_SAL"]
    assert pms[0].Modality == "OT"  # not MG: a map is no image of the breast
    assert pms[0].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_deflated_map_is_a_small_fraction_of_float32(tmp_path_factory, tmp_path) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    float32_bytes = 4 * int(np.prod(analysis.image.shape))
    for values in ("float", "integer"):
        pm = build_parametric_maps(analysis, ResultOptions(pmap_values=values))[0]
        path = tmp_path / "pm.dcm"
        pm.save_as(path, enforce_file_format=True)
        assert path.stat().st_size < 0.05 * float32_bytes, values


def test_pm_series_are_reproduced_by_a_rerun(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "ffdm")
    options = ResultOptions(pmap_decimation=4, pmap_classes=CLASS_NAMES)
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
    pm = build_parametric_maps(analysis, ResultOptions(pmap_decimation=1))[0]
    assert pm.ContentLabel == "MALIG_SAL"
    slices = slice_of_frames(analysis, pm, 1)
    values = real_world_values(pm)
    peak_frame = int(np.argmax(values.reshape(len(slices), -1).max(axis=1)))
    assert slices[peak_frame] == int(np.argmax(analysis.saliency[:, MALIGNANT].max(axis=(1, 2))))


def test_pm_size_cap_picks_a_decimation(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    depth, rows, cols = analysis.image.shape
    cap = depth * rows * cols * 2  # 5 bytes a pixel: factor 1 is too big, 2 (a quarter) fits
    pm = build_parametric_maps(analysis, ResultOptions(max_array_bytes=cap))[0]
    assert (pm.Rows, pm.Columns) == (-(-rows // 2), -(-cols // 2))


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("factor", [1, 3])
def test_pm_passes_dciodvfy(tmp_path_factory, tmp_path, layout, modality, factor) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    for class_index, pm in enumerate(build_parametric_maps(
            analysis, ResultOptions(pmap_decimation=factor, pmap_classes=CLASS_NAMES))):
        path = tmp_path / f"pm{class_index}.dcm"
        pm.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("factor,encoding", [(1, "float"), (3, "float"), (1, "integer"),
                                           (2, "integer")])
def test_pm_is_the_dataset_highdicom_builds_from_the_whole_array(
        tmp_path_factory, layout, modality, factor, encoding) -> None:
    """build_parametric_map writes the pixel data itself (highdicom gets a stand-in array):
    the same dataset, element for element and byte for byte, as highdicom builds from the
    whole value array with the frames then reordered along the normal."""
    analysis = analysis_for(tmp_path_factory, layout, modality)
    for class_index in range(len(CLASS_NAMES)):
        options = ResultOptions(pmap_decimation=factor, pmap_values=encoding)
        fast = build_parametric_map(analysis, class_index, options)
        slow = reference_parametric_map(analysis, class_index, options)
        assert build_differences(fast, slow) == []
        assert fast.file_meta == slow.file_meta
        keyword = "PixelData" if encoding == "integer" else "FloatPixelData"
        assert type(getattr(fast, keyword)) is bytes
        assert getattr(fast, keyword) == getattr(slow, keyword)
