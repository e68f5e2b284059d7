"""The random-search ranges of paper V-D.6."""

from __future__ import annotations

import math
import random

from gmic.tune import sample_trial


def test_ranges_2d_and_dbt() -> None:
    rng = random.Random(0)
    for _ in range(200):
        t2 = sample_trial("s2d", rng)
        assert -5.5 <= math.log10(t2.learning_rate) <= -4.5
        assert -3 <= t2.saliency_init_log10_w <= -2
        assert 0.01 <= t2.percent_t <= 0.25 and t2.num_crops in (4, 6, 8)
        assert -5.5 <= math.log10(t2.beta) <= -3.5
        t3 = sample_trial("dbt", rng)
        assert 0.1097 <= t3.percent_t <= 2.7425 and t3.num_crops in (8, 12, 16)
        assert -6.541 <= math.log10(t3.beta) <= -4.539
