"""Watchers over a run's metrics that tell the user when training has stopped doing anything.

GRPO learns only from groups whose rewards differ: a group where every rollout got the same
reward has advantage 0 everywhere and contributes no gradient. When most groups are like that
for several steps in a row (the task is too hard: all 0; or solved: all 1), the run spends its
compute on nothing, and the loss curve does not show it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LearningSignalMonitor:
    """Counts consecutive steps where at least ``threshold`` of the groups have advantage 0.

    `observe` returns a warning once per flat stretch, on its ``patience``-th step; a step with
    signal ends the stretch (and re-arms the warning).

    >>> m = LearningSignalMonitor(threshold=0.9, patience=2)
    >>> [m.observe(r) is not None for r in (1.0, 1.0, 1.0, 0.5, 0.95, 0.95)]
    [False, True, False, False, False, True]
    >>> m.flat_steps
    2
    """

    threshold: float = 0.9
    patience: int = 3
    flat_steps: int = 0

    def observe(self, zero_groups_ratio: float) -> str | None:
        if zero_groups_ratio < self.threshold:
            self.flat_steps = 0
            return None
        self.flat_steps += 1
        if self.flat_steps != self.patience:
            return None
        return (
            f"no learning signal: in each of the last {self.flat_steps} steps at least "
            f"{self.threshold:.0%} of the groups had equal rewards (advantage 0 everywhere, no "
            "gradient). The task may be too hard (all 0) or solved (all 1): change the data, "
            "rollout.group_size or the reward, or stop here."
        )
