"""The study runner end to end on a tiny random model: a 2-cell grid, its report, a rerun that
skips finished cells, and an interrupted cell that resumes exactly from its checkpoint."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alp_agents.study.grid import StudySpec
from alp_agents.study.runner import cell_status, run_study

BASE = """
model: {name: tiny-llama, autocast: none}
env: {id: alp/Math-v0, dataset: arith_small, max_turns: 1}
rollout: {prompts_per_step: 2, group_size: 2, max_tokens: 8}
algorithm: {mini_batches: 2, micro_batch_size: 2}
perturbation: {sigma_init: 0.02, sigma_lr: 0.01}
optim: {lr: 1.0e-3}
steps: 2
eval: {num_problems: 3, k: 2, before: false}
checkpoint: {every: 1, keep_last: 2}
logging: {tensorboard: false, plots: false, trajectory_samples: 1}
study: {presets: [alp, bypass], seeds: [3]}
"""
VOLATILE = ("time", "throughput/")


@pytest.mark.slow
def test_two_cell_grid_reports_skips_finished_cells_and_resumes_exactly(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    out = tmp_path / "study"
    spec = StudySpec(presets=["alp", "bypass"], seeds=[3])
    md = run_study(spec, [base], out, keep_checkpoints=True, command="test")
    report = json.loads((out / "study.json").read_text())
    cells = {c["id"]: c for c in report["cells"]}
    assert set(cells) == {"alp-s3", "bypass-s3"}
    for cell in cells.values():
        assert cell["status"] == "done" and cell["steps"] == 2
        assert [e["step"] for e in cell["envelope"]] == [1, 2]
        assert all(e["p02"] <= e["p98"] for e in cell["envelope"])
        assert len(cell["heldout_per_problem"]) == 3 and 0.0 <= cell["heldout"] <= 1.0
    assert set(report["summary"]) == {"alp", "bypass"}
    assert report["summary"]["alp"]["sigma"]["mean"] > 0
    assert report["summary"]["bypass"]["sigma"]["mean"] is None  # no perturbation
    text = md.read_text()
    assert "`alp`" in text and "`bypass`" in text and "2 done" in text
    assert (out / "envelope.png").stat().st_size > 0

    # a rerun of the same grid skips both cells
    stamps = {c: (out / "cells" / c / "cell.json").stat().st_mtime for c in cells}
    start = time.monotonic()
    run_study(spec, [base], out, command="test")
    assert {c: (out / "cells" / c / "cell.json").stat().st_mtime for c in cells} == stamps
    assert time.monotonic() - start < 60

    # an interrupted cell (no cell.json, newest checkpoint at step 1) resumes exactly
    run_dir = out / "cells" / "alp-s3"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step2 = next(r for r in rows if r.get("step") == 2 and "reward/mean" in r)
    (run_dir / "cell.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    run_study(spec, [base], out, command="test")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    again = [r for r in rows if r.get("step") == 2 and "reward/mean" in r]
    assert len(again) == 1  # the resumed run replaced the step it redid
    for key, value in step2.items():
        if not key.startswith(VOLATILE):
            assert again[0][key] == value, key
    assert json.loads((run_dir / "cell.json").read_text())["status"] == "done"
    assert not (run_dir / "checkpoints").exists()  # removed once the cell is done


@pytest.mark.parametrize(
    ("code", "log", "status"),
    [
        (0, "", "done"),
        (1, "... TrainingDivergedError: non-finite update", "diverged"),
        (1, "Traceback ... ValueError", "failed"),  # exit 1 without the trainer's message
        (130, "", "interrupted"),  # the trainer's own exit after Ctrl-C
        (-signal.SIGINT, "", "interrupted"),
        (-signal.SIGTERM, "", "interrupted"),
        (143, "", "interrupted"),
        (-signal.SIGKILL, "", "failed"),  # e.g. the OOM killer: a crash, not a stop
        (2, "", "failed"),
    ],
)
def test_cell_status_reads_the_exit(code, log, status):
    assert cell_status(code, log) == status


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_sigterm_stops_the_grid_and_leaves_the_cell_resumable(tmp_path):
    """`kill` on the runner (as from a script running it in the background, where SIGINT is
    ignored) stops the running cell and the grid, and records no failure."""
    base = tmp_path / "base.yaml"
    base.write_text(BASE.replace("steps: 2", "steps: 200"))
    out = tmp_path / "study"
    script = Path(__file__).resolve().parents[2] / "train" / "study.py"
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:  # a file, not a pipe: nobody reads while the bar writes
        runner = subprocess.Popen(
            [sys.executable, str(script), "--config", str(base), "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # a background job
        )
    run_dir = out / "cells" / "alp-s3"
    log = run_dir / "train.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "alp_agents.study.cell" in log.read_text()):
        assert runner.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "the cell never started"
        time.sleep(0.2)
    time.sleep(3.0)  # the cell is importing or training: either way it must stop
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=300) == 130
    assert "rerun the same command to resume" in stderr.read_text()
    assert _processes_mentioning(str(run_dir)) == []  # the cell stopped too
    assert not (run_dir / "cell.json").exists()  # not counted as failed: resumable
    assert not (out / "cells" / "bypass-s3").exists()  # the grid stopped
