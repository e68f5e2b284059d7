"""The training loss of paper eq. 7."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gmic.model import GMICOutput


class LossTerms(NamedTuple):
    total: Tensor
    bce_global: Tensor  # summed over classes
    bce_local: Tensor  # summed over classes
    l1: Tensor  # sum of |A| over voxels and classes (before beta)


def gmic_loss_terms(output: GMICOutput, target: Tensor, beta: float) -> LossTerms:
    """sum_c BCE(y^c, y_local^c) + BCE(y^c, y_global^c) + beta * sum_(i,j,d) |A^c_ijd|.

    target: (C,) or (B, C) of 0/1 labels matching output.y. For a batch every term is
    averaged over volumes. Computed in fp32 (BCE is not autocast-safe).
    """
    target = target.to(output.y_global.device, torch.float32)
    y_global, y_local = output.y_global.float(), output.y_local.float()
    if y_global.dim() == 1:
        y_global, y_local, target = y_global[None], y_local[None], target.reshape(1, -1)
    batch = y_global.shape[0]
    # F.binary_cross_entropy clamps log at -100, so a saliency of exactly 0 stays finite.
    bce_global = F.binary_cross_entropy(y_global, target, reduction="sum") / batch
    bce_local = F.binary_cross_entropy(y_local, target, reduction="sum") / batch
    l1 = output.saliency.float().abs().sum() / batch
    return LossTerms(bce_global + bce_local + beta * l1, bce_global, bce_local, l1)


def saliency_mask_loss(saliency: Tensor, masks: Tensor) -> Tensor:
    """Optional strong supervision of the saliency maps by ground-truth lesion masks (not in
    the paper, which had image labels only; used where masks exist, e.g. synthetic data).

    saliency: (D, C, h, w) in [0, 1]; masks: (C, H, W) on the model input, 0/1. The slice
    maximum of the saliency (what the paper evaluates localisation on) is compared cell by
    cell with the fraction of the cell the lesion covers (saturating at a quarter), by BCE
    averaged separately over three kinds of cells and summed, so that a small lesion weighs
    as much as the background: the class's lesion, the background, and the lesions of the
    other classes only (a benign mass in the malignant map: without their own term they are a
    sliver of the background, and the map learns "a mass" rather than "a malignant one");
    summed over classes.
    """
    projected = saliency.float().amax(dim=0)  # (C, h, w)
    cover = F.adaptive_avg_pool2d(masks.float()[None],
                                 (projected.shape[-2], projected.shape[-1]))[0]
    target = (cover * 4).clamp(max=1.0)
    bce = F.binary_cross_entropy(projected.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    lesion = target > 0
    any_lesion = lesion.any(dim=0)
    total = saliency.new_zeros((), dtype=torch.float32)
    for c in range(projected.shape[0]):
        kinds = (lesion[c], ~any_lesion, any_lesion & ~lesion[c])  # own, background, others'
        for cells in kinds:
            if cells.any():
                total = total + bce[c][cells].mean()
    return total


def crop_mask_loss(crop_logits: Tensor, crop_positions: Tensor, masks: Tensor,
                   crop_size: tuple[int, int]) -> Tensor:
    """Optional strong supervision of the local network by ground-truth lesion masks: the
    local classifier on each crop alone should say which lesions the crop holds.

    In the paper the local network learns only through y_local, the classifier on the
    attention-weighted mean of the crops' features, from image labels; with few images it
    learnt to find masses but not to tell malignant from benign ones, which a small network
    on lesion-centred patches learns in minutes. crop_logits: (K, C); crop_positions: (K, 3)
    top-left (slice, row, col) in model-input pixels; masks: (C, H, W) on the model input.
    A crop's target per class is the share of it the lesion covers, saturating at a tenth;
    BCE averaged over crops, summed over classes.
    """
    ch, cw = crop_size
    targets = torch.stack([masks[:, r:r + ch, c:c + cw].float().mean(dim=(1, 2))
                           for r, c in crop_positions[:, 1:].tolist()])  # (K, C)
    targets = (targets * 10).clamp(max=1.0)
    bce = F.binary_cross_entropy_with_logits(crop_logits.float(), targets, reduction="none")
    return bce.mean(dim=0).sum()


def gmic_loss(output: GMICOutput, target: Tensor, beta: float) -> Tensor:
    """The scalar loss of eq. 7 (see gmic_loss_terms)."""
    return gmic_loss_terms(output, target, beta).total


__all__ = ["LossTerms", "crop_mask_loss", "gmic_loss", "gmic_loss_terms", "saliency_mask_loss"]
