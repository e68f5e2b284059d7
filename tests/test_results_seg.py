"""SEG of the flagged regions: BINARY mask = the Parametric Map's saliency levels above the
operating point, FRACTIONAL, nothing flagged, every source layout, what a segment claims
(a selected region, not a histology) and its breast's laterality, display colours, where
each segment flags the most; validity with dciodvfy."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.results import ResultOptions, build_segmentation
from dicomnode.results.geometry import SALIENCY_LEVELS, block_mean, level_threshold
from dicomnode.results.validate import dciodvfy_errors
from gmic.classes import CLASS_NAMES
from tests.support.results import (
    CASES,
    analysis_for,
    build_differences,
    expected_source,
    frame_sources,
    slice_of_frames,
)

THRESHOLDS = (0.2, 0.5)  # the blob's weaker class peaks at 0.3: both segments flag pixels


def _flagged(saliency_frame: np.ndarray, factor: int, threshold: float) -> np.ndarray:
    """The SEG's definition: the map's 8-bit level (what the PM stores) above the operating
    point's level."""
    levels = np.rint(np.clip(block_mean(saliency_frame, factor), 0, 1) * SALIENCY_LEVELS)
    return levels > level_threshold(threshold)


def _frames_by_segment(analysis, seg, factor: int) -> dict[tuple[int, int], int]:
    """(segment number, slice index) -> frame index of the SEG."""
    segments = [int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                for g in seg.PerFrameFunctionalGroupsSequence]
    if "PlanePositionSequence" in seg.PerFrameFunctionalGroupsSequence[0]:
        slices = slice_of_frames(analysis, seg, factor)
    else:  # a 2D image's SEG: one frame per segment
        slices = [0] * len(segments)
    return {(s, d): i for i, (s, d) in enumerate(zip(segments, slices, strict=True))}


def _reread(result, tmp_path):
    path = tmp_path / "seg.dcm"
    result.dataset.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("factor", [1, 2])
