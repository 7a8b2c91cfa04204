"""Reports of an evaluation: ``report.json``, ``report.md`` and ``pass_at_k.png``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from alp_agents.configs.eval import EvalConfig
from alp_agents.evaluation.results import EvalResult
from alp_agents.evaluation.rundir import (
    CONFIG_FILE,
    PASS_AT_K_PNG,
    REPORT_JSON,
    REPORT_MD,
    SAMPLES_FILE,
    config_dict,
)


def write_reports(
    run_dir: str | os.PathLike[str],
    result: EvalResult,
    cfg: EvalConfig,
    elapsed_s: float | None = None,
    resumed_samples: int = 0,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``pass_at_k.png``; return every file's path."""
    run_dir = Path(run_dir)
    report = {
        "config": config_dict(cfg),
        **result.report,
        "elapsed_s": elapsed_s,
        "resumed_samples": resumed_samples,
    }
    json_path = run_dir / REPORT_JSON
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    md_path = run_dir / REPORT_MD
    md_path.write_text(markdown_report(result, cfg, elapsed_s))
    png_path = run_dir / PASS_AT_K_PNG
    split = f" ({cfg.split})" if cfg.split else ""
    title = f"{Path(cfg.model).name or cfg.model} on {cfg.dataset}{split}, n={result.n}"
    plot_pass_at_k(result, png_path, title=title)
    return {
        "samples": run_dir / SAMPLES_FILE,
        "config": run_dir / CONFIG_FILE,
        "report_json": json_path,
        "report_md": md_path,
        "pass_at_k_png": png_path,
    }


def _json_safe(value: Any) -> Any:
    """NaN / inf become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def markdown_report(result: EvalResult, cfg: EvalConfig, elapsed_s: float | None = None) -> str:
    """The report as markdown tables (scores in percent, intervals from the bootstrap)."""
    m, report = result.summary, result.report
    ks = report["report_ks"]
    level = int(round(100 * report["confidence"]))
    lines = [
        f"# Evaluation: {cfg.model} on {cfg.dataset}" + (f" ({cfg.split})" if cfg.split else ""),
        "",
        f"- environment `{cfg.env.id}`, {int(m['num_problems'])} problems x n={result.n} samples "
        f"= {int(m['num_samples'])} episodes",
        f"- sampling: temperature {cfg.temperature}, top_p {cfg.top_p}, {cfg.max_tokens_per_turn} tokens "
        f"per turn, max_turns {cfg.max_turns if cfg.max_turns is not None else 'env default'}, "
        f"seed {cfg.seed}",
        f"- unverifiable samples (not counted as wrong): {int(m['num_unverifiable'])}",
    ]
    if elapsed_s is not None:
        lines.append(f"- wall time: {elapsed_s:.1f} s")
    lines += [
        "",
        f"| metric | score (%) | {level}% CI | problems scored |",
        "|---|---|---|---|",
    ]
    for name in [f"pass@{j}" for j in ks] + [f"avg@{result.n}"] + [f"maj@{j}" for j in ks]:
        lo, hi = result.intervals.get(name, (math.nan, math.nan))
        lines.append(
            f"| {name} | {_fmt(m[name])} | [{_fmt(lo)}, {_fmt(hi)}] | "
            f"{report['scored_problems'][name]} |"
        )
    lines += ["", "## Episodes", "", "| statistic | value |", "|---|---|"]
    for name in (
        "turns_per_episode",
        "tool_calls_per_episode",
        "response_tokens_per_episode",
    ):
        lines.append(f"| {name} | {_fmt(m.get(name), percent=False)} |")
    for name in (
        "tool_use_rate",
        "tool_error_rate",
        "void_turn_rate",
        "void_episode_rate",
        "unverifiable_rate",
    ):
        lines.append(f"| {name} (%) | {_fmt(m.get(name))} |")
    rewards = [key for key in m if key.startswith("reward/")]
    if rewards:
        lines += ["", "## Rewards (rubric)", "", "| reward | mean |", "|---|---|"]
        lines += [f"| {key.split('/', 1)[1]} | {m[key]:.3f} |" for key in rewards]
    reasons = sorted(key for key in m if key.startswith("finish_reason/"))
    if reasons:
        lines += ["", "## Finish reasons", "", "| reason | episodes (%) |", "|---|---|"]
        lines += [f"| {key.split('/', 1)[1]} | {_fmt(m[key])} |" for key in reasons]
    for field_name, table in result.breakdown.items():
        columns = [f"pass@{j}" for j in ks] + [f"avg@{result.n}", f"maj@{ks[-1]}"]
        lines += [
            "",
            f"## By {field_name}",
            "",
            f"| {field_name} | problems | " + " | ".join(columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        for value, row in table.items():
            cells = " | ".join(_fmt(row.get(c)) for c in columns)
            lines.append(f"| {value} | {int(row['num_problems'])} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_pass_at_k(result: EvalResult, path: str | os.PathLike[str], title: str = "") -> Path:
    """PNG of unbiased pass@k against k (log2 axis) with bootstrap bands where computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, result.n + 1))
    ys = [100 * result.summary[f"pass@{j}"] for j in ks]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ks, ys, marker="o", label="pass@k (unbiased)")
    band = [(j, result.intervals.get(f"pass@{j}")) for j in ks]
    band = [
        (j, lo, hi) for j, iv in band if iv is not None for lo, hi in [iv] if not math.isnan(lo)
    ]
    if band:
        ax.fill_between(
            [b[0] for b in band],
            [100 * b[1] for b in band],
            [100 * b[2] for b in band],
            alpha=0.2,
            label=f"{int(round(100 * result.report['confidence']))}% bootstrap CI",
        )
    maj = [(j, result.summary.get(f"maj@{j}")) for j in ks]
    maj = [(j, v) for j, v in maj if v is not None and not math.isnan(v)]
    if maj:
        ax.plot([j for j, _ in maj], [100 * v for _, v in maj], marker="s", ls="--", label="maj@k")
    if result.n > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks if result.n <= 16 else result.report["report_ks"])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "pass@k", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
