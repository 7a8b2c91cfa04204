"""alp_agents.reporting.runlog: run directories with config snapshot, JSONL metrics and TensorBoard."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from alp_agents.configs.loader import load_config
from alp_agents.reporting import runlog as runlog_module
from alp_agents.reporting.runlog import RunLogger, make_run_dir, read_metrics


@dataclass
class Section:
    lr: float = 1e-6


@dataclass
class RunConfig:
    steps: int = 3
    section: Section = field(default_factory=Section)


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def test_run_directory_has_config_metrics_and_tensorboard(tmp_path):
    cfg = RunConfig(steps=5, section=Section(lr=2e-6))
    with RunLogger(tmp_path / "run", config=cfg) as run:
        for step in range(3):
            record = run.log(
                step,
                {
                    "reward": torch.tensor(0.5 * step),
                    "ratio": {"p50": np.float32(1.0), "p99": 1.5},
                    "tokens": np.int64(100 + step),
                    "loss": float("nan") if step == 1 else 0.1,
                    "kl": float("inf") if step == 2 else 0.0,
                    "sigma": [0.1, 0.2, 0.3],
                    "preset": "alp",
                },
            )
        run.log_text(0, "sample", "hello")
    assert record["ratio/p50"] == 1.0 and record["step"] == 2
    run_dir = tmp_path / "run"
    assert load_config(RunConfig, run_dir / "config.yaml") == cfg
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["sessions"][0]["argv"] == sys.argv

    raw_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(raw_lines) == 3
    for line in raw_lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert math.isnan(records[1]["loss"]) and records[2]["kl"] == math.inf
    assert records[2]["tokens"] == 102 and records[0]["sigma"] == [0.1, 0.2, 0.3]
    assert records[0]["preset"] == "alp"

    tb = run_dir / "tensorboard"
    assert _scalars(tb, "reward") == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert [s for s, _ in _scalars(tb, "ratio/p99")] == [0, 1, 2]
    assert math.isnan(_scalars(tb, "loss")[1][1])


def test_metrics_survive_a_crash(tmp_path):
    """Lines logged before the process dies are on disk (flushed per line)."""
    script = textwrap.dedent(
        f"""
        import os
        from alp_agents.reporting.runlog import RunLogger
        run = RunLogger({str(tmp_path)!r}, tensorboard=False)
        run.log(0, {{"reward": 1.0}})
        run.log(1, {{"reward": 0.0}})
        os._exit(3)  # no close(), no atexit, no buffer flush
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert [r["reward"] for r in read_metrics(tmp_path)] == [1.0, 0.0]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    with RunLogger(tmp_path) as run:
        for step in range(5):
            run.log(step, {"x": float(step)})
    with RunLogger(tmp_path, resume_step=2) as run:
        run.log(3, {"x": 30.0})
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    assert len(json.loads((tmp_path / "meta.json").read_text())["sessions"]) == 2


def test_truncated_last_line_is_skipped_but_other_bad_lines_are_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x"')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl:2: dropped an incomplete last line"):
        assert read_metrics(path) == [{"step": 0, "x": 1}]
    path.write_text('{"step": 0, "x": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_unloggable_values_are_rejected_with_their_type(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as run, pytest.raises(TypeError, match="object"):
        run.log(0, {"bad": object()})


def test_make_run_dir_never_reuses_a_folder(tmp_path):
    first = make_run_dir(tmp_path, "alp")
    second = make_run_dir(tmp_path, "alp")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("-alp") and first.parent == tmp_path


def test_module_doctests_hold():
    result = doctest.testmod(runlog_module)
    assert result.attempted >= 3 and result.failed == 0
