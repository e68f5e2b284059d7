"""Small in-memory data and tiny models for the training tests."""

from __future__ import annotations

import numpy as np
import torch

from gmic.config import GMICConfig

TINY = GMICConfig.s2d(input_size=(128, 96), crop_size=(32, 32), num_crops=2, percent_t=0.1,
                      zeta=0, slice_chunk=0, activation_checkpointing=False, beta=1e-4)


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
