"""Input preprocessing of 3D-GMIC (paper V-D.3, after Wu et al.), on plain arrays.

Steps, for a volume (D, H, W) in the MONOCHROME2 sense (higher = denser):

1. breast mask on the maximum-intensity projection over slices: a threshold between the
   background and Otsu's threshold, the largest connected component, holes filled;
2. crop to the mask's bounding box (everything outside it, labels and markers included,
   becomes padding);
3. flip horizontally so that every breast has its chest wall on the LEFT of the image
   (by image content; the laterality decides only when the content is ambiguous, or always
   with ``flip_by="laterality"``);
4. a window of the model's input size, its left edge on the chest wall, its rows placed
   where it covers the most breast pixels (centred on the breast when the breast is
   shorter than the window); zero padding where the window leaves the crop. With
   ``whole_breast`` the window grows, where the breast is larger than the input size, to
   the breast crop's own size rounded up to a multiple of the global network's stride
   (64), so that the convolutional global network reads the whole breast at any field of
   view; a fixed window would silently leave most of a full-size breast unread;
5. z-score: by default over the whole output volume, breast and padding (as the paper
   says "z-score the whole volume"); ``normalise="breast"`` takes the statistics over the
   breast mask only.

No resizing is done: pixels keep the source spacing, so the transform between source and
model coordinates is a flip plus an integer shift, exactly invertible. Everything is
recorded in a :class:`PreprocessTransform`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from gmic.model_config import GLOBAL_DOWNSAMPLING

Modality = Literal["dbt", "ffdm", "s2d"]
Side = Literal["left", "right"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the preprocessing. Input sizes are (rows, cols)."""

    input_size_dbt: tuple[int, int] = (2116, 1339)
    input_size_s2d: tuple[int, int] = (2116, 1339)
    input_size_ffdm: tuple[int, int] = (2866, 1814)
    # Mask threshold = background + mask_fraction * (Otsu - background). Otsu alone splits
    # dense tissue from fat and would drop fatty breast; halfway keeps fat, drops noise.
    mask_fraction: float = 0.5
    # "content": chest-wall side from the mask (robust to images stored mirrored);
    # "laterality": flip right breasts, whatever the image shows.
    flip_by: Literal["content", "laterality"] = "content"
    normalise: Literal["volume", "breast"] = "volume"
    # Grow the window to cover the whole breast crop where it is larger than the input size
    # (rounded up to the global network's stride). Training keeps fixed-size windows (batches).
    whole_breast: bool = False

    def input_size(self, modality: str) -> tuple[int, int]:
        sizes = {"dbt": self.input_size_dbt, "s2d": self.input_size_s2d,
                 "ffdm": self.input_size_ffdm}
        if modality not in sizes:
            raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(sizes)}")
        return sizes[modality]


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an image (between-class variance maximised over a histogram)."""
    lo, hi = float(np.min(image)), float(np.max(image))
    if hi <= lo:
        return lo
    hist, edges = np.histogram(image, bins=bins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # Background components that do not touch the border are holes. Labelling is O(N);
    # ndimage.binary_fill_holes iterates dilations and is slow on 13-Mpixel FFDM.
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def breast_mask(image: np.ndarray, mask_fraction: float = 0.5) -> np.ndarray:
    """Boolean mask of the breast on a 2D image (e.g. the max projection of a volume)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"breast_mask needs a 2D image, got shape {image.shape}")
    # a low percentile, not the minimum: a few dead pixels must not set the background
    background = float(np.percentile(image, 0.5))
    otsu = otsu_threshold(image)
    if otsu <= background:
        return np.zeros(image.shape, dtype=bool)
    mask = image > background + mask_fraction * (otsu - background)
    return _fill_holes(_largest_component(mask))