def test_binary_seg_is_saliency_above_threshold(tmp_path_factory, tmp_path, layout, modality,
                                                factor) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    options = ResultOptions(thresholds=THRESHOLDS, seg_decimation=factor)
    result = build_segmentation(analysis, options)
    seg, _ = _reread(result, tmp_path)
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == analysis.image.study_uid
    assert "not for clinical use" in seg.SeriesDescription
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Benign-flagged region",
                                                             "Malignant-flagged region"]
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in seg.SegmentSequence)
    assert [s.TrackingUID for s in seg.SegmentSequence] == list(result.tracking_uids)
    depth = analysis.image.shape[0]
    is_2d = analysis.image.modality != "dbt"
    expected_factor = 1 if is_2d else factor  # a 2D image's SEG keeps the source grid
    assert result.factor == expected_factor
    frames = _frames_by_segment(analysis, seg, expected_factor)
    assert len(frames) == depth * len(CLASS_NAMES)  # empty frames kept by default
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for class_index in range(len(CLASS_NAMES)):
        saliency = analysis.saliency_on_source(class_index)
        flagged = 0
        for d in range(depth):
            expected = _flagged(saliency[d], expected_factor, THRESHOLDS[class_index])
            # within a quantisation level of "saliency above the operating point"
            exact = block_mean(saliency[d], expected_factor) > THRESHOLDS[class_index]
            assert np.count_nonzero(expected != exact) <= max(3, exact.sum() // 20)
            got = pixels[frames[(class_index + 1, d)]].astype(bool)
            np.testing.assert_array_equal(got, expected)
            flagged += int(expected.sum())
        assert result.flagged_pixels[class_index] == flagged > 0
        # the source-pixel box around the flagged pixels of the slice with the most
        box = result.flagged_boxes[class_index]
        masks = [_flagged(saliency[d], expected_factor, THRESHOLDS[class_index])
                 for d in range(depth)]
        assert box.frame_index == int(np.argmax([m.sum() for m in masks]))
        on_source = np.kron(masks[box.frame_index], np.ones((expected_factor,) * 2, bool))
        on_source = on_source[:analysis.image.shape[1], :analysis.image.shape[2]]
        rr, cc = np.nonzero(on_source)
        assert (box.row0, box.col0, box.row0 + box.height, box.col0 + box.width) == (
            rr.min(), cc.min(), rr.max() + 1, cc.max() + 1)
    sources = frame_sources(seg)
    for (_, d), i in frames.items():
        assert sources[i] == expected_source(analysis, d)


def test_segments_overlap_only_where_both_classes_flag_a_pixel(tmp_path_factory,
                                                              tmp_path) -> None:
    # The default operating points flag the finding's class only (the SEG is built from a
    # label map); THRESHOLDS flag both classes on the same blob (a per-segment stack).
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    for thresholds, overlap in (((0.5, 0.5), "NO"), (THRESHOLDS, "YES")):
        result = build_segmentation(analysis, ResultOptions(thresholds=thresholds))
        seg, _ = _reread(result, tmp_path)
        assert seg.SegmentsOverlap == overlap
        assert (result.flagged_pixels[0] > 0) == (overlap == "YES")
        assert result.flagged_pixels[1] > 0
        frames = _frames_by_segment(analysis, seg, result.factor)
        pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        for class_index in range(len(CLASS_NAMES)):
            saliency = analysis.saliency_on_source(class_index)
            for d in range(analysis.image.shape[0]):
                expected = _flagged(saliency[d], result.factor, thresholds[class_index])
                got = pixels[frames[(class_index + 1, d)]].astype(bool)
                np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("layout,modality", CASES)
def test_fractional_seg_holds_the_saliency(tmp_path_factory, tmp_path, layout,
                                           modality) -> None:
    analysis = analysis_for(tmp_path_factory, layout, modality)
    result = build_segmentation(analysis, ResultOptions(seg_type="fractional"))
    seg, _ = _reread(result, tmp_path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    frames = _frames_by_segment(analysis, seg, 1)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    scale = float(seg.MaximumFractionalValue)
    for class_index in range(len(CLASS_NAMES)):
        saliency = analysis.saliency_on_source(class_index)
        for d in range(analysis.image.shape[0]):
            got = pixels[frames[(class_index + 1, d)]] / scale
            np.testing.assert_allclose(got, saliency[d], atol=0.5 / scale + 1e-6)


@pytest.mark.parametrize("modality", ["dbt", "ffdm"])
def test_segments_claim_a_selected_region_of_a_lateral_breast(tmp_path_factory, tmp_path,
                                                              modality) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", modality)
    seg, _ = _reread(build_segmentation(analysis, ResultOptions()), tmp_path)
    laterality = {"L": "7771000", "R": "24028007"}[analysis.image.laterality]
    for index, segment in enumerate(seg.SegmentSequence):
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        # a region the algorithm selected, not a neoplasm of some histology
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("309825002", "SCT")
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("111099", "DCM")
        assert CLASS_NAMES[index] in segment.SegmentDescription
        assert CLASS_NAMES[index] in segment.SegmentLabel.lower()
        region = segment.AnatomicRegionSequence[0]
        assert region.CodeValue == "76752008"  # breast
        assert region.AnatomicRegionModifierSequence[0].CodeValue == laterality
    assert "Laterality" not in seg  # dciodvfy: not in the SEG's General Series


def test_binary_seg_is_the_maps_pixels_above_the_operating_point(tmp_path_factory) -> None:
    from dicomnode.results import build_results
    from dicomnode.results.pmap import real_world_values

    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    results = build_results(analysis, None, ResultOptions(pmap_classes=CLASS_NAMES))
    seg = results.seg
    frames = _frames_by_segment(analysis, seg, 1)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    for class_index, pm in enumerate(results.pmaps):
        values = real_world_values(pm)
        slices = {d: f for f, d in enumerate(slice_of_frames(analysis, pm, 1))}
        for d in range(analysis.image.shape[0]):
            np.testing.assert_array_equal(pixels[frames[(class_index + 1, d)]],
                                          values[slices[d]] > 0.5)


def test_segments_have_their_display_colours(tmp_path_factory, tmp_path) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "ffdm")
    seg, _ = _reread(build_segmentation(analysis, ResultOptions(thresholds=THRESHOLDS)),
                     tmp_path)
    r, g, b = zip(*(hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue)
                    .to_rgb(clip=True) for s in seg.SegmentSequence), strict=True)
    assert g[0] > 150 and r[0] < 50 and b[0] < 50  # benign: green
    assert r[1] > 150 and g[1] < 50 and b[1] < 50  # malignant: red


