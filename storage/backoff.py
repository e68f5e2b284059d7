"""Delivery retry delays: exponential, capped, with jitter so that many deliveries that failed
together (a destination went down) do not all retry in the same second."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, initial_s: float, max_s: float,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    The base doubles per attempt up to ``max_s``; the delay is drawn uniformly from
    [base/2, base] ("equal jitter"), so it never exceeds the cap and never collapses to 0.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    base = min(max_s, initial_s * 2.0 ** min(attempt - 1, 62))
    return base / 2 + (rng or random).uniform(0.0, base / 2)
