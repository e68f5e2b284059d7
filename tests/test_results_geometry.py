"""Source normalisation, decimated grids and projection geometry of the result objects."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.results.common import ResultOptions, ResultsError
from dicomnode.results.geometry import (
    block_mean,
    decimation_factor,
    normalise_source,
    projection_orientation,
    result_grid,
    with_projection_geometry,
)
from tests.support.results import findings, make_analysis, study_root


def _per_frame_dataset(orientations: list[list[float]]) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    frames = []
    for ori in orientations:
        group = Dataset()
        plane = Dataset()
        plane.ImageOrientationPatient = ori
        measures = Dataset()
        measures.PixelSpacing = [0.1, 0.1]
        group.PlaneOrientationSequence = Sequence([plane])
        group.PixelMeasuresSequence = Sequence([measures])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def test_normalise_moves_identical_per_frame_geometry_to_shared() -> None:
    ds = normalise_source(_per_frame_dataset([[1, 0, 0, 0, 1, 0]] * 3))
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.1, 0.1]
    assert all("PlaneOrientationSequence" not in g and "PixelMeasuresSequence" not in g
               for g in ds.PerFrameFunctionalGroupsSequence)


def test_normalise_rejects_orientation_that_differs_between_frames() -> None:
    with pytest.raises(ResultsError, match="PlaneOrientationSequence per frame"):
        normalise_source(_per_frame_dataset([[1, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0]]))


def test_normalise_leaves_shared_geometry_and_single_frames_alone() -> None:
    ds = Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert normalise_source(ds) is ds and "SharedFunctionalGroupsSequence" not in ds


def test_decimation_factor_is_the_smallest_that_fits() -> None:
    full_dbt = (60, 2116, 1339)
    assert decimation_factor(full_dbt, 4, 64 * 2**20) == 4  # one float32 class per PM
    assert decimation_factor(full_dbt, 2, 64 * 2**20) == 3  # 2 segments x uint8
    assert decimation_factor((1, 2866, 1814), 4, 64 * 2**20) == 1  # FFDM PM: 21 MB
    assert decimation_factor(full_dbt, 4, 64 * 2**20, forced=2) == 2
    depth, rows, cols = full_dbt
    f = decimation_factor(full_dbt, 4, 64 * 2**20)
    assert depth * -(-rows // f) * -(-cols // f) * 4 <= 64 * 2**20
    assert depth * -(-rows // (f - 1)) * -(-cols // (f - 1)) * 4 > 64 * 2**20


def test_block_mean_averages_whole_and_edge_blocks() -> None:
    frame = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    out = block_mean(frame, 3)
    assert out.shape == (2, 3)
    assert out[0, 0] == pytest.approx(frame[:3, :3].mean())
    assert out[1, 2] == pytest.approx(frame[3:, 6:].mean())  # 2x1 edge block
    assert block_mean(frame, 1) is frame


@pytest.mark.parametrize("labels,expected", [
    (["A", "R"], [0, -1, 0, -1, 0, 0]),
    (["P", "L"], [0, 1, 0, 1, 0, 0]),
    (["A", "FR"], [0, -1, 0, -0.707107, 0, -0.707107]),
])
def test_projection_orientation_follows_patient_orientation(labels, expected) -> None:
    ds = Dataset()
    ds.PatientOrientation = labels
    assert projection_orientation(ds) == pytest.approx(expected, abs=1e-6)


def test_projection_geometry_is_added_to_a_copy(tmp_path_factory) -> None:
    root = study_root(tmp_path_factory, "enhanced")
    src = pydicom.dcmread(root / findings(root, "ffdm")[0]["path"], stop_before_pixels=True)
    out = with_projection_geometry(src)
    assert "ImagePositionPatient" not in src and "ImageOrientationPatient" not in src
    assert list(out.ImagePositionPatient) == [0, 0, 0]
    assert len(out.ImageOrientationPatient) == 6
    assert out.FrameOfReferenceUID == src.FrameOfReferenceUID


@pytest.mark.parametrize("factor", [1, 3])
def test_grid_keeps_frames_and_orientation_with_coarser_pixels(tmp_path_factory, factor) -> None:
    root = study_root(tmp_path_factory, "enhanced")
    analysis = make_analysis(root, findings(root, "dbt")[0])
    src = pydicom.dcmread(analysis.image.source_paths[0], stop_before_pixels=True)
    grid = result_grid(analysis, [src], factor)
    depth, rows, cols = analysis.image.shape
    assert (grid.rows, grid.columns) == (-(-rows // factor), -(-cols // factor))
    spacing = analysis.image.pixel_spacing
    assert grid.pixel_spacing == pytest.approx((spacing[0] * factor, spacing[1] * factor))
    iop = np.array(src.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient, dtype=float)
    shift = (factor - 1) / 2 * (spacing[1] * iop[:3] + spacing[0] * iop[3:])
    for position, source in zip(grid.plane_positions, analysis.image.slice_positions,
                                strict=True):
        assert np.array(position[0].ImagePositionPatient, dtype=float) == \
            pytest.approx(source + shift, abs=1e-5)


def test_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        ResultOptions(thresholds=(0.5, 1.5))
    with pytest.raises(ValueError, match="seg_type"):
        ResultOptions(seg_type="labelmap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pmap_decimation"):
        ResultOptions(pmap_decimation=0)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("window_origin", [(0, 0), (-7, 5), (11, -9), (-3, -4)])
@pytest.mark.parametrize("small", [(5, 4), (1, 3), (13, 9)])
def test_levels_on_source_are_map_to_source_quantised(flipped, window_origin, small) -> None:
    """saliency_levels on the source grid (banded, window only) gives, bit for bit, the
    levels of the transform's map_to_source clipped, x255 and rounded (values outside 0..1
    included), for windows inside, overhanging and offset, flipped or not."""
    from types import SimpleNamespace

    from dicomnode.results import geometry
    from gmic.preprocess import PreprocessTransform

    depth, rows, cols = 3, 61, 47
    transform = PreprocessTransform(
        source_shape=(depth, rows, cols), input_shape=(57, 40), flipped=flipped,
        crop_box=(0, 0, rows, cols), window_origin=window_origin, padding=(0, 0, 0, 0),
        mean=0.0, std=1.0)
    rng = np.random.default_rng([abs(v) for v in (*window_origin, flipped, *small)])
    saliency = rng.uniform(-0.2, 1.2, (depth, 2, *small)).astype(np.float32)
    analysis = SimpleNamespace(image=SimpleNamespace(shape=(depth, rows, cols)),
                               saliency=saliency, transform=transform)
    for class_index in range(2):
        expected = geometry._quantise(
            transform.map_to_source(saliency[:, class_index])).astype(np.uint8)
        got = geometry.saliency_levels(analysis, class_index, 1)  # type: ignore[arg-type]
        assert got.dtype == np.uint8 and got.shape == (depth, rows, cols)
        np.testing.assert_array_equal(got, expected)
        assert 0 < np.count_nonzero(got) < got.size
