"""Run a study: every cell an ordinary training run, resumable, one progress bar for the grid.

A cell runs as its own process, the same code path as ``train/multi_turn.py`` (the trainer's
``cli_main`` with the base config files and the cell's overrides), with its run directory
``DIR/cells/<cell id>``. A crash, a diverged run or Ctrl-C stops one cell, never the grid's
bookkeeping. The runner writes ``cell.json`` when a cell has ended:

* ``done`` (exit 0) and ``diverged`` (the trainer stopped on non-finite updates, exit 1) are
  results, skipped by a rerun;
* an interrupted cell (no ``cell.json``) resumes from its newest checkpoint on a rerun
  (``--resume``, exactly: weights, optimiser, sigma, RNGs, sampler), or starts again when it
  had none;
* ``failed`` (any other exit) is rerun only with ``--retry-failed``; its log is kept.

Stopping: Ctrl-C or ``kill`` (SIGTERM) on the runner passes SIGINT to the running cell, which
finishes its update, checkpoints and exits; the runner then stops the grid without writing that
cell's ``cell.json``, so the same command resumes it. A cell that exits as interrupted on its own
(SIGINT/SIGTERM sent to it directly) stops the grid the same way instead of being counted failed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alp_agents.common import read_jsonl
from alp_agents.configs.loader import ConfigError, config_to_yaml, load_config
from alp_agents.reporting.console import progress_bar
from alp_agents.study.grid import Cell, StudySpec
from alp_agents.study.report import CELL_FILE, CELLS_DIR, cell_summary
from alp_agents.trainer import checkpoint as ckpt

__all__ = ["CellInterrupted", "cell_status", "resolve_cells", "run_study"]

SPEC_FILE = "study_spec.json"
LOG_FILE = "train.log"
# Every cell: its own run directory, no per-step console output, nothing big left behind.
CELL_DEFAULTS = {"logging.progress": False, "checkpoint.export": False}
# Exit codes of a cell that was stopped rather than crashed: the trainer's own 130 after Ctrl-C,
# and death by SIGINT/SIGTERM (negative codes from subprocess, 128+N from a shell).
INTERRUPTED_CODES = frozenset({130, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM})


class CellInterrupted(KeyboardInterrupt):
    """A cell ended because someone stopped it: the grid stops, the cell stays resumable."""


def cell_status(returncode: int, log_tail: str) -> str:
    """What a cell's exit means: ``done``, ``diverged``, ``interrupted`` or ``failed``.

    Exit 1 is a divergence only when the trainer said so (``TrainingDivergedError`` in its log);
    any other exit 1 is a crash.
    """
    if returncode == 0:
        return "done"
    if returncode in INTERRUPTED_CODES:
        return "interrupted"
    if returncode == 1 and "TrainingDivergedError" in log_tail:
        return "diverged"
    return "failed"


def resolve_cells(
    spec: StudySpec, base: Sequence[Path], output: Path
) -> list[tuple[Cell, list[str]]]:
    """Each cell with its full override list, validated like a training run before any runs.

    Unknown keys, bad values and unknown presets raise `ConfigError` / the trainer's
    `TrainConfigError` naming the key (and the closest valid one) and the cell.
    """
    from alp_agents.configs import OTHER_SECTIONS, TrainConfig, TrainConfigError
    from alp_agents.trainer import validate_config

    out = []
    for cell in spec.cells():
        overrides = cell.overrides({**CELL_DEFAULTS, **spec.overrides})
        overrides.append(f"logging.run_dir={output / CELLS_DIR / cell.id}")
        overrides.append(f"logging.name={cell.id}")
        try:
            cfg = load_config(TrainConfig, list(base), overrides, extra_sections=OTHER_SECTIONS)
            validate_config(cfg)
        except (ConfigError, TrainConfigError) as exc:
            raise ConfigError(f"study cell {cell.id}: {exc}") from None
        out.append((cell, overrides))
    return out


def _fingerprint(base: Sequence[Path]) -> str:
    """The resolved base configuration (what every cell shares), as YAML text."""
    from alp_agents.configs import OTHER_SECTIONS, TrainConfig

    return config_to_yaml(load_config(TrainConfig, list(base), extra_sections=OTHER_SECTIONS))


def _check_same_study(output: Path, base_yaml: str) -> None:
    spec_path = output / SPEC_FILE
    if not spec_path.exists():
        return
    earlier = json.loads(spec_path.read_text()).get("base_resolved")
    if earlier is not None and earlier != base_yaml:
        raise ConfigError(
            f"{output} holds a study of another base configuration ({spec_path}); give a new "
            "--output, or run the same base config to extend or resume that study"
        )


def _progress_line(run_dir: Path) -> dict[str, str]:
    """The running cell's last step and reward, read from its metrics.jsonl."""
    try:
        with warnings.catch_warnings():  # the cell is writing: its last line may be partial
            warnings.simplefilter("ignore", RuntimeWarning)
            rows = read_jsonl(run_dir / "metrics.jsonl", missing_ok=True)
    except ValueError:  # a corrupt file is the cell's problem, not the progress line's
        return {}
    last = next((row for row in reversed(rows) if "reward/mean" in row), None)
    if last is None:
        return {}
    return {"step": str(last["step"]), "reward": f"{last['reward/mean']:.2f}"}


