"""Crops centred on ground-truth lesions, for training the local network on its own.

In the paper the local network learns only through y_local, from image labels. On few images
it learns that a crop holds a mass, not whether the mass is malignant; trained on crops
centred on the lesions, on the slice where each is in focus, it learns that in minutes
(held-out phantoms, crops centred on the masses: malignant AUC 0.56 -> 0.94). Masks and
depths come from ground-truth segmentations on the model input; no DICOM here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from gmic.augment import uniform_int
from gmic.roi import cut_crop

NO_DEPTH = -1.0  # a depth map's value where no lesion is, or its slice is unknown
BACKGROUND_TRIES = 20


@dataclass(frozen=True)
class Lesion:
    """One lesion on the model input: its centre slice and pixel, and its classes."""

    slice: int
    row: float
    col: float
    labels: tuple[float, ...]  # per class, e.g. (benign, malignant)


def find_lesions(masks: np.ndarray, depths: np.ndarray, merge_px: int) -> list[Lesion]:
    """The lesions of each class: connected parts of its mask after joining parts closer
    than merge_px (a calcification cluster is one lesion, not one per speck).

    masks: (C, H, W), > 0.5 inside a lesion; depths: (C, H, W), the slice each lesion pixel
    is centred on (NO_DEPTH where unknown). A lesion's centre is the centroid of its mask
    pixels, its slice their median depth; lesions without a known depth are left out.
    """
    lesions = []
    classes = masks.shape[0]
    for c in range(classes):
        inside = masks[c] > 0.5
        if not inside.any():
            continue
        # a square dilation by merge_px (a separable maximum: ~200x faster than a structure)
        joined = ndimage.maximum_filter(inside, size=2 * merge_px + 1) if merge_px > 0 \
            else inside
        parts, count = ndimage.label(joined)
        for part in range(1, count + 1):
            rows, cols = np.nonzero(inside & (parts == part))
            depth = depths[c][rows, cols]
            depth = depth[depth > NO_DEPTH]
            if rows.size == 0 or depth.size == 0:
                continue
            labels = tuple(1.0 if k == c else 0.0 for k in range(classes))
            lesions.append(Lesion(int(round(float(np.median(depth)))), float(rows.mean()),
                                  float(cols.mean()), labels))
    return lesions


def sample_lesion_crops(volume: Tensor, masks: Tensor, lesions: list[Lesion],
                        crop_size: tuple[int, int], zeta: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Training crops of one image: one per lesion and as many lesion-free ones (at least one).

    A lesion crop's centre is the lesion's moved by up to a quarter of the crop each way and
    its slice by up to zeta, as the crops of the model land around a lesion (on a grid, on
    the slice where the saliency peaked); its targets are the classes whose masks reach the
    crop's central half. A lesion-free crop lies on a random slice inside the breast and holds
    no mask pixel; it is left out after BACKGROUND_TRIES draws that all hit a lesion. Each crop
    is mirrored left-right at random.

    volume: (D, H, W); masks: (C, H, W) on the model input. Returns crops (K, 1, ch, cw) and
    targets (K, C) in 0/1.
    """
    depth = volume.shape[0]
    ch, cw = crop_size
    classes = masks.shape[0]
    crops, targets = [], []
    for lesion in lesions:
        s = min(max(lesion.slice + uniform_int(-zeta, zeta, generator), 0), depth - 1)
        top = int(round(lesion.row)) - ch // 2 + uniform_int(-(ch // 4), ch // 4, generator)
        left = int(round(lesion.col)) - cw // 2 + uniform_int(-(cw // 4), cw // 4, generator)
        centre = masks[:, max(0, top + ch // 4):max(0, top + ch - ch // 4),
                       max(0, left + cw // 4):max(0, left + cw - cw // 4)]
        crops.append(cut_crop(volume, s, top, left, crop_size))
        targets.append((centre > 0.5).flatten(1).any(dim=1).float()
                       if centre.numel() else torch.tensor(lesion.labels))
    breast = volume.amax(dim=0) > volume.min()
    rows, cols = torch.nonzero(breast, as_tuple=True)
    on_a_lesion = masks.amax(dim=0) > 0
    for _ in range(max(1, len(lesions)) if rows.numel() else 0):
        for _try in range(BACKGROUND_TRIES):
            i = uniform_int(0, rows.numel() - 1, generator)
            top, left = int(rows[i]) - ch // 2, int(cols[i]) - cw // 2
            window = on_a_lesion[max(0, top):max(0, top + ch), max(0, left):max(0, left + cw)]
            if not window.any():
                crops.append(cut_crop(volume, uniform_int(0, depth - 1, generator), top, left,
                                  crop_size))
                targets.append(torch.zeros(classes))
                break
    if not crops:
        return volume.new_zeros((0, 1, ch, cw)), volume.new_zeros((0, classes))
    flips = torch.rand(len(crops), generator=generator) < 0.5
    out = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips.tolist(),
                                                              strict=True)])
    return out.unsqueeze(1), torch.stack(targets).to(volume.device)


__all__ = ["NO_DEPTH", "Lesion", "find_lesions", "sample_lesion_crops"]
