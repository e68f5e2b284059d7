"""Supervision by ground-truth masks: masks follow the preprocessing and the augmentation
exactly; the saliency loss is the balanced BCE it says; the crop loss labels each crop by
the lesions it holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmic.augment import shift_resize, shift_resize_with_masks
from gmic.loss import crop_mask_loss, saliency_mask_loss
from gmic.preprocess import preprocess
from tests.support.training import breast


@pytest.mark.parametrize("side", ["L", "R"])
@pytest.mark.parametrize("size", [(512, 384), (160, 64)], ids=["padded", "cropped"])
def test_mask_maps_to_model_like_the_pixels(side: str, size: tuple[int, int]) -> None:
    vol = breast(3, 300, 200, side, seed=2)
    col = 30 if side == "L" else 199 - 30
    mask = np.zeros((300, 200), dtype=np.float32)
    mask[130:150, col - 5:col + 6] = 1
    vol[:, mask > 0] = 2500
    out, tf = preprocess(vol, "dbt", laterality=side, input_size=size)
    model_mask = tf.map_to_model(mask)
    assert model_mask.shape == size
    # every masked source pixel inside the window lands on a masked model pixel and back
    bright = (2500 - tf.mean) / tf.std
    for r, c in zip(*np.nonzero(mask), strict=True):
        _, mr, mc = tf.to_model(0, r, c)
        if 0 <= mr < size[0] and 0 <= mc < size[1]:
            assert model_mask[mr, mc] == 1 and out[1, mr, mc] == pytest.approx(bright, rel=1e-5)
    inside = [tf.in_window(r, c) for r, c in zip(*np.nonzero(mask), strict=True)]
    assert model_mask.sum() == np.sum(inside)
    with pytest.raises(ValueError, match="shape"):
        tf.map_to_model(mask[:-1])


def test_masks_get_the_same_random_window_as_the_volume() -> None:
    vol = torch.zeros(2, 96, 64)
    vol[:, 40:50, 20:28] = 5.0
    masks = torch.zeros(2, 96, 64)
    masks[1, 40:50, 20:28] = 1.0
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    moved, moved_masks = shift_resize_with_masks(vol, masks, 12, g1)
    assert torch.equal(moved, shift_resize(vol, 12, g2))  # same draws as without masks
    assert moved_masks is not None and moved_masks[0].abs().sum() == 0
    assert torch.allclose(moved_masks[1] * 5.0, moved[0], atol=1e-5)
    assert shift_resize_with_masks(vol, masks, 0)[1] is masks


def test_mask_loss_is_balanced_bce_on_the_slice_maximum() -> None:
    saliency = torch.full((3, 2, 2, 2), 0.1)
    saliency[1, 1, 0, 0] = 0.8  # malignant channel, slice 1, cell (0, 0)
    masks = torch.zeros(2, 8, 8)
    masks[1, :4, :4] = 1  # the malignant lesion covers cell (0, 0) entirely
    got = saliency_mask_loss(saliency, masks)
    # benign: no lesion of its own, 3 background cells and the malignant lesion's cell at 0.1
    # (target 0, a term of its own); malignant: lesion cell at 0.8 (target 1), 3 background
    # cells at 0.1 (target 0)
    bg = -np.log(0.9)
    expected = bg + bg + (-np.log(0.8)) + bg
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a partly covered cell has a soft target: a quarter covered is already 1
    part = torch.zeros(2, 8, 8)
    part[1, :1, :2] = 1  # 2 of 16 pixels of cell (0, 0): target 0.5
    one = torch.full((1, 2, 2, 2), 0.5)
    assert saliency_mask_loss(one, part).item() == pytest.approx(
        F.binary_cross_entropy(torch.tensor(0.5), torch.tensor(0.5)).item()
        + 3 * -np.log(0.5), rel=1e-5)


def test_mask_loss_weighs_another_class_lesion_like_the_background() -> None:
    # the malignant map lights up a benign mass: that one cell costs as much as all the
    # background together, not a sixteenth of it
    saliency = torch.full((1, 2, 4, 4), 0.1)
    saliency[0, 1, 0, 0] = 0.9
    masks = torch.zeros(2, 16, 16)
    masks[0, :4, :4] = 1  # a benign lesion on cell (0, 0)
    benign = -np.log(0.1) + -np.log(0.9)  # its lesion missed at 0.1, background right
    malignant = -np.log(0.9) + -np.log(0.1)  # background right, the benign mass at 0.9
    assert saliency_mask_loss(saliency, masks).item() == pytest.approx(benign + malignant,
                                                                      rel=1e-5)


def test_crop_loss_labels_each_crop_by_the_lesions_it_holds() -> None:
    masks = torch.zeros(2, 40, 40)
    masks[1, 0:4, 0:4] = 1  # malignant: 16 pixels, a tenth of a 10x16 crop at (0, 0)
    masks[0, 30:32, 30:34] = 1  # benign: 8 pixels, half of that in the crop at (30, 24)
    positions = torch.tensor([[0, 0, 0], [2, 30, 24], [1, 15, 15]])
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5], [-3.0, -3.0]])
    got = crop_mask_loss(logits, positions, masks, (10, 16))
    targets = torch.tensor([[0.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert got.item() == pytest.approx(expected.mean(dim=0).sum().item(), rel=1e-6)
    # the gradient pushes the crop holding the malignant lesion up, the empty one down
    logits.requires_grad_(True)
    crop_mask_loss(logits, positions, masks, (10, 16)).backward()
    assert logits.grad[0, 1] < 0 and logits.grad[2, 1] > 0


def test_crop_logits_are_the_local_classifier_on_each_crop() -> None:
    from gmic.model import GMIC
    from tests.support.training import TINY

    model = GMIC(TINY.replace(num_crops=1)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, *TINY.input_size))
    # one crop: attention 1, so y_local is the classifier on that crop
    assert out.crop_logits.shape == (1, 2)
    assert torch.allclose(torch.sigmoid(out.crop_logits[0]), out.y_local, atol=1e-6)