def chest_wall_side(image_or_mask: np.ndarray, *, margin: float = 0.05) -> Side | None:
    """Which image edge the chest wall is on, or None when the image does not say.

    The breast touches the image edge at the chest wall and tapers towards the nipple:
    first look for a mask touching only one side edge; otherwise compare the breast area in
    the left and right halves (ambiguous within ``margin`` of the total).
    """
    arr = np.asarray(image_or_mask)
    mask = arr if arr.dtype == bool else breast_mask(arr)
    cols = mask.sum(axis=0, dtype=np.int64)
    width = cols.shape[0]
    edge = max(1, width // 100)
    on_left, on_right = int(cols[:edge].sum()), int(cols[-edge:].sum())
    rows = mask.shape[0]
    # touching = a real stretch of the edge column(s), not a stray pixel
    touch = max(1, rows * edge // 20)
    if on_left >= touch > on_right:
        return "left"
    if on_right >= touch > on_left:
        return "right"
    half = width // 2
    left, right = int(cols[:half].sum()), int(cols[width - half:].sum())
    total = left + right
    if total == 0 or abs(left - right) < margin * total:
        return None
    return "left" if left > right else "right"


@dataclass(frozen=True)
class PreprocessTransform:
    """Source pixel <-> model-input pixel mapping of one preprocessed image.

    Coordinates are (frame, row, col) with integer pixel indices (floats are accepted for
    sub-pixel positions, with pixel centres at integers). The model input's pixel (r, c) is
    the flipped source's pixel (r + window_origin[0], c + window_origin[1]); frames map
    one to one.
    """

    source_shape: tuple[int, int, int]  # (D, H, W) of the source volume
    input_shape: tuple[int, int]  # (H_in, W_in) of the model input
    flipped: bool  # source columns were mirrored (chest wall was on the right)
    # breast box in source pixels: row0, col0, row1, col1 (end-exclusive)
    crop_box: tuple[int, int, int, int]
    # flipped-source (row, col) of model pixel (0, 0); negative where the window overhangs
    window_origin: tuple[int, int]
    padding: tuple[int, int, int, int]  # model rows/cols outside the crop: top, bottom, left, right
    mean: float  # z-score statistics that were applied
    std: float
    scale: float = 1.0  # model pixels per source pixel; the preprocessing never resizes

    @property
    def depth(self) -> int:
        return self.source_shape[0]

    def to_model(self, frame, row, col):
        """Source (frame, row, col) -> model-input (frame, row, col)."""
        width = self.source_shape[2]
        c = (width - 1 - col) if self.flipped else col
        return frame, row - self.window_origin[0], c - self.window_origin[1]

    def to_source(self, frame, row, col):
        """Model-input (frame, row, col) -> source (frame, row, col); inverse of to_model."""
        width = self.source_shape[2]
        r = row + self.window_origin[0]
        c = col + self.window_origin[1]
        return frame, r, (width - 1 - c) if self.flipped else c

    def in_window(self, row, col) -> bool:
        """Whether a source pixel lands inside the model input."""
        _, r, c = self.to_model(0, row, col)
        return bool(0 <= r < self.input_shape[0] and 0 <= c < self.input_shape[1])

    def to_model_box(self, row0: int, col0: int, height: int, width: int
                     ) -> tuple[int, int, int, int]:
        """Source box (row0, col0, h, w) -> model-input box (row0, col0, h, w), unclipped."""
        _, r, c = self.to_model(0, row0, col0)
        if self.flipped:  # the box's right edge becomes its left edge
            c = c - (width - 1)
        return r, c, height, width

    def to_source_box(self, row0: int, col0: int, height: int, width: int
                      ) -> tuple[int, int, int, int]:
        """Model-input box (row0, col0, h, w) -> source box (row0, col0, h, w), clipped to
        the source image (h or w is 0 when the box lies outside it)."""
        _, src_h, src_w = self.source_shape
        r0 = row0 + self.window_origin[0]
        r1 = r0 + height
        c0f = col0 + self.window_origin[1]
        c1f = c0f + width
        c0, c1 = (src_w - c1f, src_w - c0f) if self.flipped else (c0f, c1f)
        r0c, r1c = max(0, r0), min(src_h, r1)
        c0c, c1c = max(0, c0), min(src_w, c1)
        return r0c, c0c, max(0, r1c - r0c), max(0, c1c - c0c)

    def map_to_model(self, values: np.ndarray) -> np.ndarray:
        """A (H, W) map on the source image (e.g. a ground-truth mask) -> the same map on the
        model input (H_in, W_in): flipped and windowed like the pixels; 0 outside the source.
        """
        vals = np.asarray(values)
        if vals.shape != self.source_shape[1:]:
            raise ValueError(f"map has shape {vals.shape}, the source frames are "
                             f"{self.source_shape[1:]}")
        if self.flipped:
            vals = vals[:, ::-1]
        (in_h, in_w), (wr, wc) = self.input_shape, self.window_origin
        src_h, src_w = vals.shape
        out = np.zeros((in_h, in_w), dtype=vals.dtype)
        r_lo, r_hi = max(0, -wr), min(in_h, src_h - wr)
        c_lo, c_hi = max(0, -wc), min(in_w, src_w - wc)
        if r_lo < r_hi and c_lo < c_hi:
            out[r_lo:r_hi, c_lo:c_hi] = vals[r_lo + wr:r_hi + wr, c_lo + wc:c_hi + wc]
        return out

    def map_to_source(self, values: np.ndarray, order: int = 1) -> np.ndarray:
        """A map over the model input -> the same map on the source geometry.

        ``values`` is (D, h, w) or (h, w) (one frame): any resolution covering the whole
        model input (e.g. a 33x21 saliency map of a 2116x1339 input), stretched to the input
        size by proportion (order 1: bilinear on pixel centres; order 0: nearest), then
        un-windowed and un-flipped. Source pixels outside the window are 0. Returns float32
        (D, H, W).
        """
        vals = np.asarray(values, dtype=np.float32)
        if vals.ndim == 2:
            vals = vals[None]
        if vals.ndim != 3:
            raise ValueError(f"expected a (D, h, w) or (h, w) map, got shape {vals.shape}")
        depth, src_h, src_w = self.source_shape
        if vals.shape[0] != depth:
            raise ValueError(f"map has {vals.shape[0]} frames, the source has {depth}")
        in_h, in_w = self.input_shape
        wr, wc = self.window_origin
        out = np.zeros((depth, src_h, src_w), dtype=np.float32)
        # model rows/cols that fall on the source image
        r_lo, r_hi = max(0, -wr), min(in_h, src_h - wr)
        c_lo, c_hi = max(0, -wc), min(in_w, src_w - wc)
        if r_lo >= r_hi or c_lo >= c_hi:
            return out
        ri = _resample_index(vals.shape[1], in_h, r_lo, r_hi, order)
        ci = _resample_index(vals.shape[2], in_w, c_lo, c_hi, order)
        if self.flipped:
            cols = slice(src_w - c_hi - wc, src_w - c_lo - wc)
        else:
            cols = slice(c_lo + wc, c_hi + wc)
        rows = slice(r_lo + wr, r_hi + wr)
        for d in range(depth):  # per frame: temporaries stay one frame large
            # columns first, on the small map; the last pass then takes whole rows
            block = _apply_index(_apply_index(vals[d], ci, axis=1), ri, axis=0)
            out[d, rows, cols] = block[:, ::-1] if self.flipped else block
        return out


def _resample_index(n_in: int, n_out: int, lo: int, hi: int, order: int):
    """Indices (and weights) stretching n_in samples over n_out pixels, for pixels lo..hi."""
    centres = (np.arange(lo, hi, dtype=np.float64) + 0.5) * (n_in / n_out)
    if order == 0:
        return np.clip(np.floor(centres).astype(np.intp), 0, n_in - 1), None, None
    pos = np.clip(centres - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    return i0, i1, frac


def _apply_index(arr: np.ndarray, index, axis: int) -> np.ndarray:
    i0, i1, frac = index
    a0 = np.take(arr, i0, axis=axis)
    if i1 is None:
        return a0
    a1 = np.take(arr, i1, axis=axis)
    f = frac[:, None] if axis == 0 else frac[None, :]
    # a0 + (a1 - a0) * f in place: a1 is a fresh copy, and full-size frames are large
    a1 -= a0
    a1 *= f
    a1 += a0
    return a1


def _window_rows(row_counts: np.ndarray, r0: int, r1: int, in_h: int) -> int:
    """First row of the window: centred on a short breast, else covering the most breast."""
    height = r1 - r0
    if height <= in_h:
        return r0 - (in_h - height) // 2
    csum = np.concatenate([[0], np.cumsum(row_counts[r0:r1], dtype=np.int64)])
    covered = csum[in_h:] - csum[:-in_h]  # breast pixels for each start r0 + k
    best = np.flatnonzero(covered == covered.max())
    centre = (height - in_h) / 2  # among equal windows, the one nearest the centre
    return r0 + int(best[np.argmin(np.abs(best - centre))])


def preprocess(volume: np.ndarray, modality: str = "dbt", laterality: str | None = None,
               config: PreprocessConfig | None = None,
               input_size: tuple[int, int] | None = None,
               whole_breast: bool | None = None,
               ) -> tuple[np.ndarray, PreprocessTransform]:
    """Model input (D, H_in, W_in) float32 and the transform back to the source.

    ``volume`` is (D, H, W) or (H, W); ``laterality`` ("L"/"R") breaks ties when the image
    content does not show the chest-wall side (and decides alone with flip_by="laterality").
    ``input_size`` overrides the config's size for the modality (small test images).
    ``whole_breast`` (default: the config's) makes the window at least the breast crop's size,
    rounded up to a multiple of the network's stride: the output is then larger than
    ``input_size`` wherever the breast is, and the transform says so (``input_shape``).
    """
    config = config or PreprocessConfig()
    vol = np.asarray(volume)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3 or 0 in vol.shape:
        raise ValueError(f"expected a (D, H, W) volume, got shape {np.shape(volume)}")
    in_h, in_w = input_size or config.input_size(modality)
    depth, src_h, src_w = vol.shape

    mip = vol[0] if depth == 1 else vol.max(axis=0)
    mask = breast_mask(mip, config.mask_fraction)
    if not mask.any():  # nothing to find: keep the whole image
        mask = np.ones_like(mask)
    rows_any = np.flatnonzero(mask.any(axis=1))
    cols_any = np.flatnonzero(mask.any(axis=0))
    r0, r1 = int(rows_any[0]), int(rows_any[-1]) + 1
    c0, c1 = int(cols_any[0]), int(cols_any[-1]) + 1

    side = chest_wall_side(mask)
    lat = (laterality or "").upper()
    if config.flip_by == "laterality" and lat in ("L", "R"):
        flipped = lat == "R"
    elif side is not None:
        flipped = side == "right"
    else:  # standard mammography display: right breasts have the chest wall on the right
        flipped = lat == "R"

    fvol = vol[:, :, ::-1] if flipped else vol  # views, no copies
    fmask = mask[:, ::-1] if flipped else mask
    fc0, fc1 = (src_w - c1, src_w - c0) if flipped else (c0, c1)
    if config.whole_breast if whole_breast is None else whole_breast:
        in_h = max(in_h, _round_up(r1 - r0, GLOBAL_DOWNSAMPLING))
        in_w = max(in_w, _round_up(fc1 - fc0, GLOBAL_DOWNSAMPLING))

    wc = fc0  # chest wall at the window's left edge
    row_counts = fmask[:, wc:wc + in_w].sum(axis=1, dtype=np.int64)
    wr = _window_rows(row_counts, r0, r1, in_h)

    # the part of the crop inside the window, in flipped-source coordinates
    sr0, sr1 = max(r0, wr), min(r1, wr + in_h)
    sc0, sc1 = max(fc0, wc), min(fc1, wc + in_w)
    out = np.zeros((depth, in_h, in_w), dtype=np.float32)
    mr0, mc0 = sr0 - wr, sc0 - wc
    mr1, mc1 = sr1 - wr, sc1 - wc
    out[:, mr0:mr1, mc0:mc1] = fvol[:, sr0:sr1, sc0:sc1]

    if config.normalise == "breast":
        region = np.zeros((in_h, in_w), dtype=bool)
        region[mr0:mr1, mc0:mc1] = fmask[sr0:sr1, sc0:sc1]
    else:
        region = None
    mean, std = _moments(out, region)
    out -= mean
    out /= std

    transform = PreprocessTransform(
        source_shape=(depth, src_h, src_w),
        input_shape=(in_h, in_w),
        flipped=flipped,
        crop_box=(r0, c0, r1, c1),
        window_origin=(wr, wc),
        padding=(mr0, in_h - mr1, mc0, in_w - mc1),
        mean=mean,
        std=std,
    )
    return out, transform


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _moments(out: np.ndarray, region: np.ndarray | None) -> tuple[float, float]:
    """Mean and standard deviation in float64, a frame at a time (no full-size temporaries)."""
    total = 0.0
    squares = 0.0
    count = 0
    for frame in out:
        values = frame[region] if region is not None else frame
        v = values.astype(np.float64)
        total += float(v.sum())
        squares += float(np.dot(v.ravel(), v.ravel()))
        count += v.size
    if count == 0:
        return 0.0, 1.0
    mean = total / count
    var = max(squares / count - mean * mean, 0.0)
    std = var ** 0.5
    return mean, (std if std > 1e-12 else 1.0)
