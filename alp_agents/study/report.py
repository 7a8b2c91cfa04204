"""Aggregate a study directory into ``study.json``, ``study.md`` and figures.

Reads what every cell's run wrote (``metrics.jsonl``, ``heldout.jsonl``, the runner's
``cell.json``) and nothing else, so a report can be rebuilt at any time, also from a study that
is still running (unfinished cells are listed as such and left out of the statistics).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alp_agents.common import read_jsonl
from alp_agents.reporting.runlog import METRICS_FILE, read_metrics
from alp_agents.study.aggregate import (
    NAN_INTERVAL,
    Interval,
    envelope_width,
    hierarchical_bootstrap,
    mean_over_second_half,
    paired_differences,
    seed_interval,
)
from alp_agents.trainer.checkpoint import CONFIG_FILE

__all__ = ["cell_summary", "build_report", "write_report"]

CELLS_DIR = "cells"
CELL_FILE = "cell.json"
HELDOUT_FILE = "heldout.jsonl"
HELDOUT_LABEL = "after"
# The configuration every other one is compared with, paired by seed, when the study has it.
DEFAULT_REFERENCE = "alp"

# (column, metrics.jsonl key, how to reduce the per-step series)
SERIES_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("train_reward", "reward/mean", "second_half"),
    ("ratio_q99", "ratio/q99", "second_half"),
    ("ratio_max", "ratio/max", "second_half"),
    ("mismatch_k3", "mismatch/k3", "all"),
    ("clip_total", "clip/total", "second_half"),
    ("ess", "correction/ess", "second_half"),
    ("sigma", "sigma/mean", "last"),
    ("noise_logprob_change", "perturbation/logprob_change", "all"),
    ("grad_norm", "update/grad_norm", "second_half"),
)


def _reduce(values: list[float], how: str) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan
    if how == "last":
        return finite[-1]
    if how == "all":
        return sum(finite) / len(finite)
    return mean_over_second_half(finite)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """A cell's rows; a missing file is empty and a last line cut by a crash is dropped quietly
    (the runner reruns that cell anyway). A bad line elsewhere is corruption and raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return read_jsonl(path, missing_ok=True)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    if not (run_dir / METRICS_FILE).exists():
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return read_metrics(run_dir)


def heldout_scores(run_dir: Path) -> dict[str, float]:
    """Per held-out problem: its mean reward over samples in the final evaluation."""
    rows = [r for r in _jsonl(run_dir / HELDOUT_FILE) if r.get("label") == HELDOUT_LABEL]
    latest: dict[tuple[str, int], float] = {}
    for r in rows:  # a resumed run may have evaluated twice: the last one counts
        latest[(str(r["problem_id"]), int(r["sample_index"]))] = float(r["reward"])
    per_problem: dict[str, list[float]] = defaultdict(list)
    for (pid, _), reward in latest.items():
        per_problem[pid].append(reward)
    return {pid: sum(v) / len(v) for pid, v in per_problem.items()}


def cell_summary(cell_dir: Path) -> dict[str, Any]:
    """One cell's row of ``study.json`` (status, grid coordinates, headline numbers, envelope)."""
    meta = json.loads((cell_dir / CELL_FILE).read_text()) if (cell_dir / CELL_FILE).exists() else {}
    out: dict[str, Any] = {
        "id": cell_dir.name,
        "status": meta.get("status", "unfinished"),
        **{k: meta.get(k) for k in ("preset", "seed", "variant", "sweep", "group", "seconds")},
    }
    # Through the run log's own reader: it restores the "nan"/"inf" strings a step with no
    # kept token (e.g. every sequence rejected) logs; a plain JSON read left them as strings.
    rows = [r for r in _metrics(cell_dir) if "reward/mean" in r]
    rows.sort(key=lambda r: r["step"])
    out["steps"] = len(rows)
    out["envelope"] = [
        {"step": r["step"], "p02": r.get("seq_log_ratio/q02"), "p98": r.get("seq_log_ratio/q98")}
        for r in rows
        if r.get("seq_log_ratio/q02") is not None
    ]
    out["envelope_engine"] = [
        {
            "step": r["step"],
            "p02": r.get("seq_log_ratio_engine/q02"),
            "p98": r.get("seq_log_ratio_engine/q98"),
        }
        for r in rows
        if r.get("seq_log_ratio_engine/q02") is not None
    ]
    out["envelope_width"] = envelope_width(out["envelope"]) if out["envelope"] else math.nan
    out["envelope_engine_width"] = (
        envelope_width(out["envelope_engine"]) if out["envelope_engine"] else math.nan
    )
    for column, key, how in SERIES_COLUMNS:
        out[column] = _reduce([r.get(key, math.nan) for r in rows], how)
    scores = heldout_scores(cell_dir)
    out["heldout_per_problem"] = scores
    out["heldout"] = sum(scores.values()) / len(scores) if scores else math.nan
    return out


