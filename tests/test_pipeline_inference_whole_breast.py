"""The whole breast at any field of view: the built-in weights (trained on a 448x320 window)
must read a breast larger than their input, not a window at the chest wall."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import BreastTomosynthesisImageStorage, ExplicitVRLittleEndian

from dicomnode.config import ModelConfig
from dicomnode.pipeline.images import BreastImage
from dicomnode.pipeline.inference import analyse_image
from dicomnode.pipeline.weights import ModelRegistry
from dicomnode.synth.anatomy import BreastParams, build_view_phantom
from dicomnode.synth.imaging import render_view
from dicomnode.synth.lesions import MALIGNANT_MASS, place_finding, sample_finding
from dicomnode.synth.options import DBT_PIXEL_MM, SizeSpec
from gmic.preprocess import preprocess

# A breast 45 mm high and 76 mm from the chest wall to the nipple: more than twice the
# built-in weights' 32 mm wide input window (clinical pixel size, 12 slices, so it is cheap).
WIDE = SizeSpec((44.0, 46.0), (75.0, 78.0), (12.0, 12.0), (8.0, 10.0), (2.5, 4.0))


def _wide_breast_with_far_mass(seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A DBT volume (left CC) with one malignant mass 80% of the way to the nipple
    (about 55 mm from the chest wall); returns the volume and the mass centre (row, col)."""
    rng = np.random.default_rng(seed)
    phantom = build_view_phantom(rng, "CC", WIDE, BreastParams(45.0, 76.0, 12.0, 2.2, 0.15))
    finding = dataclasses.replace(sample_finding(rng, MALIGNANT_MASS, WIDE), along=0.8,
                                  radial=0.0, contrast=0.12, radius_mm=4.5)
    placed = [place_finding(finding, phantom, 0)]
    rendered = render_view(phantom, placed, np.random.default_rng(seed + 1),
                           np.random.default_rng(seed + 2), want_dbt=True, want_s2d=False,
                           want_ffdm=False)
    x, y, _ = placed[0].centre_mm
    return rendered.dbt.astype(np.float32), (y / DBT_PIXEL_MM - 0.5, x / DBT_PIXEL_MM - 0.5)


def _image(volume: np.ndarray) -> BreastImage:
    depth = volume.shape[0]
    return BreastImage(
        pixels=volume, modality="dbt", laterality="L", laterality_source="tag", view="CC",
        pixel_spacing=(DBT_PIXEL_MM, DBT_PIXEL_MM), slice_positions=np.zeros((depth, 3)),
        slice_normal=None, study_uid="1.2.3", series_uid="1.2.3.1",
        frame_of_reference_uid="1.2.3.2",
        sop_class_uid=BreastTomosynthesisImageStorage, sop_instance_uids=["1.2.3.3"] * depth,
        frame_numbers=list(range(1, depth + 1)), transfer_syntax_uid=ExplicitVRLittleEndian,
        source_paths=[Path("none.dcm")], patient_orientation=None)


@pytest.mark.parametrize("whole_breast", [True, False])
def test_builtin_dbt_finds_a_mass_far_from_the_chest_wall(whole_breast: bool) -> None:
    """With the whole breast read, the malignant saliency peaks on the far mass and the local
    network's crops lie on it. The chest-wall window of the input size (the behaviour before
    [model] whole_breast) never sees the mass: the same assertions fail there, which the
    parametrisation checks, so this test cannot pass by accident."""
    torch.set_num_threads(1)
    volume, (row, col) = _wide_breast_with_far_mass(seed=2)
    registry = ModelRegistry(ModelConfig(device="cpu", whole_breast=whole_breast))
    loaded = registry.get("dbt")
    assert loaded is not None and loaded.model.cfg.input_size == (448, 320)
    assert col > loaded.model.cfg.input_size[1] + 150  # well outside a chest-wall window
    analysis = analyse_image(_image(volume), loaded)

    # Malignant saliency, max over slices, on the source grid.
    transform = dataclasses.replace(analysis.transform,
                                    source_shape=(1, *analysis.transform.source_shape[1:]))
    malignant = transform.map_to_source(analysis.saliency[:, 1].max(axis=0)[None])[0]
    r, c = int(round(row)), int(round(col))
    near = float(malignant[r - 45:r + 46, c - 45:c + 46].max())
    elsewhere = malignant.copy()
    elsewhere[r - 110:r + 111, c - 110:c + 111] = 0
    on_mass = [reg for reg in analysis.regions
               if reg.row0 <= row < reg.row0 + reg.height
               and reg.col0 <= col < reg.col0 + reg.width]
    found = near > 0.5 and near > float(elsewhere.max()) + 0.1 and len(on_mass) >= 3
    assert found == whole_breast, (near, float(elsewhere.max()), len(on_mass))
    if whole_breast:
        assert analysis.transform.input_shape[1] >= volume.shape[2] - 64
        assert analysis.transform.input_shape[1] % 64 == 0
        assert sum(reg.attention for reg in on_mass) > 0.4


def test_whole_breast_window_covers_the_crop_at_the_stride() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((3, 1000, 700), np.float32)
    image[:, 100:900, 100:700] = 100 + rng.normal(0, 5, (3, 800, 600))  # chest wall right
    small, t_small = preprocess(image, "dbt", "R", input_size=(448, 320))
    whole, t_whole = preprocess(image, "dbt", "R", input_size=(448, 320), whole_breast=True)
    assert small.shape == (3, 448, 320)
    assert whole.shape == (3, 832, 640)  # 800 x 600 rounded up to multiples of 64
    assert t_whole.flipped and t_whole.input_shape == (832, 640)
    assert all(t_whole.in_window(r, c) for r in (100, 899) for c in (100, 699))
    assert not t_small.in_window(500, 150)  # far from the chest wall (on the right)
    # Every breast pixel is in the input, unchanged up to the z-score.
    _, mr, mc = t_whole.to_model(0, 500, 150)
    assert whole[1, mr, mc] * t_whole.std + t_whole.mean == pytest.approx(image[1, 500, 150],
                                                                            abs=1e-3)
    # Maps on the model input come back onto the whole breast, nothing outside it.
    back = t_whole.map_to_source(np.ones((3, 13, 10), np.float32))
    assert back[:, 100:900, 100:700].min() == 1.0
    # A breast smaller than the input size keeps the input size.
    tiny = np.zeros((1, 300, 200), np.float32)
    tiny[:, 20:280, :150] = 100
    assert preprocess(tiny, "dbt", "L", input_size=(448, 320), whole_breast=True)[0].shape == (
        1, 448, 320)