def _run_cell(
    cell: Cell, overrides: list[str], base: Sequence[Path], run_dir: Path, bar: Any
) -> tuple[str, int, float]:
    """Run (or resume) one cell in its own process; returns (status, exit code, seconds)."""
    checkpoint = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
    if checkpoint is None and run_dir.exists():
        shutil.rmtree(run_dir)  # interrupted before its first checkpoint: start again
    args = [sys.executable, "-m", "alp_agents.study.cell"]
    if checkpoint is not None:
        args += ["--resume", str(run_dir)]
    else:
        for path in base:
            args += ["--config", str(path)]
        args += overrides
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(run_dir / LOG_FILE, "a") as log:
        log.write(f"\n$ {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            while proc.poll() is None:
                bar.set_postfix({"cell": cell.id, **_progress_line(run_dir)}, refresh=True)
                time.sleep(2.0)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # the trainer finishes its update, checkpoints, exits
            try:
                proc.wait()
            except KeyboardInterrupt:  # asked twice: do not wait for the checkpoint
                proc.kill()
                proc.wait()
            raise CellInterrupted from None
    seconds = time.monotonic() - start
    code = proc.returncode
    return cell_status(code, _tail(run_dir / LOG_FILE)), code, seconds


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_study(
    spec: StudySpec,
    base: Sequence[Path],
    output: Path,
    retry_failed: bool = False,
    keep_checkpoints: bool = False,
    command: str | None = None,
    reference: str | None = None,
) -> Path:
    """Run every cell not yet finished, then write the report (paired differences against
    ``reference``, None: the report's default, ``alp``); returns ``study.md``."""
    from alp_agents.study.report import write_report

    output = Path(output)
    base = [Path(p) for p in base]
    cells = resolve_cells(spec, base, output)  # every mistake surfaces before anything runs
    base_yaml = _fingerprint(base)
    _check_same_study(output, base_yaml)
    output.mkdir(parents=True, exist_ok=True)
    spec_path = output / SPEC_FILE
    known = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    grids = known.get("grids", [])
    if spec.to_dict() not in grids:
        grids.append(spec.to_dict())
    spec_path.write_text(
        json.dumps(
            {
                "base_config": [str(p) for p in base],
                "base_resolved": base_yaml,
                "grids": grids,
                "commands": [*known.get("commands", []), command]
                if command
                else known.get("commands", []),
            },
            indent=1,
        )
        + "\n"
    )
    todo = []
    for cell, overrides in cells:
        meta_path = output / CELLS_DIR / cell.id / CELL_FILE
        if meta_path.exists():
            status = json.loads(meta_path.read_text()).get("status")
            if status in ("done", "diverged") or (status == "failed" and not retry_failed):
                continue
            meta_path.unlink()
        todo.append((cell, overrides))
    bar = progress_bar(len(cells), initial=len(cells) - len(todo), desc="study", unit="cell")
    previous_handlers = _stop_on_signals()
    try:
        for cell, overrides in todo:
            run_dir = output / CELLS_DIR / cell.id
            status, code, seconds = _run_cell(cell, overrides, base, run_dir, bar)
            if status == "interrupted":
                bar.write(f"{cell.id}: interrupted (exit {code}); the same command resumes it")
                raise CellInterrupted
            meta = {
                "status": status,
                "returncode": code,
                "seconds": seconds,
                "preset": cell.preset,
                "seed": cell.seed,
                "variant": cell.variant,
                "sweep": dict(cell.sweep),
                "group": cell.group,
                "overrides": overrides,
            }
            (run_dir / CELL_FILE).write_text(json.dumps(meta, indent=1) + "\n")
            if status != "failed" and not keep_checkpoints:
                shutil.rmtree(run_dir / ckpt.CHECKPOINT_DIRNAME, ignore_errors=True)
            summary = cell_summary(run_dir)
            held = summary["heldout"]
            bar.write(
                f"{cell.id}: {status} in {seconds / 60:.1f} min"
                + (f", held-out {held:.3f}" if held == held else "")
                + (f" (exit {code}; see {run_dir / LOG_FILE})" if status == "failed" else "")
            )
            bar.update(1)
    finally:
        bar.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return write_report(output, command=command, reference=reference)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> dict[int, Any]:
    """Make Ctrl-C and ``kill`` (SIGTERM) on the runner stop it cleanly; returns the old handlers
    (none off the main thread, where handlers cannot be set).

    SIGINT gets a handler even where it was ignored, as a shell does for background jobs: an
    ignored SIGINT is inherited by the cells across exec, and the cell would then ignore the
    runner's "checkpoint and stop" until its trainer installs its own handler. A handled one is
    reset to the default at exec, so every cell is interruptible from its first instruction.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
    }
