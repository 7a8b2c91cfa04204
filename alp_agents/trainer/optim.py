"""Learning-rate schedules of the policy optimiser."""

from __future__ import annotations

import math


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, min_ratio: float):
    """Multiplier of the base LR after ``t`` optimiser steps (picklable-free closure)."""

    def fn(t: int) -> float:
        if warmup_steps > 0 and t < warmup_steps:
            return (t + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (t - warmup_steps) / span))
        if schedule == "linear":
            decay = 1.0 - progress
        else:  # cosine
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return fn
