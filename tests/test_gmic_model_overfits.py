"""A tiny 3D-GMIC overfits a handful of synthetic volumes in seconds on CPU."""

from __future__ import annotations

import torch

from gmic.loss import gmic_loss
from gmic.model import GMIC
from gmic.model_config import GMICConfig

CFG = GMICConfig.dbt(input_size=(256, 192), crop_size=(64, 64), num_crops=2, percent_t=0.5,
                     zeta=1, slice_chunk=0, activation_checkpointing=False, beta=1e-4)


def _volumes(gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Noise volumes; the malignant ones carry a bright disc on one slice."""
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(192.0), indexing="ij")
    volumes, targets = [], []
    for i in range(6):
        vol = torch.randn(3, 256, 192, generator=gen) * 0.3
        malignant = i % 2 == 1
        if malignant:
            cy, cx = 60 + 30 * i, 50 + 15 * i
            vol[i % 3] += 3.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2).float()
        volumes.append(vol)
        targets.append(torch.tensor([0.0, float(malignant)]))
    return volumes, targets


def test_tiny_model_overfits() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    volumes, targets = _volumes(gen)
    model = GMIC(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _epoch in range(8):
        model.train()
        total = 0.0
        for vol, target in zip(volumes, targets, strict=True):
            loss = gmic_loss(model(vol, generator=gen), target, CFG.beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(volumes))
    model.eval()
    with torch.no_grad():
        scores = [float(model(v).y[1]) for v in volumes]
    pos = [s for s, t in zip(scores, targets, strict=True) if t[1] == 1]
    neg = [s for s, t in zip(scores, targets, strict=True) if t[1] == 0]
    assert losses[-1] < 0.6 * losses[0], losses
    assert min(pos) > max(neg), (pos, neg)