def _group_key(cell: dict[str, Any]) -> str:
    return cell.get("group") or cell["id"].rsplit("-s", 1)[0]


def summarise_groups(cells: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration (cells that differ only in seed): means and intervals over seeds."""
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        if cell["status"] in ("done", "diverged"):
            by_group[_group_key(cell)].append(cell)
    out = {}
    for group, members in by_group.items():
        done = [c for c in members if c["status"] == "done"]
        first = members[0]
        problems = sorted({p for c in done for p in c["heldout_per_problem"]})
        heldout = (
            hierarchical_bootstrap(
                [[c["heldout_per_problem"][p] for p in problems if p in c["heldout_per_problem"]]
                 for c in done]
            )
            if problems
            else NAN_INTERVAL
        )  # fmt: skip
        row: dict[str, Any] = {
            "preset": first.get("preset"),
            "variant": first.get("variant"),
            "sweep": first.get("sweep") or {},
            "base_values": first.get("base_values") or {},
            "seeds": sorted(c["seed"] for c in members),
            "diverged": sum(c["status"] == "diverged" for c in members),
            "heldout": heldout.as_dict(),
            "envelope": seed_interval([c["envelope_width"] for c in done]).as_dict(),
            "envelope_engine": seed_interval([c["envelope_engine_width"] for c in done]).as_dict(),
        }
        for column, _, _ in SERIES_COLUMNS:
            row[column] = seed_interval([c[column] for c in done]).as_dict()
        out[group] = row
    return out


def paired_with(cells: Sequence[dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Per configuration: its held-out score minus ``reference``'s, paired by seed and problem.

    Only finished (``done``) cells of seeds both configurations ran count. ``difference`` is
    the mean difference with the paired two-level bootstrap interval; ``per_seed`` the mean
    difference of each shared seed. Empty when the study has no ``reference`` configuration.
    """
    by_group: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for cell in cells:
        if cell["status"] == "done" and cell["heldout_per_problem"]:
            by_group[_group_key(cell)][cell["seed"]] = cell["heldout_per_problem"]
    if reference not in by_group:
        return {}
    out = {}
    for group, scores in by_group.items():
        if group == reference:
            continue
        diffs = paired_differences(scores, by_group[reference])
        if not diffs:
            continue
        out[group] = {
            "seeds": sorted(diffs),
            "difference": hierarchical_bootstrap(list(diffs.values())).as_dict(),
            "per_seed": {seed: sum(d) / len(d) for seed, d in diffs.items()},
        }
    return out


def config_value(cell_dir: Path, dotted_key: str) -> Any:
    """The value of ``dotted_key`` (``algorithm.mini_batches``) in a cell's resolved
    ``config.yaml``; None when the file or the key is missing."""
    path = cell_dir / CONFIG_FILE
    if not path.exists():
        return None
    return OmegaConf.select(OmegaConf.load(path), dotted_key)


def add_base_values(cells: Sequence[dict[str, Any]], cell_dirs: Sequence[Path]) -> None:
    """Give every cell that did not sweep a key some other cell swept the value it ran with
    (``base_values``), so the base configuration's cells sit on the knob curves: with
    ``--sweep algorithm.mini_batches=1,2,8`` on a base config of 4, the K = 4 point is the
    plain cells, not a rerun of them."""
    swept = sorted({k for cell in cells for k in (cell.get("sweep") or {})})
    for cell, cell_dir in zip(cells, cell_dirs, strict=True):
        missing = [k for k in swept if k not in (cell.get("sweep") or {})]
        cell["base_values"] = {k: config_value(cell_dir, k) for k in missing}


def build_report(study_dir: Path, reference: str | None = None) -> dict[str, Any]:
    """The content of ``study.json`` for ``study_dir``; ``reference`` is the configuration the
    paired differences are taken against (None: ``DEFAULT_REFERENCE``)."""
    study_dir = Path(study_dir)
    reference = reference or DEFAULT_REFERENCE
    spec_path = study_dir / "study_spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    cell_dirs = sorted(p for p in (study_dir / CELLS_DIR).glob("*") if p.is_dir())
    cells = [cell_summary(d) for d in cell_dirs]
    add_base_values(cells, cell_dirs)
    return {
        "spec": spec,
        "cells": cells,
        "summary": summarise_groups(cells),
        "paired": {"reference": reference, "rows": paired_with(cells, reference)},
    }


def _fmt(d: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """``mean [low, high]`` of an interval dict; ``signed`` prints ``+`` on positive values."""
    if not d or d.get("mean") is None:
        return "-"
    spec = f"{'+' if signed else ''}.{digits}f"
    text = format(d["mean"], spec)
    if d.get("low") is not None:
        text += f" [{format(d['low'], spec)}, {format(d['high'], spec)}]"
    return text


def render_markdown(report: dict[str, Any], command: str | None = None) -> str:
    """``study.md``: the summary table (ranked by held-out score), cells, and what is missing."""
    summary = report["summary"]
    lines = ["# Study report", ""]
    if command:
        lines += ["Command:", "```", command, "```", ""]
    spec = report.get("spec", {})
    if spec.get("base_config"):
        lines += [f"Base configuration: `{', '.join(spec['base_config'])}`", ""]
    statuses = defaultdict(int)
    for c in report["cells"]:
        statuses[c["status"]] += 1
    lines += [
        "Cells: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ".",
        "",
        "Held-out: mean reward per problem (avg@k) in the final evaluation, averaged over problems"
        " and seeds, with a 95% two-level bootstrap interval (seeds, then problems). Envelope:"
        " P98 - P2 of the sequence log-ratio of the method's own ratio, mean over the second half"
        " of the steps; `engine env.` the same for the numerator over the engine's mu (comparable"
        " across presets). Other columns: means over seeds of the second-half mean (k3: all"
        " steps; sigma: last step), interval over seeds where there are >= 2.",
        "",
    ]
    header = (
        "| rank | configuration | seeds | held-out | envelope | engine env. | train reward "
        "| ratio q99 | ratio max | k3 (engine) | clip | ESS | sigma | noise dlogp | diverged |"
    )
    lines += [header, "|" + "---|" * 15]
    ranked = sorted(
        summary.items(),
        key=lambda kv: -(kv[1]["heldout"]["mean"] if kv[1]["heldout"]["mean"] is not None else -1),
    )
    for rank, (group, row) in enumerate(ranked, 1):
        lines.append(
            f"| {rank} | `{group}` | {len(row['seeds'])} | {_fmt(row['heldout'])} "
            f"| {_fmt(row['envelope'], 2)} | {_fmt(row['envelope_engine'], 2)} "
            f"| {_fmt(row['train_reward'])} | {_fmt(row['ratio_q99'])} | {_fmt(row['ratio_max'], 2)} "
            f"| {_fmt(row['mismatch_k3'], 4)} | {_fmt(row['clip_total'])} | {_fmt(row['ess'])} "
            f"| {_fmt(row['sigma'], 4)} | {_fmt(row['noise_logprob_change'], 4)} | {row['diverged']} |"
        )
    lines += _paired_section(report.get("paired") or {})
    lines += [
        "",
        "## Cells",
        "",
        "| cell | status | steps | held-out | envelope | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["cells"]:
        minutes = f"{c['seconds'] / 60:.1f}" if c.get("seconds") else "-"
        held = f"{c['heldout']:.3f}" if not math.isnan(c["heldout"]) else "-"
        env = f"{c['envelope_width']:.2f}" if not math.isnan(c["envelope_width"]) else "-"
        lines.append(f"| `{c['id']}` | {c['status']} | {c['steps']} | {held} | {env} | {minutes} |")
    figures = report.get("figures") or []
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _paired_section(paired: dict[str, Any]) -> list[str]:
    rows, reference = paired.get("rows") or {}, paired.get("reference")
    if not rows:
        return []
    lines = [
        "",
        f"## Paired with `{reference}`",
        "",
        f"Held-out score minus `{reference}`'s, on the seeds both ran and the same problems: the"
        " mean difference with a 95% paired two-level bootstrap interval (seeds, then problems,"
        " drawn once for both runs), and the difference at each shared seed. Cells of one seed"
        " share their first batch and sampling stream, so pairing removes the spread between"
        " seeds that the unpaired intervals above carry.",
        "",
        f"| configuration | shared seeds | minus `{reference}` | per seed |",
        "|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda g: -(rows[g]["difference"]["mean"] or 0.0))
    for group in order:
        row = rows[group]
        per_seed = ", ".join(f"s{seed} {d:+.3f}" for seed, d in row["per_seed"].items())
        lines.append(
            f"| `{group}` | {len(row['seeds'])} | {_fmt(row['difference'], signed=True)} "
            f"| {per_seed} |"
        )
    return lines


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    study_dir: Path,
    command: str | None = None,
    figures: bool = True,
    reference: str | None = None,
) -> Path:
    """Write ``study.json``, ``study.md`` and the PNGs into ``study_dir``; returns study.md."""
    from alp_agents.study.figures import plot_study

    study_dir = Path(study_dir)
    report = build_report(study_dir, reference)
    report["figures"] = plot_study(report, study_dir) if figures else []
    (study_dir / "study.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    md = study_dir / "study.md"
    md.write_text(render_markdown(report, command))
    return md


# re-exported for tests and users who want the raw intervals
__all__ += ["Interval", "heldout_scores", "summarise_groups", "render_markdown"]
