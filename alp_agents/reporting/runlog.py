"""Run directories: a config snapshot, JSONL metrics and TensorBoard events in one place.

Layout of a run directory (``runs/20260101-120000-alp`` by default)::

    config.yaml        the resolved configuration (`alp_agents.configs.loader.config_to_yaml`)
    meta.json          command line, git commit, library versions, start time
    metrics.jsonl      one JSON object per `RunLogger.log` call: {"step": .., "time": .., ...}
    tensorboard/       TensorBoard event files (``tensorboard --logdir runs``)

Every metrics line is flushed as soon as it is written, so a crash loses nothing that was
logged. Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (plain
JSON has no NaN); `read_metrics` turns them back into floats.

Example::

    >>> import tempfile
    >>> with RunLogger(tempfile.mkdtemp(), config={"lr": 1e-6}) as run:
    ...     _ = run.log(0, {"reward/mean": 0.25, "loss": float("nan"), "sigma": [0.1, 0.2]})
    ...     lines = read_metrics(run.run_dir)
    >>> lines[0]["reward/mean"], lines[0]["sigma"]
    (0.25, [0.1, 0.2])
    >>> import math; math.isnan(lines[0]["loss"])
    True
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alp_agents.common import read_jsonl, rewrite_jsonl

__all__ = ["RunLogger", "make_run_dir", "read_metrics"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
TENSORBOARD_DIR = "tensorboard"

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def make_run_dir(root: str | os.PathLike[str] = "runs", name: str | None = None) -> Path:
    """Create and return a fresh ``root/<YYYYmmdd-HHMMSS>[-name]`` folder (never reuses one).

    Two runs started in the same second get ``-2``, ``-3``, ... suffixes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S") + (f"-{name}" if name else "")
    for attempt in range(1, 1000):
        path = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {root}")


def _to_json_value(value: Any) -> Any:
    """Plain JSON for tensors, numpy scalars/arrays, nested containers and non-finite floats."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch / numpy
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot log a value of type {type(value).__name__}: {value!r}")


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (TensorBoard's grouping convention)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _from_json_value(value: Any) -> Any:
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json_value(v) for k, v in value.items()}
    return value


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` (or a run directory holding one) back, restoring nan/inf.

    A last line cut short by a crash is skipped with a `RuntimeWarning`; any other bad line is
    an error naming the file and line (`alp_agents.common.read_jsonl`'s policy).
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [_from_json_value(row) for row in read_jsonl(path)]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for module in ("torch", "transformers", "accelerate", "vllm"):
        mod = sys.modules.get(module)
        if mod is not None:
            versions[module] = getattr(mod, "__version__", "?")
    return versions


class RunLogger:
    """Write a run's config snapshot, metrics (JSONL + TensorBoard) and metadata.

    Args:
        run_dir: folder of the run (created if needed); see `make_run_dir` for a fresh one.
        config: the resolved config (dataclass or dict), saved as ``config.yaml``.
        tensorboard: also write TensorBoard events (skipped with a warning if tensorboard is
            not installed).
        resume_step: when resuming from a checkpoint taken at this step, drop metrics logged
            after it by the interrupted run (JSONL lines and TensorBoard events), so curves do
            not double back.

    Use as a context manager, or call `close` at the end.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: Any = None,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if config is not None:
            from alp_agents.configs.loader import save_config

            save_config(config, self.run_dir / CONFIG_FILE)
        self._write_meta(resume_step)
        if resume_step is not None:
            self._drop_metrics_after(resume_step)
        self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        self._tb = self._open_tensorboard(resume_step) if tensorboard else None
        self._started = time.time()

    def _write_meta(self, resume_step: int | None) -> None:
        path = self.run_dir / META_FILE
        meta: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        entry = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "git_commit": _git_commit(),
            "host": platform.node(),
            "versions": _versions(),
            "resume_step": resume_step,
        }
        meta.setdefault("sessions", []).append(entry)
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path)

    def _drop_metrics_after(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        # Rows keep their JSON form (nan/inf stay the strings they were written as).
        rewrite_jsonl(self.metrics_path, lambda row: row.get("step", -1) <= step)

    def _open_tensorboard(self, resume_step: int | None) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is a dependency, but degrade if it is missing
            logger.warning("TensorBoard logging disabled: %s", exc)
            return None
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Append one JSON line ``{"step", "time", **metrics}`` and the scalars to TensorBoard.

        Values may be Python/numpy/torch numbers, strings, lists (e.g. sigma per layer; a
        histogram in TensorBoard) or nested dicts (``{"ratio": {"p50": ..}}`` -> ``ratio/p50``).
        Returns the record as written.
        """
        flat = _flatten(metrics)
        record = {"step": int(step), "time": round(time.time() - self._started, 3)}
        record.update({key: _to_json_value(value) for key, value in flat.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "time"):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
                elif isinstance(value, str) and value in _NONFINITE:
                    self._tb.add_scalar(key, _NONFINITE[value], int(step))
                elif (
                    isinstance(value, list)
                    and value
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                ):
                    import numpy as np

                    self._tb.add_histogram(key, np.asarray(value, dtype=np.float64), int(step))
            self._tb.flush()
        return record

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Record a piece of text (e.g. a sampled trajectory) in TensorBoard's text tab."""
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunLogger({str(self.run_dir)!r})"
