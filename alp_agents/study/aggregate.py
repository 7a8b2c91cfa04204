"""The study's statistics: pure functions on plain numbers, unit-tested against hand values.

Two quantities carry the paper's claims:

* the held-out score of a configuration, over seeds and problems, with a 95% interval from a
  two-level bootstrap: resample the seeds, then within each drawn seed resample its problems.
  It carries both sources of noise (the training run and the finite problem set); with one seed
  it is the ordinary bootstrap over problems;
* the envelope width of the sequence log-ratio, ``P98 - P2`` per step, averaged over the second
  half of the steps (where staleness has had time to act); over seeds, its mean and a bootstrap
  interval over seeds.

Cells of the same seed are paired: they start from the same weights, draw their first batch and
their sampling stream from the same seed, and are scored on the same held-out problems. The
difference of two configurations is therefore also reported paired (``paired_differences``: per
shared seed, per shared problem), which removes the seed-to-seed and problem-to-problem spread
the two unpaired intervals each carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "Interval",
    "hierarchical_bootstrap",
    "mean_over_second_half",
    "envelope_width",
    "paired_differences",
    "seed_interval",
]

DEFAULT_RESAMPLES = 2000


class Interval(tuple):
    """``(mean, low, high)`` of a statistic; NaN where there is no data."""

    __slots__ = ()

    def __new__(cls, mean: float, low: float, high: float) -> Interval:
        return super().__new__(cls, (float(mean), float(low), float(high)))

    @property
    def mean(self) -> float:
        return self[0]

    @property
    def low(self) -> float:
        return self[1]

    @property
    def high(self) -> float:
        return self[2]

    def as_dict(self) -> dict[str, float | None]:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"mean": clean(self.mean), "low": clean(self.low), "high": clean(self.high)}


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan)


def hierarchical_bootstrap(
    scores_per_seed: Sequence[Sequence[float]],
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean and percentile interval of the grand mean of per-problem scores over seeds.

    ``scores_per_seed[s][p]`` is problem ``p``'s score (e.g. avg@k) in the run of seed ``s``.
    Each resample draws the seeds with replacement and, for each drawn seed, its problems with
    replacement; the statistic is the mean over drawn seeds of their problem means.

    >>> hierarchical_bootstrap([[0.0, 1.0]], resamples=4000).low    # one seed: problems only
    0.0
    >>> hierarchical_bootstrap([[0.5, 0.5], [0.5, 0.5]])
    (0.5, 0.5, 0.5)
    """
    groups = [np.asarray(s, dtype=float) for s in scores_per_seed if len(s) > 0]
    if not groups:
        return NAN_INTERVAL
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    n_seeds = len(groups)
    stats = np.empty(resamples)
    for b in range(resamples):
        drawn = rng.integers(0, n_seeds, size=n_seeds)
        stats[b] = np.mean(
            [groups[s][rng.integers(0, len(groups[s]), size=len(groups[s]))].mean() for s in drawn]
        )
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(mean, float(low), float(high))


def paired_differences(
    scores: Mapping[int, Mapping[str, float]], reference: Mapping[int, Mapping[str, float]]
) -> dict[int, list[float]]:
    """Per seed both configurations ran, ``score - reference`` on each problem both scored.

    ``scores[seed][problem]`` is a problem's held-out score in one configuration's run of that
    seed. ``hierarchical_bootstrap(list(result.values()))`` is then the paired two-level
    bootstrap of the mean difference: it resamples seeds and problems once for both runs.

    >>> paired_differences({0: {"a": 1.0, "b": 0.5}, 1: {"a": 0.0}},
    ...                    {0: {"a": 0.5, "b": 0.5, "c": 1.0}, 2: {"a": 1.0}})
    {0: [0.5, 0.0]}
    """
    out = {}
    for seed in sorted(set(scores) & set(reference)):
        problems = sorted(set(scores[seed]) & set(reference[seed]))
        if problems:
            out[seed] = [scores[seed][p] - reference[seed][p] for p in problems]
    return out


def seed_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES
) -> Interval:
    """Mean over seeds and a percentile bootstrap interval over seeds (NaN values dropped;
    with fewer than 2 values the interval is NaN: one run says nothing about its spread).

    >>> seed_interval([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
    >>> seed_interval([2.0]).mean, math.isnan(seed_interval([2.0]).low)
    (2.0, True)
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return NAN_INTERVAL
    if x.size < 2:
        return Interval(float(x.mean()), math.nan, math.nan)
    return hierarchical_bootstrap([[v] for v in x], confidence, resamples)


def mean_over_second_half(values: Sequence[float]) -> float:
    """Mean of the last ``ceil(n / 2)`` finite values of a per-step series (NaN if none).

    >>> mean_over_second_half([10.0, 1.0, 2.0, 3.0])
    2.5
    >>> mean_over_second_half([1.0, 2.0, 3.0])
    2.5
    """
    x = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not x:
        return math.nan
    half = x[len(x) // 2 :]
    return float(sum(half) / len(half))


def envelope_width(envelope: Sequence[Mapping[str, float]]) -> float:
    """``P98 - P2`` of the sequence log-ratio per step, averaged over the second half of steps.

    ``envelope`` is one ``{"step", "p02", "p98"}`` mapping per step, in step order.

    >>> envelope_width([{"p02": -9.0, "p98": 9.0}, {"p02": -1.0, "p98": 1.0},
    ...                 {"p02": -2.0, "p98": 0.0}])
    2.0
    """
    return mean_over_second_half([row["p98"] - row["p02"] for row in envelope])