def test_nothing_flagged_is_a_valid_seg_with_empty_frames(tmp_path_factory, tmp_path) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    for omit in (False, True):
        result = build_segmentation(analysis, ResultOptions(thresholds=(0.99, 0.99),
                                                            seg_omit_empty_frames=omit))
        assert result.flagged_pixels == (0, 0)
        assert result.flagged_boxes == (None, None)
        seg, _ = _reread(result, tmp_path)
        assert len(seg.SegmentSequence) == 2
        assert int(seg.NumberOfFrames) == 2 * analysis.image.shape[0]
        assert not seg.pixel_array.any()


def test_omitting_empty_frames_keeps_only_flagged_slices(tmp_path_factory) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "dbt")
    result = build_segmentation(analysis, ResultOptions(thresholds=THRESHOLDS,
                                                        seg_omit_empty_frames=True))
    # the blob lies on one slice: one frame per segment
    assert int(result.dataset.NumberOfFrames) == 2


@pytest.mark.dicom3tools
@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("options", [
    ResultOptions(thresholds=THRESHOLDS),
    ResultOptions(seg_type="fractional", seg_decimation=2),
    ResultOptions(thresholds=(0.99, 0.99), seg_omit_empty_frames=True),
], ids=["binary", "fractional-decimated", "empty"])
def test_seg_passes_dciodvfy(tmp_path_factory, tmp_path, layout, modality, options) -> None:
    result = build_segmentation(analysis_for(tmp_path_factory, layout, modality), options)
    _, path = _reread(result, tmp_path)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("overlap", [False, True])
def test_cheaper_overlap_check_agrees_with_highdicoms(overlap) -> None:
    from dicomnode.results.seg import _Segmentation

    rng = np.random.default_rng(3)
    first = rng.random((3, 16, 12)) > 0.7
    second = rng.random((3, 16, 12)) > 0.7
    if not overlap:
        second &= ~first
    for stack in (np.stack([first, second], axis=-1),
                  np.moveaxis(np.stack([first, second]), 0, -1)):
        args = (stack, np.array([1, 2]), hd.seg.SegmentationTypeValues.BINARY, np.uint8)
        ours = _Segmentation._check_and_cast_pixel_array(*args)
        theirs = hd.seg.Segmentation._check_and_cast_pixel_array(*args)
        assert ours[1] == theirs[1] == (hd.seg.SegmentsOverlapValues.YES if overlap
                                        else hd.seg.SegmentsOverlapValues.NO)
        assert ours[0] is stack and np.array_equal(theirs[0], stack)


@pytest.mark.parametrize("layout,modality", CASES)
@pytest.mark.parametrize("thresholds", [(0.5, 0.5), THRESHOLDS, (0.99, 0.99)])
@pytest.mark.parametrize("factor", [1, 3])
def test_binary_seg_is_the_dataset_highdicom_builds_from_the_whole_array(
        tmp_path_factory, monkeypatch, layout, modality, thresholds, factor) -> None:
    """build_segmentation packs a BINARY SEG's frames itself (highdicom gets a stand-in
    array): the same dataset, element for element and bit for bit, as highdicom builds
    from the label map or the per-segment stack, overlapping segments or not, flagging
    something or nothing."""
    from dicomnode.results import seg as seg_module

    analysis = analysis_for(tmp_path_factory, layout, modality)
    options = ResultOptions(thresholds=thresholds, seg_decimation=factor)
    fast = build_segmentation(analysis, options)
    monkeypatch.setattr(seg_module, "DIRECT_PIXELS", False)
    slow = build_segmentation(analysis, options)
    assert build_differences(fast.dataset, slow.dataset) == []
    assert fast.dataset.file_meta == slow.dataset.file_meta
    assert type(fast.dataset).__name__ == "_MarkerSegmentation"  # the direct path ran
    assert type(fast.dataset.PixelData) is bytes
    assert fast.dataset.PixelData == slow.dataset.PixelData
    assert (fast.flagged_pixels, fast.flagged_boxes) == (slow.flagged_pixels,
                                                         slow.flagged_boxes)
