"""Training on the breast as the node reads it: whole, at any size (`train --whole-breast`),
with the ground-truth masks on that same input."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.pipeline.images import load_image
from dicomnode.training.data import CachedVolumes, seg_masks
from dicomnode.training.runner import load_labelled
from gmic.classes import BENIGN, MALIGNANT
from gmic.preprocess import preprocess
from tests.support.results import findings, study_root

# smaller than the small phantoms' breasts (42-48 x 29-33 mm at 0.1 mm): a window cuts them
WINDOW = (256, 192)


def test_whole_breast_items_are_the_nodes_input_with_their_masks(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    root = study_root(tmp_path_factory, "enhanced")
    data = load_labelled(None, root / "labels.csv", "dbt", root)
    masks = seg_masks(data.index.seg_paths)
    cache = tmp_path_factory.mktemp("cache")
    whole = CachedVolumes(data.examples, WINDOW, cache, masks, whole_breast=True)
    windowed = CachedVolumes(data.examples, WINDOW, cache, masks)
    by_uid = {e.uid: i for i, e in enumerate(data.examples)}
    checked = 0
    for finding in findings(root, "dbt"):
        index = by_uid[finding["sop_instance_uid"]]
        image = load_image(root / finding["path"])
        node_input, tf = preprocess(image.pixels, "dbt", image.laterality, input_size=WINDOW,
                                    whole_breast=True)
        assert node_input.shape[1] > WINDOW[0] and node_input.shape[2] > WINDOW[1]
        for _ in range(2):  # preprocessed, then from the cache
            volume, _, item_masks, depths = whole[index]
            np.testing.assert_array_equal(volume, node_input.astype(np.float16).astype(np.float32))
            assert item_masks.shape == depths.shape == (2, *node_input.shape[1:])
        # the windowed items are cached apart and keep the fixed size
        assert windowed[index][0].shape[1:] == WINDOW
        frame, row, col = tf.to_model(finding["frame"], finding["row"], finding["col"])
        cls = MALIGNANT if finding["malignant"] else BENIGN
        assert item_masks[cls, int(round(row)), int(round(col))] == 1
        checked += 1
    assert checked
    assert len(list((cache / "dbt").glob("*.npy"))) == 2 * 3 * len(
        {by_uid[f["sop_instance_uid"]] for f in findings(root, "dbt")})
