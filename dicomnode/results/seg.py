"""Segmentation of the regions the model flags: segment 1 benign, 2 malignant.

A segment is a region the algorithm selected for a class, not a lesion of known histology:
category "Spatial and Relational Concept", type "Selected region" (common.SEGMENT_PROPERTIES),
the class in the segment label and description, the breast and its laterality in the
Anatomic Region Sequence (Breast, with a Left/Right modifier).

BINARY (default): the saliency levels of the Parametric Map (0..255, geometry.
saliency_levels) above the class's operating point (ResultOptions.thresholds), so the SEG
is exactly the map's pixels above it.
FRACTIONAL (PROBABILITY): the saliency itself, 8-bit; OHIF does not display it.
Both segments are always described, so "nothing flagged" is a valid SEG with empty frames
(and the SR says how much was flagged: 0). Each segment has its display colour (benign
green, malignant red), so a viewer need not pick one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomnode.pipeline.analysis import ImageAnalysis
from dicomnode.results.buffers import BytesArray
from dicomnode.results.common import (
    LATERALITY_CODES,
    MANUFACTURER,
    SEG_SERIES_OFFSET,
    SEGMENT_CATEGORY,
    SEGMENT_PROPERTIES,
    ResultOptions,
    algorithm_sequence,
    building,
    model_name,
    result_uid,
    serial_number,
    series_description,
    software_versions,
    source_series_number,
)
from dicomnode.results.encode import deflate_early
from dicomnode.results.geometry import (
    decimation_factor,
    finish_result,
    has_patient_geometry,
    level_threshold,
    read_sources,
    result_grid,
    saliency_frames,
    saliency_levels,
)
from gmic.classes import CLASS_NAMES

# bytes per pixel of the array handed to highdicom: bool per segment (BINARY); FRACTIONAL
# must be float32 (highdicom reads integer input as 0/1 masks)
_BYTES_PER_PIXEL = {"binary": len(CLASS_NAMES), "fractional": 4 * len(CLASS_NAMES)}
BREAST = hd.sr.CodedConcept("76752008", "SCT", "Breast")
# Recommended display colour per segment (CLASS_NAMES order), sRGB 0-255
SEGMENT_RGB = ((0, 200, 0), (230, 0, 0))


@dataclass(frozen=True)
class FlaggedBox:
    """The box around a segment's flagged pixels on the slice where it flags the most, in
    source pixels: rows [row0, row0 + height), columns [col0, col0 + width)."""

    frame_index: int
    row0: int
    col0: int
    height: int
    width: int


@dataclass
class SegmentationResult:
    dataset: Dataset
    factor: int  # pixel grid decimation
    flagged_pixels: tuple[int, ...]  # per segment (CLASS_NAMES order), on the SEG's grid
    pixel_spacing: tuple[float, float]  # (row, col) mm of the SEG's pixels
    slice_spacing: float | None  # mm between frames (DBT), None for a 2D image
    # per segment: Tracking UID / ID, shared with the SR's measurement group about it
    tracking_uids: tuple[str, ...] = ()
    tracking_ids: tuple[str, ...] = ()
    # per segment: where it flags the most (None when it flags nothing)
    flagged_boxes: tuple[FlaggedBox | None, ...] = ()

    def flagged_mm2(self, class_index: int) -> float:
        """Flagged area (2D) or summed flagged slice area (DBT) in mm^2."""
        return self.flagged_pixels[class_index] * self.pixel_spacing[0] * self.pixel_spacing[1]

    def flagged_mm3(self, class_index: int) -> float | None:
        if self.slice_spacing is None:
            return None
        return self.flagged_mm2(class_index) * self.slice_spacing


def seg_factor(analysis: ImageAnalysis, sources: list[Dataset], options: ResultOptions) -> int:
    """Decimation of the SEG grid; 1 for 2D images (highdicom keeps a position-less grid)."""
    if not has_patient_geometry(sources[0]):
        return 1
    return decimation_factor(analysis.image.shape, _BYTES_PER_PIXEL[options.seg_type],
                             options.max_array_bytes, options.seg_decimation)


def tracking_id(class_index: int) -> str:
    label, _ = SEGMENT_PROPERTIES[class_index]
    return f"{label} (SEG segment {class_index + 1})"


def _segments(analysis: ImageAnalysis, options: ResultOptions, tracking_uids: list[str]
              ) -> list[hd.seg.SegmentDescription]:
    out = []
    for index, (label, property_type) in enumerate(SEGMENT_PROPERTIES):
        extra = {"segmentation": options.seg_type}
        if options.seg_type == "binary":
            extra["operating_point"] = f"{options.thresholds[index]:g}"
        out.append(hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=label,
            segmented_property_category=SEGMENT_CATEGORY,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_sequence(analysis.algorithm, extra),
            anatomic_regions=[BREAST],
            tracking_uid=tracking_uids[index],
            tracking_id=tracking_id(index),
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_RGB[index]),
        ))
    return out


def describe_segments(seg: Dataset, analysis: ImageAnalysis, options: ResultOptions) -> None:
    """What highdicom's SegmentDescription cannot say: the class and operating point in
    words (Segment Description) and the breast's laterality as a modifier of its Anatomic
    Region (Left/Right; no modifier when the image has no laterality)."""
    laterality = LATERALITY_CODES.get(analysis.image.laterality or "")
    name = model_name(analysis.algorithm)
    for index, item in enumerate(seg.SegmentSequence):
        what = (f"saliency above {options.thresholds[index]:g}"
                if options.seg_type == "binary" else "saliency (probability)")
        item.SegmentDescription = (f"Region {name} flags for the {CLASS_NAMES[index]} class: "
                                   f"{what}; not a diagnosis")[:64]
        if laterality is not None:
            modifier = Dataset()
            modifier.CodeValue = laterality.value
            modifier.CodingSchemeDesignator = laterality.scheme_designator
            modifier.CodeMeaning = laterality.meaning
            for region in item.get("AnatomicRegionSequence", []):
                region.AnatomicRegionModifierSequence = Sequence([modifier])


def _flagged_box(mask: np.ndarray, frame_index: int, factor: int,
                 shape: tuple[int, int]) -> FlaggedBox:
    """The source-pixel box around the pixels of a mask on the (decimated) result grid."""
    rows, cols = np.nonzero(mask)
    row0, col0 = int(rows.min()) * factor, int(cols.min()) * factor
    row1 = min((int(rows.max()) + 1) * factor, shape[0])
    col1 = min((int(cols.max()) + 1) * factor, shape[1])
    return FlaggedBox(frame_index, row0, col0, row1 - row0, col1 - col0)


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a cheaper overlap check for the stack _segment_stack
    makes when some pixel is flagged for both classes: highdicom sums the (D, R, C, 2)
    bool stack over its segment axis into an int64 array (8 bytes a pixel, 2 GB for a
    full-size DBT view: 2.6 s of a 4 s SEG); two segments overlap exactly where both are
    set, a logical_and of two contiguous bool planes. Same SegmentsOverlap value; any
    other input goes to highdicom's own check (tests/test_results_seg.py compares them)."""

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type,
                                    dtype):
        if (type(pixel_array) is np.ndarray and pixel_array.ndim == 4
                and pixel_array.dtype == np.bool_ and pixel_array.shape[-1] == 2
                and len(segment_numbers) == 2
                and segmentation_type == hd.seg.SegmentationTypeValues.BINARY):
            both = np.logical_and(pixel_array[..., 0], pixel_array[..., 1]).any()
            return pixel_array, (hd.seg.SegmentsOverlapValues.YES if both
                                 else hd.seg.SegmentsOverlapValues.NO)
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers,
                                                   segmentation_type, dtype)


