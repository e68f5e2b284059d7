"""Training augmentation: random shift and resize of the input window (paper V-D.3: up to
100 pixels any way), and random intensity changes standing in for other detectors, doses
and vendors' processing (tone curve, contrast, noise, blur)."""

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


def uniform(low: float, high: float, generator: torch.Generator | None = None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def intensity_jitter(volume: Tensor, strength: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """A (D, H, W) z-scored volume as another machine might have shown it, then z-scored
    again: a random monotone tone curve (gamma in [1/(1+s), 1+s] over the volume's range),
    contrast and offset changes, Gaussian blur (sigma up to 1.5 s px) and added noise (up to
    0.15 s of the volume's standard deviation, inside the image, not on the padding), all
    drawn from ``generator``. Every step is monotone or local, so the padding (the volume's
    minimum) stays the darkest; strength 0 returns the input unchanged."""
    if strength <= 0:
        return volume
    lo, hi = volume.min(), volume.max()
    span = torch.clamp(hi - lo, min=1e-6)
    x = (volume - lo) / span  # [0, 1]
    gamma = (1 + strength) ** uniform(-1.0, 1.0, generator)
    x = x.clamp(min=0) ** gamma
    sigma = uniform(0.0, 1.5 * strength, generator)
    if sigma > 0.3:
        radius = int(3 * sigma + 0.5)
        taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        y = x.unsqueeze(1)  # (D, 1, H, W)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"),
                     kernel.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"),
                     kernel.view(1, 1, -1, 1))
        x = y.squeeze(1)
    x = x * uniform(1 - strength, 1 + strength, generator)
    x = x + uniform(-strength, strength, generator) * 0.5
    noise_sd = uniform(0.0, 0.15 * strength, generator) * float(x.std())
    if noise_sd > 0:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x + noise_sd * noise * (volume > lo)
    x = (x - x.mean()) / torch.clamp(x.std(), min=1e-6)
    return x.contiguous()


__all__ = ["intensity_jitter", "shift_resize", "shift_resize_with_masks", "uniform",
           "uniform_int"]
