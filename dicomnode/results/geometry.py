"""Source geometry for highdicom, and the (optionally decimated) pixel grid results use.

highdicom derives SEG / PM geometry from the source, and for a multi-frame source only
from the shared functional groups: :func:`normalise_source` moves per-frame orientation and
pixel measures there (in memory) when every frame has the same values.

A decimated grid keeps the source's frame of reference, frames and orientation with
coarser pixels: output pixel (i, j) covers source pixels [i*f, i*f+f) x [j*f, j*f+f), its
value is the mean over that block, and its centre lies at source (i*f + (f-1)/2, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.pipeline.analysis import ImageAnalysis
from dicomnode.results.common import ResultsError, reproducible_dimension_organization

_MOVABLE = ("PlaneOrientationSequence", "PixelMeasuresSequence")


def _items_equal(a: Dataset, b: Dataset) -> bool:
    return a.to_json_dict() == b.to_json_dict()


def normalise_source(ds: Dataset, path: Path | str = "") -> Dataset:
    """Move PlaneOrientationSequence / PixelMeasuresSequence from the per-frame to the shared
    functional groups when they are the same for all frames (modifies and returns `ds`)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return ds
    if "SharedFunctionalGroupsSequence" not in ds or not len(ds.SharedFunctionalGroupsSequence):
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in _MOVABLE:
        if keyword in shared:
            continue
        items = [group.get(keyword) for group in per_frame]
        if any(not item for item in items):
            continue  # absent in some frames: nothing to move (highdicom will say so)
        first = items[0][0]
        if not all(_items_equal(item[0], first) for item in items[1:]):
            raise ResultsError(
                f"{path}: image {ds.get('SOPInstanceUID', '?')} has a different {keyword} per "
                "frame; results need one orientation and pixel spacing for all frames")
        setattr(shared, keyword, Sequence([first]))
        for group in per_frame:
            del group[keyword]
    return ds


def has_patient_geometry(src: Dataset) -> bool:
    """Whether highdicom sees the source in the patient coordinate system (position known).
    2D mammograms have no ImagePositionPatient: results must keep their pixel grid."""
    return hd.spatial.get_image_coordinate_system(src) is not None


def source_orientation(src: Dataset) -> list[float]:
    if "SharedFunctionalGroupsSequence" in src:
        return [float(v) for v in
                src.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                .ImageOrientationPatient]
    return [float(v) for v in src.ImageOrientationPatient]


def source_measures(src: Dataset) -> Dataset:
    """The source's pixel measures item (PixelSpacing, SliceThickness, ...)."""
    if "SharedFunctionalGroupsSequence" in src:
        return src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    item = Dataset()
    spacing = src.get("PixelSpacing") or src.get("ImagerPixelSpacing")
    if spacing is None:
        raise ResultsError(
            f"image {src.get('SOPInstanceUID', '?')} has no PixelSpacing or ImagerPixelSpacing; "
            "results need the pixel size")
    item.PixelSpacing = [float(v) for v in spacing]
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        if src.get(keyword) not in (None, ""):
            setattr(item, keyword, src.get(keyword))
    return item


def decimation_factor(shape: tuple[int, int, int], bytes_per_pixel: int, max_bytes: int,
                      forced: int | None = None) -> int:
    """The smallest integer factor whose decimated (D, H/f, W/f) array fits `max_bytes`."""
    if forced is not None:
        return forced
    depth, rows, cols = shape
    factor = 1
    while depth * math.ceil(rows / factor) * math.ceil(cols / factor) * bytes_per_pixel \
            > max_bytes and factor < max(rows, cols):
        factor += 1
    return factor


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a result object on the source's frames."""

    factor: int
    rows: int
    columns: int
    plane_positions: list[hd.PlanePositionSequence] | None  # None: copy the source's (2D)
    plane_orientation: hd.PlaneOrientationSequence | None
    pixel_measures: hd.PixelMeasuresSequence | None
    pixel_spacing: tuple[float, float]  # (row, col) mm of the result's pixels


