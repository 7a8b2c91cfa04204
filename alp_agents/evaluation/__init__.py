"""Evaluation: held-out problems, k samples each, pass@k / maj@k / avg@k with confidence intervals.

``runner`` (`evaluate`, `evaluate_with_engine`, `run_evaluation`: `train/evaluate.py`),
``records`` (one ``samples.jsonl`` line per episode, built from its trajectory), ``rundir``
(the run folder, resume fingerprint, checkpoint resolution), ``reports`` (report.json,
report.md, pass_at_k.png), ``metrics`` (the pure estimators: pass@k, majority vote, bootstrap
CIs), ``results`` (`EvalResult`, `EvalReport`). The schema, `EvalConfig`, lives in
`alp_agents.configs.eval` with the sampling fields it shares with the trainer.
"""

from alp_agents.configs.eval import EvalConfig, EvalEnvConfig, EvalSampling
from alp_agents.evaluation.records import load_records, sample_grade, sample_record
from alp_agents.evaluation.reports import markdown_report, plot_pass_at_k, write_reports
from alp_agents.evaluation.results import EvalReport, EvalResult, EvaluationError
from alp_agents.evaluation.rundir import default_run_dir, resolve_checkpoint
from alp_agents.evaluation.runner import evaluate, evaluate_with_engine, run_evaluation

__all__ = [
    "EvalConfig",
    "EvalEnvConfig",
    "EvalReport",
    "EvalResult",
    "EvalSampling",
    "EvaluationError",
    "default_run_dir",
    "evaluate",
    "evaluate_with_engine",
    "load_records",
    "markdown_report",
    "plot_pass_at_k",
    "resolve_checkpoint",
    "run_evaluation",
    "sample_grade",
    "sample_record",
    "write_reports",
]
