"""Random hyperparameter search of paper V-D.6, with the DBT ranges scaled as the paper did."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Lesions in DBT cover 10.97x more pixels than in 2D: t is scaled up and beta down by it.
DBT_SCALE = 10.97


@dataclass(frozen=True)
class Trial:
    """One draw: the learning rate and the GMICConfig fields the search varies."""

    learning_rate: float
    saliency_init_log10_w: float
    percent_t: float
    num_crops: int
    beta: float

    def config_changes(self) -> dict[str, float | int]:
        return {"saliency_init_log10_w": self.saliency_init_log10_w,
                "percent_t": self.percent_t, "num_crops": self.num_crops, "beta": self.beta}


def sample_trial(modality: str, rng: random.Random) -> Trial:
    """log10(lr) ~ U(-5.5, -4.5), log10(w) ~ U(-3, -2) for all models; 2D: t ~ U(1%, 25%),
    K in {4, 6, 8}, log10(beta) ~ U(-5.5, -3.5); DBT: t x 10.97, beta / 10.97, K doubled."""
    lr = 10 ** rng.uniform(-5.5, -4.5)
    log10_w = rng.uniform(-3.0, -2.0)
    if modality == "dbt":
        t = rng.uniform(0.01 * DBT_SCALE, 0.25 * DBT_SCALE)
        k = rng.choice((8, 12, 16))
        shift = math.log10(DBT_SCALE)
        beta = 10 ** rng.uniform(-5.5 - shift, -3.5 - shift)
    else:
        t = rng.uniform(0.01, 0.25)
        k = rng.choice((4, 6, 8))
        beta = 10 ** rng.uniform(-5.5, -3.5)
    return Trial(lr, log10_w, t, k, beta)


__all__ = ["DBT_SCALE", "Trial", "sample_trial"]