def result_grid(analysis: ImageAnalysis, sources: list[Dataset], factor: int) -> Grid:
    """Grid with pixels `factor` times larger than the source's, on the same frames."""
    depth, rows, cols = analysis.image.shape
    src = sources[0]
    measures = source_measures(src)
    spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
    if not has_patient_geometry(src):
        # highdicom keeps a position-less (2D) image's grid: no decimation, measures from
        # the source (ImagerPixelSpacing when PixelSpacing is absent).
        pixel_measures = None
        if "PixelSpacing" not in src:
            pixel_measures = hd.PixelMeasuresSequence(
                pixel_spacing=list(spacing), slice_thickness=None)
        return Grid(1, rows, cols, None, None, pixel_measures, spacing)
    iop = np.asarray(source_orientation(src), dtype=np.float64)
    # centre of decimated pixel (0, 0): (f-1)/2 source pixels along each direction
    half = (factor - 1) / 2
    shift = half * (spacing[1] * iop[:3] + spacing[0] * iop[3:])
    positions = [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                 [round(float(v), 6) for v in np.asarray(p) + shift])
        for p in analysis.image.slice_positions]
    thickness = measures.get("SliceThickness")
    between = measures.get("SpacingBetweenSlices")
    pixel_measures = hd.PixelMeasuresSequence(
        pixel_spacing=[spacing[0] * factor, spacing[1] * factor],
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        spacing_between_slices=float(between) if between not in (None, "") else None)
    orientation = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, list(iop))
    if depth != len(positions):
        raise ResultsError(f"image has {depth} slices but {len(positions)} positions")
    return Grid(factor, math.ceil(rows / factor), math.ceil(cols / factor), positions,
                orientation, pixel_measures, (spacing[0] * factor, spacing[1] * factor))


