"""gmic.preprocess: breast mask, crop, flip, window, z-score, and the exact inverse mapping."""

from __future__ import annotations

import numpy as np
import pytest

from gmic.preprocess import (
    PreprocessConfig,
    breast_mask,
    chest_wall_side,
    otsu_threshold,
    preprocess,
)
from tests.support.training import breast


def test_otsu_separates_two_levels() -> None:
    img = np.concatenate([np.full(100, 10.0), np.full(100, 200.0)])
    assert 10 < otsu_threshold(img) <= 200


@pytest.mark.parametrize("side", ["L", "R"])
def test_mask_finds_the_breast_not_the_label(side: str) -> None:
    vol = breast(1, 300, 200, side)
    mask = breast_mask(vol[0])
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # ellipse rows 0.45*300 +- 90, columns 0..100 from the chest wall
    assert abs(rows[0] - 45) <= 2 and abs(rows[-1] - 225) <= 2
    if side == "L":
        assert cols[0] == 0 and abs(cols[-1] - 100) <= 2
    else:
        assert cols[-1] == 199 and abs(cols[0] - 99) <= 2
    assert not mask[-8, -12 if side == "L" else 12]  # the label is not breast
    assert chest_wall_side(mask) == ("left" if side == "L" else "right")
    assert chest_wall_side(vol[0]) == chest_wall_side(mask)


def test_chest_wall_side_ambiguous_or_empty() -> None:
    assert chest_wall_side(np.zeros((50, 40))) is None
    symmetric = np.zeros((50, 40), dtype=bool)
    symmetric[10:40, 10:30] = True
    assert chest_wall_side(symmetric) is None


@pytest.mark.parametrize("side", ["L", "R"])
@pytest.mark.parametrize("size", [(512, 384), (160, 64)], ids=["padded", "cropped"])
def test_lesion_maps_to_model_and_back(side: str, size: tuple[int, int]) -> None:
    vol = breast(4, 300, 200, side, seed=1)
    # a lesion 30 columns from the chest wall, on frame 2
    lesion_col = 30 if side == "L" else 199 - 30
    lesion = (2, 140, lesion_col)
    vol[2, 137:144, lesion_col - 3:lesion_col + 4] = 2500
    out, tf = preprocess(vol, "dbt", laterality=side, input_size=size)
    assert out.shape == (4, *size) and out.dtype == np.float32
    assert tf.flipped == (side == "R")
    f, r, c = tf.to_model(*lesion)
    assert 0 <= r < size[0] and 0 <= c < size[1]
    assert (f, r, c) == (2, r, c) and c == 30 - tf.window_origin[1]
    assert tf.to_source(f, r, c) == lesion
    assert tf.in_window(*lesion[1:])
    # the model input holds the z-scored source pixel at the mapped position
    assert out[f, r, c] == pytest.approx((2500 - tf.mean) / tf.std, rel=1e-5)
    # every model pixel inside the crop maps back to the source pixel it came from
    rng = np.random.default_rng(0)
    r0, c0, r1, c1 = tf.crop_box
    for _ in range(50):
        sr, sc, sf = rng.integers(r0, r1), rng.integers(c0, c1), rng.integers(0, 4)
        _, mr, mc = tf.to_model(sf, sr, sc)
        if 0 <= mr < size[0] and 0 <= mc < size[1]:
            assert out[sf, mr, mc] == pytest.approx((vol[sf, sr, sc] - tf.mean) / tf.std,
                                                    rel=1e-4, abs=1e-4)
            assert tf.to_source(sf, mr, mc) == (sf, sr, sc)


def test_window_is_anchored_at_the_chest_wall_and_padded() -> None:
    for side in ("L", "R"):
        vol = breast(2, 300, 200, side)
        out, tf = preprocess(vol, laterality=side, input_size=(512, 384))
        top, bottom, left, right = tf.padding
        assert left == 0 and right > 0 and top > 0 and bottom > 0
        # breast centred vertically: padding split evenly (within one row)
        assert abs(top - bottom) <= 1
        background = -tf.mean / tf.std  # zero padding after the z-score
        assert np.allclose(out[:, :top], background) and np.allclose(out[:, :, -right:],
                                                                      background)
        # chest wall on the left after the flip: the first model column is breast
        assert (out[0, top:512 - bottom, 0] > background).mean() > 0.9
        assert abs(float(out.mean())) < 1e-3 and float(out.std()) == pytest.approx(1, abs=1e-3)


