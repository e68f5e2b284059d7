"""Multiply-accumulate counts with torch's FLOP counter, on the meta device.

Meta tensors carry shapes but no data, so a 96-slice full-resolution count costs nothing.
MACs = FLOPs / 2 (FlopCounterMode counts a multiply-add as two FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from gmic.baselines import build_baseline
from gmic.model import GMIC
from gmic.model_config import GMICConfig

META = torch.device("meta")


def count_gmacs(fn: Callable[[], object]) -> float:
    """GMACs of one call of fn (forward only)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


def gmic_gmacs(cfg: GMICConfig, slices: int, height: int | None = None,
               width: int | None = None) -> tuple[float, float]:
    """(global, local) GMACs of 3D-GMIC on one volume.

    The two parts are counted separately because ROI retrieval needs real saliency
    values; the local part is always K crops of crop_size, whatever the saliency.
    """
    height, width = height or cfg.input_size[0], width or cfg.input_size[1]
    with torch.device(META):
        model = GMIC(cfg).eval()
        volume = torch.empty(slices, 1, height, width)
        crops = torch.empty(cfg.num_crops, 1, *cfg.crop_size)
    global_part = count_gmacs(lambda: model._saliency_of(volume))
    local_part = count_gmacs(lambda: model.local_prediction(crops))
    return global_part, local_part


def baseline_gmacs(name: str, slices: int, height: int, width: int) -> float:
    with torch.device(META):
        model: nn.Module = build_baseline(name).eval()
        volume: Tensor = torch.empty(slices, height, width)
    return count_gmacs(lambda: model(volume))


def linear_extrapolation(xs: Sequence[float], ys: Sequence[float], at: float) -> float:
    """Least-squares line through (xs, ys), evaluated at `at` (the paper's estimate)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my + slope * (at - mx)
