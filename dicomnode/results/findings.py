"""Regions the model flags: what the CAD SR marks and the TID 1500 SR codes as findings.

A flagged region is a connected component (3D: across neighbouring slices too) of one
class's saliency at or above an operating point, found on the model's saliency map (its
cells are few, so this is cheap) and placed on the source image through the preprocessing
transform. The map is stretched bilinearly onto the source grid for the SEG and the
Parametric Map, so a source pixel is never more salient than the most salient map cell
around it: a region's peak is the highest value anything drawn from the same saliency
shows, and an image whose map stays below the operating point has no region.

Where a region is said to be: on the slice where it is most salient (its peak), its box
is the source-pixel box of its map cells on that slice, and its centre the centre of the
peak cell (clipped to that box). Map cells that fall wholly outside the source image
(padding of the model input) are never part of a region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicomnode.pipeline.analysis import ImageAnalysis

# 26-connectivity: cells touching by a face, an edge or a corner, in plane or across slices
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class FlaggedRegion:
    """One connected region of a class's saliency at or above `threshold`, in source pixels.

    frame_index: the slice (0-based, as BreastImage.pixels) where it is most salient;
    first_frame / last_frame: the slices it spans (inclusive);
    row0, col0, height, width: its box on frame_index, rows [row0, row0 + height);
    centre: (row, col) of its peak on frame_index, pixel centres at integers;
    peak: its highest saliency; area_px: its source pixels on frame_index; volume_px: its
    source pixels summed over its slices.
    """

    class_index: int
    threshold: float
    frame_index: int
    first_frame: int
    last_frame: int
    row0: int
    col0: int
    height: int
    width: int
    centre: tuple[float, float]
    peak: float
    area_px: int
    volume_px: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.row0, self.col0, self.height, self.width

    def contains(self, row: float, col: float) -> bool:
        return (self.row0 <= row < self.row0 + self.height
                and self.col0 <= col < self.col0 + self.width)


def _cell_boxes(analysis: ImageAnalysis, h: int, w: int) -> np.ndarray:
    """(h, w, 4) source boxes (row0, col0, height, width) of the map cells, clipped to the
    source image (height or width 0 for a cell outside it)."""
    transform = analysis.transform
    in_h, in_w = transform.input_shape
    r_edges = [round(i * in_h / h) for i in range(h + 1)]
    c_edges = [round(j * in_w / w) for j in range(w + 1)]
    out = np.zeros((h, w, 4), dtype=np.int64)
    for i in range(h):
        for j in range(w):
            out[i, j] = transform.to_source_box(r_edges[i], c_edges[j],
                                                r_edges[i + 1] - r_edges[i],
                                                c_edges[j + 1] - c_edges[j])
    return out


def flagged_regions(analysis: ImageAnalysis, class_index: int, threshold: float
                    ) -> list[FlaggedRegion]:
    """The regions of one class at or above `threshold`, most salient first."""
    saliency = np.asarray(analysis.saliency[:, class_index], dtype=np.float32)  # (D, h, w)
    depth, h, w = saliency.shape
    if depth != analysis.image.shape[0]:  # e.g. freed after the per-image results
        raise ValueError(f"the saliency map has {depth} slices, the image "
                         f"{analysis.image.shape[0]}: flagged regions need the whole map")
    boxes = _cell_boxes(analysis, h, w)
    cell_area = boxes[..., 2] * boxes[..., 3]
    on_source = cell_area > 0
    mask = (saliency >= threshold) & on_source[np.newaxis]
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    if count == 0:
        return []
    transform = analysis.transform
    in_h, in_w = transform.input_shape
    _, src_h, src_w = transform.source_shape
    regions = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[where] == k
        values = np.where(inside, saliency[where], -np.inf)
        dz, di, dj = np.unravel_index(int(np.argmax(values)), values.shape)
        d, i, j = dz + where[0].start, di + where[1].start, dj + where[2].start
        frames = np.flatnonzero(inside.any(axis=(1, 2))) + where[0].start
        cells = labels[d] == k
        rows, cols = np.nonzero(cells)
        cell_boxes = boxes[rows, cols]
        r0 = int(cell_boxes[:, 0].min())
        c0 = int(cell_boxes[:, 1].min())
        r1 = int((cell_boxes[:, 0] + cell_boxes[:, 2]).max())
        c1 = int((cell_boxes[:, 1] + cell_boxes[:, 3]).max())
        # the peak cell's centre, model input -> source, kept inside the region's box
        _, row, col = transform.to_source(d, (i + 0.5) * in_h / h - 0.5,
                                          (j + 0.5) * in_w / w - 0.5)
        row = float(np.clip(row, r0, r1 - 1))
        col = float(np.clip(col, c0, c1 - 1))
        volume = int(sum(int(cell_area[labels[z] == k].sum()) for z in frames))
        regions.append(FlaggedRegion(
            class_index=class_index, threshold=float(threshold), frame_index=int(d),
            first_frame=int(frames[0]), last_frame=int(frames[-1]),
            row0=r0, col0=c0, height=r1 - r0, width=c1 - c0, centre=(row, col),
            peak=float(saliency[d, i, j]), area_px=int(cell_area[cells].sum()),
            volume_px=volume))
    # most salient first; ties by slice and position, so the order is reproducible
    regions.sort(key=lambda r: (-r.peak, r.frame_index, r.row0, r.col0))
    return regions


def operating_point(peak: float, thresholds: tuple[float, ...]) -> int | None:
    """The most specific operating point (1-based; thresholds in decreasing order, the
    most specific first) a region with this peak saliency reaches; None below the floor
    (the last threshold)."""
    for n, threshold in enumerate(thresholds, start=1):
        if peak >= threshold:
            return n
    return None


def chest_wall_distance_mm(analysis: ImageAnalysis, col: float) -> float:
    """Distance of a source column from the chest wall (the image edge the breast is
    attached to) in mm: the depth that locates one lesion in both CC and MLO views."""
    _, _, width = analysis.transform.source_shape
    from_wall = (width - 1 - col) if analysis.transform.flipped else col
    return float(from_wall) * float(analysis.image.pixel_spacing[1])

