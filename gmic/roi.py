"""Saliency aggregation and retrieve_roi_from_3d_image (paper eq. 3 and Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def top_t_count(map_h: int, map_w: int, percent_t: float, num_slices: int) -> int:
    """Voxels pooled per class: relative to ONE slice's area, so independent of D.

    Clipped to [1, D*h*w] so that a short volume with percent_t > 1 still pools.
    """
    t = int(round(map_h * map_w * percent_t))
    return max(1, min(t, num_slices * map_h * map_w))


def top_t_aggregate(saliency: Tensor, percent_t: float, area_scale: float = 1.0) -> Tensor:
    """Mean of the top t saliency values of each class over the whole volume.

    saliency: (D, C, h, w) -> (C,). ``area_scale`` (<= 1) counts t on that share of the
    map's area: a model reading an input larger than the one it was trained at (the whole
    breast of a full-size image) pools as many voxels as it learnt to, so a small lesion is
    not diluted by the extra area.
    """
    d, c, h, w = saliency.shape
    t = top_t_count(h, w, percent_t * area_scale, d)
    flat = saliency.transpose(0, 1).reshape(c, -1)
    return flat.topk(t, dim=1).values.mean(dim=1)


@dataclass(frozen=True)
class RoiSelection:
    """The K windows chosen on the saliency map, in map cells and slices.

    source_slices: the slice where each window's criterion peaked (Algorithm 1 line 9);
    slices: the slice the crop is taken from (= source_slices in eval, sampled within
    +/-zeta of it in training, line 12).
    """

    slices: Tensor  # (K,) long
    source_slices: Tensor  # (K,) long
    rows: Tensor  # (K,) long, top-left row on the map
    cols: Tensor  # (K,) long, top-left column on the map
    window: tuple[int, int]  # window size on the map


def crop_window_on_map(crop_size: tuple[int, int], image_size: tuple[int, int],
                       map_size: tuple[int, int]) -> tuple[int, int]:
    """A crop of crop_size pixels covers this many map cells (256 -> 4 on a 33x21 map)."""
    def cells(crop: int, image: int, cells_total: int) -> int:
        return max(1, min(cells_total, int(round(crop * cells_total / image))))

    return (cells(crop_size[0], image_size[0], map_size[0]),
            cells(crop_size[1], image_size[1], map_size[1]))


def retrieve_roi_from_3d_image(saliency: Tensor, num_crops: int, window: tuple[int, int],
                               zeta: int, sample_slices: bool = False,
                               generator: torch.Generator | None = None) -> RoiSelection:
    """Greedily pick num_crops windows with the largest summed normalised saliency.

    saliency: (D, C, h, w). Each class is min-max normalised over the whole volume, the
    classes summed; after each pick the window is zeroed on the picked slice and its +/-zeta
    neighbours, so no two crops come from the same place within zeta slices. With
    sample_slices (training, D > 1) the crop's slice is drawn uniformly within +/-zeta.
    """
    a = saliency.detach().float()
    d, c, h, w = a.shape
    flat = a.transpose(0, 1).reshape(c, -1)
    lo = flat.min(dim=1).values.view(1, c, 1, 1)
    hi = flat.max(dim=1).values.view(1, c, 1, 1)
    combined = ((a - lo) / (hi - lo).clamp_min(1e-12)).sum(dim=1)  # (D, h, w)

    wh, ww = window
    out_h, out_w = h - wh + 1, w - ww + 1
    slices, sources, rows, cols = [], [], [], []
    for _ in range(num_crops):
        # Window sums on every slice at once; one flat argmax picks slice and position.
        sums = F.avg_pool2d(combined.unsqueeze(1), (wh, ww), stride=1).reshape(-1)
        idx = int(sums.argmax())
        s, rem = divmod(idx, out_h * out_w)
        r, col = divmod(rem, out_w)
        lo_s, hi_s = max(0, s - zeta), min(d - 1, s + zeta)
        combined[lo_s:hi_s + 1, r:r + wh, col:col + ww] = 0
        sampled = s
        if sample_slices and d > 1 and hi_s > lo_s:
            sampled = int(torch.randint(lo_s, hi_s + 1, (1,), generator=generator))
        slices.append(sampled)
        sources.append(s)
        rows.append(r)
        cols.append(col)

    def as_long(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long)

    return RoiSelection(as_long(slices), as_long(sources), as_long(rows), as_long(cols),
                        (wh, ww))


def map_to_image_positions(selection: RoiSelection, image_size: tuple[int, int],
                           map_size: tuple[int, int], crop_size: tuple[int, int]) -> Tensor:
    """Top-left (slice, row, col) of each crop in input pixels, (K, 3) long.

    Map cells map to pixels by proportion; positions are clipped so the crop lies inside
    the image wherever the image is at least as large as the crop.
    """
    big_h, big_w = image_size
    h, w = map_size
    rows = torch.round(selection.rows.double() * big_h / h).long()
    cols = torch.round(selection.cols.double() * big_w / w).long()
    rows = rows.clamp(0, max(0, big_h - crop_size[0]))
    cols = cols.clamp(0, max(0, big_w - crop_size[1]))
    return torch.stack([selection.slices, rows, cols], dim=1)


def cut_crop(volume: Tensor, s: int, top: int, left: int, size: tuple[int, int]) -> Tensor:
    """volume[s, top:top+h, left:left+w] (any top/left, even negative); parts outside the
    image are filled with that slice's minimum."""
    ch, cw = size
    _, big_h, big_w = volume.shape
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(big_h, top + ch), min(big_w, left + cw)
    if (r0, c0, r1, c1) == (top, left, top + ch, left + cw):
        return volume[s, r0:r1, c0:c1]
    out = volume[s].min().expand(ch, cw).clone()
    if r0 < r1 and c0 < c1:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = volume[s, r0:r1, c0:c1]
    return out


def extract_crops(volume: Tensor, positions: Tensor, crop_size: tuple[int, int]) -> Tensor:
    """Cut (K, 1, ch, cw) crops from volume (D, H, W) at top-left positions (K, 3).

    Parts of a crop outside the image are filled with that slice's minimum.
    """
    crops = [cut_crop(volume, s, r, c, crop_size) for s, r, c in positions.tolist()]
    return torch.stack(crops).unsqueeze(1)