def test_tall_breast_window_covers_the_most_breast() -> None:
    vol = breast(1, 400, 120, "L", height=0.9, reach=0.6, label=False)
    out, tf = preprocess(vol, input_size=(200, 64))
    assert tf.padding == (0, 0, 0, 0)
    # the window's rows sit on the widest part of the breast (its centre row, 0.45 * 400)
    assert tf.window_origin[0] <= 180 < tf.window_origin[0] + 200


def test_flip_by_laterality_and_breast_normalisation() -> None:
    vol = breast(2, 120, 80, "L")
    _, by_content = preprocess(vol, laterality="R", input_size=(128, 96))
    assert not by_content.flipped  # the image shows a chest wall on the left
    config = PreprocessConfig(flip_by="laterality", normalise="breast")
    out, by_tag = preprocess(vol, laterality="R", config=config, input_size=(128, 96))
    assert by_tag.flipped
    # statistics over the breast: breast pixels have mean ~0, padding is far below
    assert out.min() < -1


def test_boxes_and_2d_input() -> None:
    vol = breast(1, 300, 200, "R")[0]  # 2D input
    out, tf = preprocess(vol, "s2d", input_size=(256, 128))
    assert out.shape == (1, 256, 128) and tf.flipped
    # a source box -> model box -> the same source box
    box = (100, 150, 20, 30)
    mbox = tf.to_model_box(*box)
    assert tf.to_source_box(*mbox) == box
    # the whole window maps to the part of the source it covers; far outside is empty
    r0, c0, h, w = tf.to_source_box(0, 0, 256, 128)
    assert 0 <= r0 and r0 + h <= 300 and c0 + w == 200 and w == 128
    assert tf.to_source_box(-500, 0, 10, 10)[2] == 0


def test_map_to_source_full_and_low_resolution() -> None:
    vol = breast(3, 300, 200, "R", seed=4)
    size = (256, 128)
    out, tf = preprocess(vol, input_size=size)
    # a full-resolution map equal to the input comes back onto the source pixels
    back = tf.map_to_source(out)
    assert back.shape == vol.shape and back.dtype == np.float32
    r0, c0, h, w = tf.to_source_box(0, 0, *size)
    np.testing.assert_allclose(back[:, r0:r0 + h, c0:c0 + w] * tf.std + tf.mean,
                               np.where(_crop_mask(tf, vol.shape), vol, 0)
                               [:, r0:r0 + h, c0:c0 + w], rtol=1e-4, atol=0.05)
    outside = np.ones(vol.shape[1:], bool)
    outside[r0:r0 + h, c0:c0 + w] = False
    assert not back[:, outside].any()
    # a 4x2 map with one hot cell: nearest-neighbour stretch lights that cell's 64x64 block
    low = np.zeros((3, 4, 2), np.float32)
    low[1, 2, 0] = 1.0
    hot = tf.map_to_source(low, order=0)
    _, hr, hc = tf.to_source(1, 2 * 64 + 10, 0 * 64 + 10)
    assert hot[1, hr, hc] == 1.0
    assert hot[1].sum() == 64 * 64 and hot[0].sum() == 0
    smooth = tf.map_to_source(low, order=1)
    assert smooth[1, hr, hc] > 0 and smooth.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError):
        tf.map_to_source(np.zeros((2, 4, 2)))


def _crop_mask(tf, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    r0, c0, r1, c1 = tf.crop_box
    mask[:, r0:r1, c0:c1] = True
    return mask


def test_config_sizes() -> None:
    config = PreprocessConfig()
    assert config.input_size("dbt") == (2116, 1339) == config.input_size("s2d")
    assert config.input_size("ffdm") == (2866, 1814)
    with pytest.raises(ValueError):
        config.input_size("ct")


def test_preprocess_imports_no_dicom() -> None:
    import ast
    import inspect as pyinspect

    import gmic.preprocess as module

    tree = ast.parse(pyinspect.getsource(module))
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert not names & {"pydicom", "dicomnode", "highdicom", "storage"}
