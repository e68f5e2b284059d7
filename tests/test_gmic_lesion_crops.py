"""Training the local network alone on crops centred on ground-truth lesions
(gmic.lesion_crops, TrainSettings.lesion_crops, `dicomnode train --lesion-crops`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmic.lesion_crops import NO_DEPTH, Lesion, find_lesions, sample_lesion_crops
from gmic.metrics import roc_auc
from gmic.train import Trainer, TrainError, TrainSettings
from tests.support.training import TINY, tiny_model


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_find_lesions_joins_a_cluster_and_takes_centre_and_median_depth() -> None:
    masks = np.zeros((2, 64, 64), np.float32)
    depths = np.full((2, 64, 64), NO_DEPTH, np.float32)
    masks[0, 10:21, 10:21] = 1  # a benign mass centred on slice 3
    depths[0, 10:21, 10:21] = 3
    for k, (r, c) in enumerate([(40, 40), (43, 46), (47, 41)]):  # malignant specks
        masks[1, r:r + 2, c:c + 2] = 1
        depths[1, r:r + 2, c:c + 2] = (5, 6, 7)[k]
    masks[1, 5, 60] = 1  # a speck far away whose slice the SEG did not say: left out
    got = find_lesions(masks, depths, merge_px=4)
    assert len(got) == 2
    benign, malignant = (got[0], got[1]) if got[0].labels == (1.0, 0.0) else (got[1], got[0])
    assert benign == Lesion(3, 15.0, 15.0, (1.0, 0.0))
    assert malignant.labels == (0.0, 1.0) and malignant.slice == 6
    assert (malignant.row, malignant.col) == pytest.approx((43.833, 42.833), abs=1e-3)
    # without joining, the three specks are three lesions
    assert len(find_lesions(masks, depths, merge_px=0)) == 4


def _coded_volume() -> tuple[torch.Tensor, torch.Tensor, list[Lesion]]:
    """Breast pixels are 10 * slice + 1, lesion pixels 1000 + 10 * slice, outside 0: a crop's
    values tell which slice it came from and whether it holds a lesion."""
    vol = torch.zeros(8, 96, 64)
    for s in range(8):
        vol[s, :, :48] = 10 * s + 1
    masks = torch.zeros(2, 96, 64)
    masks[0, 20:31, 15:26] = 1
    masks[1, 60:71, 20:31] = 1
    for s in range(8):
        vol[s][masks.amax(dim=0) > 0] = 1000 + 10 * s
    return vol, masks, [Lesion(2, 25, 20, (1.0, 0.0)), Lesion(6, 65, 25, (0.0, 1.0))]


def test_lesion_crops_hold_their_lesion_near_its_slice_and_others_none() -> None:
    vol, masks, lesions = _coded_volume()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        crops, targets = sample_lesion_crops(vol, masks, lesions, (16, 16), zeta=1, generator=g)
        assert crops.shape == (4, 1, 16, 16) and targets.shape == (4, 2)
        for crop, target, lesion in zip(crops[:2, 0], targets[:2], lesions, strict=True):
            centre = crop[7:9, 7:9]  # a lesion crop's centre is within a quarter crop
            assert centre.min() >= 1000
            assert abs(int(centre.min() - 1000) // 10 - lesion.slice) <= 1
            assert target.tolist() == list(lesion.labels)
        for crop, target in zip(crops[2:, 0], targets[2:], strict=True):
            assert crop.max() < 1000 and crop.max() > 0  # inside the breast, no lesion
            assert target.tolist() == [0.0, 0.0]


def test_no_breast_and_no_lesion_gives_no_crop() -> None:
    crops, targets = sample_lesion_crops(torch.zeros(2, 32, 32), torch.zeros(2, 32, 32), [],
                                         (16, 16), zeta=1)
    assert crops.shape == (0, 1, 16, 16) and targets.shape == (0, 2)


class LesionVolumes:
    """Noise volumes with one disc each, on a random slice: malignant discs are bright and
    ringed, benign ones dim and plain; items carry masks and depths like CachedVolumes."""

    def __init__(self, count: int, seed: int, depth: int = 3, size=(128, 96)) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size[0], :size[1]]
        self.items = []
        for i in range(count):
            vol = rng.normal(0, 0.3, (depth, *size)).astype(np.float32) + 2.0
            malignant = i % 2
            cy, cx = rng.integers(20, size[0] - 20), rng.integers(20, size[1] - 20)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            disc = r2 < 7 ** 2
            s = int(rng.integers(0, depth))
            vol[s] += (2.0 * disc + 1.5 * ((r2 > 9 ** 2) & (r2 < 11 ** 2))) if malignant \
                else 1.0 * disc
            masks = np.zeros((2, *size), np.float32)
            masks[malignant][disc] = 1
            depths = np.full((2, *size), NO_DEPTH, np.float32)
            depths[malignant][disc] = s
            labels = np.array([1 - malignant, malignant], np.float32)
            self.items.append((vol, labels, masks, depths))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _cfg():
    return TINY.replace(modality="dbt", zeta=0)


def test_lesion_crop_training_teaches_the_local_network_only(tmp_path: Path) -> None:
    """Global weights untouched; on held-out discs the crop classifier tells malignant from
    benign ones."""
    model = tiny_model(0, _cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=3, learning_rate=1e-3, batch_size=8, seed=1,
                             progress=False, lesion_crops=True)
    train, held_out = LesionVolumes(32, seed=1), LesionVolumes(16, seed=2)
    result = Trainer(model, train, LesionVolumes(8, seed=3), settings, tmp_path).run()
    assert result.epochs_run == 3
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith(("ds_net.", "left_postprocess_net.")):
            assert torch.equal(value, after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before
               if k.startswith("dn_resnet.") and after[k].dtype.is_floating_point)
    model.eval()
    crops, labels = [], []
    for vol, label, masks, depths in held_out:
        lesion = find_lesions(masks, depths, merge_px=2)[0]
        top, left = int(round(lesion.row)) - 16, int(round(lesion.col)) - 16
        crops.append(torch.from_numpy(vol[lesion.slice, max(0, top):top + 32,
                                          max(0, left):left + 32]).clone())
        labels.append(label)
    crops = [torch.nn.functional.pad(c, (0, 32 - c.shape[1], 0, 32 - c.shape[0])) for c in crops]
    with torch.no_grad():
        _, _, logits = model.local_prediction(torch.stack(crops)[:, None])
    labels = np.stack(labels)
    assert roc_auc(labels[:, 1], logits[:, 1].numpy()) >= 0.9
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_lesion_crop_training_resumes_exactly(tmp_path: Path) -> None:
    settings = dict(epochs=2, learning_rate=1e-3, batch_size=4, seed=2, progress=False,
                    lesion_crops=True)
    train, val = LesionVolumes(8, seed=1), LesionVolumes(4, seed=2)
    full = Trainer(tiny_model(0, _cfg()), train, val, TrainSettings(**settings), tmp_path / "a")
    full.run()
    first = Trainer(tiny_model(0, _cfg()), train, val, TrainSettings(**settings, max_steps=1),
                    tmp_path / "b")
    assert first.run().interrupted
    resumed = Trainer(tiny_model(5, _cfg()), train, val, TrainSettings(**settings),
                      tmp_path / "b")
    resumed.run()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_lesion_crops_refuse_other_supervision_and_items_without_depths(tmp_path) -> None:
    with pytest.raises(TrainError, match="lesion_crops trains the local network alone"):
        TrainSettings(lesion_crops=True, mask_weight=1.0)
    items = [(v, lab) for v, lab, _, _ in LesionVolumes(2, seed=1).items]
    trainer = Trainer(tiny_model(0, _cfg()), items, items,
                      TrainSettings(epochs=1, batch_size=2, progress=False, lesion_crops=True),
                      tmp_path)
    with pytest.raises(TrainError, match="needs items with masks and depths"):
        trainer.run()


def test_archive_items_carry_each_lesion_on_its_slice(tmp_path_factory) -> None:
    """From a synthetic study's SEGs through the training cache to find_lesions: every DBT
    finding is a lesion of its class within a slice of the finding's frame, near its
    centre."""
    from dicomnode.pipeline.images import load_image
    from dicomnode.training.data import CachedVolumes, seg_masks
    from dicomnode.training.runner import load_labelled
    from gmic.preprocess import preprocess
    from tests.support.results import findings, study_root

    root = study_root(tmp_path_factory, "enhanced")
    data = load_labelled(None, root / "labels.csv", "dbt", root)
    masks = seg_masks(data.index.seg_paths)
    size = (448, 320)
    items = CachedVolumes(data.examples, size, tmp_path_factory.mktemp("cache"), masks)
    by_uid = {e.uid: i for i, e in enumerate(data.examples)}
    seen = 0
    for finding in findings(root, "dbt"):
        index = by_uid[finding["sop_instance_uid"]]
        for _ in range(2):  # preprocessed, then from the cache
            _, _, item_masks, depths = items[index]
            assert depths.shape == item_masks.shape == (2, *size)
        lesions = find_lesions(item_masks, depths, merge_px=16)
        image = load_image(root / finding["path"])
        _, tf = preprocess(image.pixels, "dbt", image.laterality, input_size=size)
        frame, row, col = tf.to_model(finding["frame"], finding["row"], finding["col"])
        cls = 1 if finding["malignant"] else 0
        near = [x for x in lesions if x.labels[cls] == 1
                and abs(x.row - row) < 20 and abs(x.col - col) < 20]
        assert near, (finding, lesions)
        assert abs(near[0].slice - frame) <= 1
        seen += 1
    assert seen >= 1
