"""Evaluation: held-out problems, k samples each, pass@k / maj@k / avg@k with confidence intervals.

``runner`` (`evaluate`, `evaluate_with_engine`, `run_evaluation`: `train/evaluate.py`),
``metrics`` (the pure estimators: pass@k, majority vote, bootstrap CIs).
"""

from alp_agents.evaluation.runner import (
    EvalConfig,
    EvalReport,
    EvalResult,
    EvaluationError,
    evaluate,
    evaluate_with_engine,
    load_records,
    markdown_report,
    plot_pass_at_k,
    resolve_checkpoint,
    run_evaluation,
    write_reports,
)

__all__ = [
    "EvalConfig",
    "EvalReport",
    "EvalResult",
    "EvaluationError",
    "evaluate",
    "evaluate_with_engine",
    "load_records",
    "markdown_report",
    "plot_pass_at_k",
    "resolve_checkpoint",
    "run_evaluation",
    "write_reports",
]
