"""Top-t aggregation and retrieve_roi_from_3d_image on hand-made saliency maps."""

from __future__ import annotations

import pytest
import torch

from gmic.roi import (
    RoiSelection,
    crop_window_on_map,
    extract_crops,
    map_to_image_positions,
    retrieve_roi_from_3d_image,
    top_t_aggregate,
    top_t_count,
)


def test_top_t_count_is_relative_to_one_slice() -> None:
    counts = {top_t_count(33, 21, 1.6, d) for d in (8, 40, 61, 96)}
    assert counts == {round(33 * 21 * 1.6)}


def test_top_t_aggregate_ignores_extra_empty_slices() -> None:
    torch.manual_seed(0)
    lesion = torch.rand(4, 2, 6, 5)
    padded = torch.cat([torch.zeros(3, 2, 6, 5), lesion, torch.zeros(9, 2, 6, 5)])
    assert torch.allclose(top_t_aggregate(lesion, 0.5), top_t_aggregate(padded, 0.5))


def test_top_t_aggregate_is_mean_of_top_values() -> None:
    sal = torch.zeros(2, 2, 2, 2)
    sal[0, 1] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    sal[1, 1, 0, 0] = 0.25
    # t = round(2 * 2 * 0.75) = 3 -> (1 + 0.5 + 0.25) / 3 for the second class.
    out = top_t_aggregate(sal, 0.75)
    assert out.tolist() == pytest.approx([0.0, 1.75 / 3])


def _two_lesion_map() -> torch.Tensor:
    sal = torch.zeros(30, 2, 12, 10)
    sal[5, 1, 2:4, 2:4] = 1.0  # strongest: malignant and benign at slice 5
    sal[5, 0, 2:4, 2:4] = 0.3
    sal[7, 1, 2:4, 2:4] = 0.9  # same place two slices away: must be suppressed
    sal[20, 0, 6:8, 5:7] = 0.6  # benign elsewhere
    sal[20, 1, 6:8, 5:7] = 0.05
    return sal


def test_roi_picks_the_right_windows_and_suppresses_neighbours() -> None:
    sel = retrieve_roi_from_3d_image(_two_lesion_map(), num_crops=2, window=(2, 2), zeta=3)
    picks = list(zip(sel.source_slices.tolist(), sel.rows.tolist(), sel.cols.tolist(), strict=True))
    assert picks == [(5, 2, 2), (20, 6, 5)]
    assert sel.slices.tolist() == [5, 20]  # eval: no sampling


def test_roi_with_zeta_zero_takes_the_neighbour_slice_too() -> None:
    # Classes are min-max normalised separately: slice 20 scores 1 + 0.05, slice 7 0.9.
    sel = retrieve_roi_from_3d_image(_two_lesion_map(), num_crops=3, window=(2, 2), zeta=0)
    assert sel.source_slices.tolist() == [5, 20, 7]


def test_roi_never_repeats_a_place_within_zeta() -> None:
    torch.manual_seed(1)
    sal = torch.rand(30, 2, 12, 10)
    zeta = 4
    sel = retrieve_roi_from_3d_image(sal, num_crops=40, window=(3, 3), zeta=zeta)
    picks = list(zip(sel.source_slices.tolist(), sel.rows.tolist(), sel.cols.tolist(), strict=True))
    for i, (s1, r1, c1) in enumerate(picks):
        for s2, r2, c2 in picks[i + 1:]:
            assert not ((r1, c1) == (r2, c2) and abs(s1 - s2) <= zeta)


def test_training_slice_sampling_stays_within_zeta() -> None:
    sal = _two_lesion_map()
    gen = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(200):
        sel = retrieve_roi_from_3d_image(sal, 2, (2, 2), zeta=3, sample_slices=True,
                                         generator=gen)
        assert sel.source_slices.tolist() == [5, 20]
        diff = (sel.slices - sel.source_slices).abs()
        assert int(diff.max()) <= 3
        assert int(sel.slices.min()) >= 0 and int(sel.slices.max()) < 30
        offsets.update((sel.slices - sel.source_slices).tolist())
    assert offsets == set(range(-3, 4))  # uniform over the whole +/-zeta range


def test_training_sampling_is_clipped_to_the_volume() -> None:
    sal = torch.zeros(4, 2, 6, 6)
    sal[0, 1, 0:2, 0:2] = 1
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(100):
        sel = retrieve_roi_from_3d_image(sal, 1, (2, 2), zeta=10, sample_slices=True,
                                         generator=gen)
        seen.add(int(sel.slices[0]))
    assert seen == {0, 1, 2, 3}


def test_window_and_positions_map_proportionally() -> None:
    assert crop_window_on_map((256, 256), (2116, 1339), (33, 21)) == (4, 4)
    sel = RoiSelection(torch.tensor([3, 1]), torch.tensor([3, 1]), torch.tensor([0, 29]),
                       torch.tensor([10, 17]), (4, 4))
    pos = map_to_image_positions(sel, (2116, 1339), (33, 21), (256, 256))
    assert pos[0].tolist() == [3, 0, round(10 * 1339 / 21)]
    # Row 29 -> 1860 would run past the bottom: clipped so the crop fits.
    assert pos[1].tolist() == [1, 2116 - 256, 1339 - 256]


def test_crops_outside_the_image_are_padded_with_the_slice_minimum() -> None:
    vol = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6) + 7
    crops = extract_crops(vol, torch.tensor([[1, 2, 3], [0, 0, 0]]), (4, 4))
    assert crops.shape == (2, 1, 4, 4)
    assert torch.equal(crops[0, 0, :3, :3], vol[1, 2:5, 3:6])
    assert torch.all(crops[0, 0, 3:, :] == vol[1].min())
    assert torch.all(crops[0, 0, :, 3:] == vol[1].min())
    assert torch.equal(crops[1, 0], vol[0, :4, :4])


def test_top_t_on_a_larger_input_pools_as_many_voxels_as_trained() -> None:
    """A lesion read inside the whole breast of a larger image scores as it did in the
    trained input size: area_scale keeps t at the trained count."""
    trained = torch.zeros(4, 2, 7, 5)
    trained[1, :, 2:4, 1:3] = 0.9
    larger = torch.zeros(4, 2, 14, 15)
    larger[1, :, 2:4, 1:3] = 0.9
    scale = (7 * 5) / (14 * 15)
    assert torch.allclose(top_t_aggregate(larger, 0.5, scale), top_t_aggregate(trained, 0.5))
    assert (top_t_aggregate(larger, 0.5) < top_t_aggregate(trained, 0.5)).all()
