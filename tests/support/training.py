"""Small in-memory data and tiny models for the model and training tests: noise volumes with
a learnable disc, and a synthetic breast array for the preprocessing and mask tests."""

from __future__ import annotations

import numpy as np
import torch

from gmic.model_config import GMICConfig

TINY = GMICConfig.s2d(input_size=(128, 96), crop_size=(32, 32), num_crops=2, percent_t=0.1,
                      zeta=0, slice_chunk=0, activation_checkpointing=False, beta=1e-4)

# `dicomnode train` options for a model small enough to train an epoch of the small synthetic
# s2d studies on CPU in seconds (seed 183 gives malignant and normal studies).
TINY_ARGS = ["--input-size", "448x320", "--crop-size", "64x64", "--num-crops", "1",
             "--batch-size", "2", "--augment-px", "8", "--split", "0.5,0.5,0",
             "--no-progress", "--device", "cpu"]


class DiscVolumes:
    """Noise volumes; malignant ones carry a bright disc (a learnable, cheap signal)."""

    def __init__(self, count: int, seed: int, depth: int = 1,
                 size: tuple[int, int] = (128, 96)) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size[0], :size[1]]
        self.items = []
        for i in range(count):
            vol = rng.normal(0, 0.3, (depth, *size)).astype(np.float32)
            malignant = i % 2
            if malignant:
                cy, cx = rng.integers(20, size[0] - 20), rng.integers(20, size[1] - 20)
                vol[i % depth] += 3.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 8 ** 2)
            self.items.append((vol, np.array([0, malignant], dtype=np.float32)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[index]


def tiny_model(seed: int = 0, cfg: GMICConfig = TINY):
    from gmic.model import GMIC

    torch.manual_seed(seed)
    return GMIC(cfg)


def breast(depth: int, rows: int, cols: int, side: str = "L", *, height: float = 0.6,
           reach: float = 0.5, seed: int = 0, label: bool = True) -> np.ndarray:
    """(D, H, W) float32: a half-ellipse breast (fat ~300, dense texture ~900) on the
    chest-wall edge (left for L), rows centred at 45%, a bright label in a far corner."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:rows, 0:cols]
    centre = rows * 0.45
    inside = ((rr - centre) / (rows * height / 2)) ** 2 + (cc / (cols * reach)) ** 2 <= 1
    vol = np.zeros((depth, rows, cols), dtype=np.float32)
    for d in range(depth):
        tissue = 300 + 600 * (rng.random((rows, cols)) > 0.7) + rng.normal(0, 20, (rows, cols))
        vol[d] = np.where(inside, tissue, rng.normal(5, 2, (rows, cols)))
    if label:
        vol[:, rows - 12:rows - 4, cols - 20:cols - 4] = 4000
    if side == "R":
        vol = vol[:, :, ::-1].copy()
    return vol