# build_segmentation writes a BINARY SEG's pixel data itself (_packed_frames) and gives
# highdicom a memoryless stand-in (_MarkerSegmentation); False: highdicom's own path, the
# reference the tests compare with.
DIRECT_PIXELS = True


class _SegMarkers(np.ndarray):
    """A (planes, rows, columns) uint8 array without memory whose plane d holds d, with the
    SegmentsOverlap value of the real pixels (`overlap`)."""

    overlap: hd.seg.SegmentsOverlapValues


def _seg_markers(shape: tuple[int, int, int], overlap: bool) -> _SegMarkers:
    index = np.arange(shape[0], dtype=np.intp)
    markers = np.lib.stride_tricks.as_strided(
        index, shape=shape, strides=(index.itemsize, 0, 0), writeable=False).view(_SegMarkers)
    markers.overlap = (hd.seg.SegmentsOverlapValues.YES if overlap
                       else hd.seg.SegmentsOverlapValues.NO)
    return markers


class _MarkerSegmentation(_Segmentation):
    """highdicom's BINARY Segmentation of a _SegMarkers stand-in: everything but the pixel
    data, with the order of its frames recorded in `frame_order` ((plane, segment number)
    per frame) for _packed_frames. highdicom would compare, flatten and bit-pack every frame
    of every segment (and, with overlapping segments, first sum a 4D stack over its segment
    axis): about 2 s of a full-size DBT view."""

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type,
                                    dtype):
        if isinstance(pixel_array, _SegMarkers):
            return pixel_array, pixel_array.overlap
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers,
                                                   segmentation_type, dtype)

    def _get_segment_pixel_array(self, pixel_array, segment_number, *args, **kwargs):
        if isinstance(pixel_array, _SegMarkers):
            if "frame_order" not in self.__dict__:
                self.__dict__["frame_order"] = []
            plane = int(np.asarray(pixel_array).flat[0])
            self.__dict__["frame_order"].append((plane, int(segment_number)))
            return np.zeros(0, dtype=np.uint8)
        return super()._get_segment_pixel_array(pixel_array, segment_number, *args, **kwargs)

    def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
        return b""