def _block_sums(a: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Sums over runs of `factor` along axis 0 or 1; a shorter last run keeps its own sum."""
    n = a.shape[axis]
    whole = n - n % factor
    if axis == 0:
        sums = a[:whole].reshape(whole // factor, factor, a.shape[1]).sum(axis=1)
        rest = a[whole:].sum(axis=0, keepdims=True)
    else:
        sums = a[:, :whole].reshape(a.shape[0], whole // factor, factor).sum(axis=2)
        rest = a[:, whole:].sum(axis=1, keepdims=True)
    return np.concatenate([sums, rest], axis=axis) if n % factor else sums


def block_mean(frame: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (edge blocks average the pixels they hold)."""
    if factor == 1:
        return frame
    rows, cols = frame.shape
    # rows first: adds whole contiguous rows, the fastest pass over a large frame
    sums = _block_sums(_block_sums(np.asarray(frame, dtype=np.float32), factor, 0), factor, 1)
    row_n = np.minimum(factor, rows - np.arange(0, rows, factor))
    col_n = np.minimum(factor, cols - np.arange(0, cols, factor))
    return (sums / np.outer(row_n, col_n)).astype(np.float32)


def saliency_frames(analysis: ImageAnalysis, class_index: int, factor: int):
    """Yield (frame index, saliency of one class on the grid) a frame at a time, so a
    full-size DBT never needs its whole source-resolution saliency volume in memory."""
    _, rows, cols = analysis.image.shape
    one_frame = dataclasses.replace(analysis.transform, source_shape=(1, rows, cols))
    for d in range(analysis.saliency.shape[0]):
        full = one_frame.map_to_source(analysis.saliency[d, class_index])[0]
        yield d, block_mean(full, factor)


# Saliency in [0, 1] stored as integers 0..SALIENCY_LEVELS (the Parametric Map's pixels,
# real-world value = stored / SALIENCY_LEVELS); the BINARY SEG thresholds the same levels,
# so the SEG is exactly the map's pixels above the operating point.
SALIENCY_LEVELS = 255


def level_threshold(threshold: float) -> int:
    """The largest stored level at or below `threshold`: flagged <=> level > this
    (level / SALIENCY_LEVELS > threshold, for integer levels)."""
    return math.floor(threshold * SALIENCY_LEVELS + 1e-9)


def saliency_levels(analysis: ImageAnalysis, class_index: int, factor: int) -> np.ndarray:
    """One class's saliency on the grid as uint8 levels 0..SALIENCY_LEVELS, (D, rows, cols),
    resampled a frame at a time (a quarter of a float32 volume's memory). On the source grid
    (factor 1, the default) through _levels_on_source, which gives the same levels faster."""
    if factor == 1:
        return _levels_on_source(analysis, class_index)
    _, rows, cols = analysis.image.shape
    out = np.empty((analysis.saliency.shape[0], math.ceil(rows / factor),
                    math.ceil(cols / factor)), dtype=np.uint8)
    for d, frame in saliency_frames(analysis, class_index, factor):
        _quantise(frame)
        out[d] = frame
    return out


def _quantise(values: np.ndarray) -> np.ndarray:
    """Saliency -> levels 0..SALIENCY_LEVELS as whole floats, in place."""
    np.clip(values, 0.0, 1.0, out=values)
    values *= SALIENCY_LEVELS
    np.rint(values, out=values)
    return values


def _levels_on_source(analysis: ImageAnalysis, class_index: int) -> np.ndarray:
    """saliency_levels on the source grid: the same float32 operations as the transform's
    map_to_source (bilinear: columns on the small map first, then rows) followed by
    clip, x255 and rint, so the same levels bit for bit (tests/test_results_geometry.py),
    but a band of output rows at a time: each run of rows between the same two saliency
    rows is interpolated, quantised and stored while it is in the cache, and only the model
    window is written. map_to_source makes and fills whole float32 frames, which with the
    quantisation took a dozen passes over 13.5 MB per frame of a full-size DBT (about 1.8 s
    a class)."""
    from gmic.preprocess import _apply_index, _resample_index

    t = analysis.transform
    depth, src_h, src_w = analysis.image.shape
    out = np.zeros((depth, src_h, src_w), dtype=np.uint8)
    (in_h, in_w), (wr, wc) = t.input_shape, t.window_origin
    r_lo, r_hi = max(0, -wr), min(in_h, src_h - wr)
    c_lo, c_hi = max(0, -wc), min(in_w, src_w - wc)
    if r_lo >= r_hi or c_lo >= c_hi:
        return out
    saliency = analysis.saliency[:, class_index]
    small_h, small_w = saliency.shape[1:]
    i0, i1, frac = _resample_index(small_h, in_h, r_lo, r_hi, 1)
    ci = _resample_index(small_w, in_w, c_lo, c_hi, 1)
    cols = (slice(src_w - c_hi - wc, src_w - c_lo - wc) if t.flipped
            else slice(c_lo + wc, c_hi + wc))
    # output rows in runs with the same pair of saliency rows (i0 is non-decreasing)
    starts = np.flatnonzero(np.diff(i0, prepend=-1))
    ends = np.append(starts[1:], len(i0))
    band = np.empty((int(np.max(ends - starts)), c_hi - c_lo), dtype=np.float32)
    for d in range(depth):
        small = _apply_index(np.asarray(saliency[d], dtype=np.float32), ci, axis=1)
        step = small[np.minimum(np.arange(small_h) + 1, small_h - 1)] - small  # a1 - a0
        frame = out[d, r_lo + wr:r_hi + wr, cols]
        if t.flipped:
            frame = frame[:, ::-1]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            row = int(i0[start])
            part = band[:end - start]
            if i1[start] == row:  # past the last saliency row: a1 - a0 is 0
                part[:] = small[row]
            else:
                np.multiply(step[row], frac[start:end, None], out=part)  # (a1 - a0) * f
                part += small[row]
            frame[start:end] = _quantise(part)
    return out


def finish_result(obj: Dataset, analysis: ImageAnalysis, src: Dataset, *,
                  series_laterality: bool = False) -> None:
    """Attributes a breast result image needs beyond what highdicom copies: the series'
    laterality where the IOD asks for it (the PM: breasts are paired and it has no Image
    Laterality; the SEG must not have it), for a 2D image without plane orientation, its
    PatientOrientation, and a Dimension Organization UID that a rebuild reproduces
    (common.reproducible_dimension_organization)."""
    reproducible_dimension_organization(obj)
    laterality = analysis.image.laterality
    if series_laterality and laterality in ("L", "R"):
        obj.Laterality = laterality
    if not has_patient_geometry(src) and "PatientOrientation" in src:
        obj.PatientOrientation = src.PatientOrientation


_LPS = {"L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0), "P": (0.0, 1.0, 0.0),
        "A": (0.0, -1.0, 0.0), "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0)}


def _direction(label: str) -> np.ndarray | None:
    vectors = [_LPS[c] for c in str(label).upper() if c in _LPS]
    if not vectors:
        return None
    v = np.sum(vectors, axis=0)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else None


def projection_orientation(src: Dataset) -> list[float]:
    """ImageOrientationPatient implied by a 2D image's PatientOrientation (row direction,
    column direction as LPS letters, e.g. A\\FR for a left MLO); identity when absent."""
    labels = src.get("PatientOrientation")
    if labels is not None and len(labels) == 2:
        row, col = _direction(labels[0]), _direction(labels[1])
        if row is not None and col is not None:
            col = col - float(np.dot(col, row)) * row  # oblique views: keep them orthogonal
            n = float(np.linalg.norm(col))
            if n > 1e-6:
                return [round(float(v), 6) for v in (*row, *(col / n))]
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def projection_frame_of_reference(src: Dataset) -> str:
    """The frame of reference of a 2D image's results: one per source image, the same on
    every rerun, never the source's own."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["dicomnode projection frame of reference",
                                          str(src.get("SOPInstanceUID", ""))]))


def with_projection_geometry(src: Dataset) -> Dataset:
    """A copy of a 2D (projection) image's header with a plane geometry: orientation from
    PatientOrientation, position at the origin of a frame of reference of the image's own
    (projection_frame_of_reference), pixel spacing, and the breast thickness as slice
    thickness.

    Objects whose IOD requires plane position and orientation (the Parametric Map) need
    it; the pixel grid is the source's, so the result overlays the image pixel for pixel.
    """
    out = Dataset()  # Dataset(src) and copy.copy(src) share the element map with `src`
    for element in src:
        out.add(element)
    if hasattr(src, "file_meta"):
        out.file_meta = src.file_meta
    # A frame of reference of its own: the source's (often the study's DBT volumes' one)
    # would place the projection at a made-up position inside the DBT's space, and viewers
    # would draw reference lines and synchronise scrolling from it.
    out.FrameOfReferenceUID = projection_frame_of_reference(src)
    out.PositionReferenceIndicator = ""
    out.ImageOrientationPatient = projection_orientation(src)
    out.ImagePositionPatient = [0.0, 0.0, 0.0]
    if "PixelSpacing" not in out:
        out.PixelSpacing = source_measures(src).PixelSpacing
    thickness = src.get("BodyPartThickness") or src.get("SliceThickness") or 1.0
    out.SliceThickness = thickness
    return out


def read_sources(analysis: ImageAnalysis) -> list[Dataset]:
    """Headers (no pixel data) of the source image, one per file, in slice order, with
    their geometry normalised as highdicom needs it (see normalise_source)."""
    paths = analysis.image.source_paths
    if not paths:
        raise ResultsError(f"image {analysis.image.series_uid} has no source files to reference")
    out = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ResultsError(f"{path}: cannot read the source header back: {exc}") from exc
        out.append(normalise_source(ds, path))
    return out
