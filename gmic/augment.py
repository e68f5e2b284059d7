"""Random shift and resize of the input window (paper V-D.3: up to 100 pixels any way)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform_int(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """Uniform integer in [low, high], drawn from generator (training randomness)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def shift_resize(volume: Tensor, max_px: int, generator: torch.Generator | None = None
                 ) -> Tensor:
    """A window of the (D, H, W) input moved by up to max_px pixels and grown or shrunk by up
    to max_px pixels per side, resampled back to (H, W).

    Pixels beyond the input are filled with the volume's minimum: the preprocessed padding
    value (background after the z-score). max_px = 0 returns the input unchanged.
    """
    return shift_resize_with_masks(volume, None, max_px, generator)[0]


def shift_resize_with_masks(volume: Tensor, masks: Tensor | None, max_px: int,
                            generator: torch.Generator | None = None
                            ) -> tuple[Tensor, Tensor | None]:
    """shift_resize, with (C, H, W) masks moved by the same window (filled with 0)."""
    if max_px <= 0:
        return volume, masks
    _, h, w = volume.shape
    # window edges in input pixels: each edge moves independently within +/-max_px, which
    # shifts (edges move together) and resizes (edges move apart) in one draw
    top = uniform_int(-max_px, max_px, generator)
    left = uniform_int(-max_px, max_px, generator)
    bottom = h + uniform_int(-max_px, max_px, generator)
    right = w + uniform_int(-max_px, max_px, generator)
    bottom, right = max(bottom, top + 8), max(right, left + 8)
    pad = (max(0, -left), max(0, right - w), max(0, -top), max(0, bottom - h))

    def window(x: Tensor, fill: float) -> Tensor:
        if any(pad):
            x = F.pad(x, pad, value=fill)
        x = x[:, top + pad[2]:bottom + pad[2], left + pad[0]:right + pad[0]]
        if x.shape[-2:] == (h, w):
            return x.contiguous()
        return F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear",
                             align_corners=False).squeeze(0)

    return window(volume, float(volume.min())), None if masks is None else window(masks, 0.0)


__all__ = ["shift_resize", "shift_resize_with_masks", "uniform_int"]