def _packed_frames(class_bits: np.ndarray, frame_order: list[tuple[int, int]]) -> bytes:
    """BINARY SEG pixel data: frame i is bit (segment - 1) of class_bits[plane] for the
    i-th (plane, segment), packed 8 pixels a byte, least significant bit first, frames
    back to back without padding (as highdicom and pydicom's pack_bits write them); an
    odd length gets highdicom's trailing byte."""
    pixels = class_bits[0].size
    # frames packed together so that each run starts on a byte boundary
    run = 8 // math.gcd(pixels, 8)
    size = -(-pixels * len(frame_order) // 8)
    out = BytesArray((size,), np.uint8)
    at = 0
    bits = np.empty((run, *class_bits.shape[1:]), dtype=np.uint8)
    for start in range(0, len(frame_order), run):
        group = frame_order[start:start + run]
        for k, (plane, segment) in enumerate(group):
            np.right_shift(class_bits[plane], segment - 1, out=bits[k])
            np.bitwise_and(bits[k], 1, out=bits[k])
        packed = np.packbits(bits[:len(group)], bitorder="little")
        out.array[at:at + len(packed)] = packed
        at += len(packed)
    data = out.finish()
    return data + b"0" if len(data) % 2 else data  # highdicom's pad (a '0', not a null)


def _segment_stack(class_bits: np.ndarray) -> np.ndarray:
    """highdicom's pixel array from the per-pixel class bits. Where no pixel is flagged for
    both classes: a label map (0 none, 1 benign, 2 malignant: the segment numbers), which
    highdicom checks with one max(); its per-segment (..., 2) stack is checked for overlap
    with a sum over the segment axis that took 10 s of a full-size DBT's 17.5 s SEG."""
    both = (1 << len(CLASS_NAMES)) - 1
    if not (class_bits == both).any():
        return class_bits
    # each segment contiguous, the stack a (D, R, C, 2) view: highdicom's sum over the
    # segment axis then runs over whole arrays (3.5x faster than over interleaved pairs)
    stack = np.empty((len(CLASS_NAMES), *class_bits.shape), dtype=np.bool_)
    for k in range(len(CLASS_NAMES)):  # bit k as 0/1 bytes, in place: no temporary array
        plane = stack[k].view(np.uint8)
        np.right_shift(class_bits, k, out=plane)
        np.bitwise_and(plane, 1, out=plane)
    return np.moveaxis(stack, 0, -1)


def slice_spacing(analysis: ImageAnalysis) -> float | None:
    positions = np.asarray(analysis.image.slice_positions, dtype=np.float64)
    if len(positions) < 2:
        return None
    return float(np.linalg.norm(positions[1] - positions[0])) or None


def build_segmentation(analysis: ImageAnalysis, options: ResultOptions | None = None,
                       sources: list[Dataset] | None = None,
                       levels: dict[int, np.ndarray] | None = None) -> SegmentationResult:
    """The SEG of one analysis, in the source's study and frame of reference. `levels`:
    saliency_levels per class already computed on the SEG's grid (BINARY only)."""
    options = options or ResultOptions()
    sources = sources if sources is not None else read_sources(analysis)
    factor = seg_factor(analysis, sources, options)
    grid = result_grid(analysis, sources, factor)
    depth = analysis.image.shape[0]
    binary = options.seg_type == "binary"
    if binary:  # per pixel, bit k set: flagged for class k (one byte holds both classes)
        array = np.zeros((depth, grid.rows, grid.columns), dtype=np.uint8)
    else:
        array = np.zeros((depth, grid.rows, grid.columns, len(CLASS_NAMES)), dtype=np.float32)
    flagged = [0] * len(CLASS_NAMES)
    boxes: list[FlaggedBox | None] = [None] * len(CLASS_NAMES)
    for class_index in range(len(CLASS_NAMES)):
        if binary:
            class_levels = (levels or {}).get(class_index)
            if class_levels is None:
                class_levels = saliency_levels(analysis, class_index, factor)
            if class_levels.shape != array.shape:
                raise ValueError(f"levels of shape {class_levels.shape} are not on the "
                                 "SEG's grid")
            above = level_threshold(options.thresholds[class_index])
            frames = ((d, class_levels[d]) for d in range(depth))
        else:
            frames = saliency_frames(analysis, class_index, factor)
        most = 0
        for d, frame in frames:
            mask = frame > above if binary else frame > options.thresholds[class_index]
            count = int(np.count_nonzero(mask))
            if not binary:
                array[d, :, :, class_index] = np.clip(frame, 0.0, 1.0)
            if not count:
                continue
            flagged[class_index] += count
            if count > most:
                most = count
                boxes[class_index] = _flagged_box(mask, d, factor, analysis.image.shape[1:])
            if binary:
                array[d] |= mask.view(np.uint8) << class_index
    class_bits = None
    direct = (binary and DIRECT_PIXELS and not options.seg_omit_empty_frames
              and len(CLASS_NAMES) == 2)
    if direct:
        class_bits = array
        both = (1 << len(CLASS_NAMES)) - 1
        array = _seg_markers(class_bits.shape, overlap=bool((class_bits == both).any()))
    elif binary:
        array = _segment_stack(array)
    name = model_name(analysis.algorithm)
    tracking_uids = [str(result_uid(analysis, options, "segment", name)) for name in CLASS_NAMES]
    with building("SEG", analysis):
        seg = (_MarkerSegmentation if direct else _Segmentation)(
            source_images=sources,
            pixel_array=array,
            segmentation_type=(hd.seg.SegmentationTypeValues.BINARY if binary
                               else hd.seg.SegmentationTypeValues.FRACTIONAL),
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            segment_descriptions=_segments(analysis, options, tracking_uids),
            series_instance_uid=result_uid(analysis, options, "seg-series"),
            series_number=SEG_SERIES_OFFSET + source_series_number(sources),
            sop_instance_uid=result_uid(analysis, options, "seg"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=name,
            software_versions=software_versions(analysis.algorithm),
            device_serial_number=serial_number(analysis.algorithm),
            content_label="GMIC_FINDINGS",
            content_description=f"{name} flagged regions ({options.seg_type})"[:64],
            content_creator_name=f"{name.replace('^', ' ')}^dicomnode",
            plane_positions=grid.plane_positions,
            plane_orientation=grid.plane_orientation,
            pixel_measures=grid.pixel_measures,
            # nothing to omit-but-everything: highdicom would warn and keep all frames
            omit_empty_frames=options.seg_omit_empty_frames and bool(array.any()),
            series_description=series_description(
                "findings" if binary else "findings (fractional)", analysis),
            institution_name=options.institution_name,
        )
    del array
    if class_bits is not None:
        order = seg.__dict__.pop("frame_order")
        if len(order) != int(seg.NumberOfFrames):
            raise AssertionError("SEG frames and recorded frame order disagree")
        seg.PixelData = _packed_frames(class_bits, order)
        del class_bits
    finish_result(seg, analysis, sources[0])
    describe_segments(seg, analysis, options)
    if options.deflate:
        seg.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        deflate_early(seg.PixelData, options.deflate_level)  # while the rest is built
    if grid.plane_positions is None:
        # a 2D image's SEG: the breast thickness is the only extent along the beam
        measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
        thickness = sources[0].get("BodyPartThickness")
        if measures and thickness:
            measures[0].SliceThickness = thickness
    return SegmentationResult(
        dataset=seg, factor=factor, flagged_pixels=tuple(flagged),
        pixel_spacing=grid.pixel_spacing,
        slice_spacing=slice_spacing(analysis) if grid.plane_positions is not None else None,
        tracking_uids=tuple(tracking_uids),
        tracking_ids=tuple(tracking_id(i) for i in range(len(CLASS_NAMES))),
        flagged_boxes=tuple(boxes))
