"""What an evaluation returns (`EvalResult`, `EvalReport`) and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alp_agents.configs.eval import EvalConfig


class EvaluationError(ValueError):
    """A bad evaluation request (unknown env or dataset, model without weights, k > n, ...)."""


@dataclass
class EvalResult:
    """What an evaluation produced.

    Attributes:
        summary: flat ``{name: float}``: ``pass@1..pass@n``, ``avg@n``, ``maj@j`` (j in
            ``report_ks``), ``tool_calls_per_episode``, ``tool_use_rate``, ``tool_error_rate``,
            ``void_turn_rate``, ``void_episode_rate``, ``turns_per_episode``, ``response_tokens_per_episode``,
            ``unverifiable_rate``, ``finish_reason/<reason>``, ``num_problems``,
            ``num_samples``, ``num_unverifiable``. Undefined rates are NaN.
        intervals: ``{name: (low, high)}`` bootstrap intervals of the headline metrics.
        breakdown: ``{"source" | "level": {value: {metric: float}}}`` where the data has them.
        records: one dict per episode (see `sample_record`).
        n, k: samples per problem and the headline k.
        report: the full `eval_metrics.summarize` output (JSON-able).
    """

    summary: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    breakdown: dict[str, dict[str, dict[str, float]]]
    records: list[dict[str, Any]]
    n: int
    k: int
    report: dict[str, Any]


@dataclass
class EvalReport(EvalResult):
    """An `EvalResult` plus where it was written and how long it took."""

    config: EvalConfig = field(default_factory=EvalConfig)
    run_dir: Path = Path(".")
    files: dict[str, Path] = field(default_factory=dict)
    elapsed_s: float = 0.0
    resumed_samples: int = 0
