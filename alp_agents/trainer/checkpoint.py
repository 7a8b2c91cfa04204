"""Checkpoints: exact-resume training state, and plain exports for serving.

Two different things are written, on purpose:

* A *training checkpoint* (``run_dir/checkpoints/step_000010/``) holds everything needed to
  continue a run bit-for-bit: the model weights (``model/``, itself an export), the run's
  configuration once (``config.yaml``) and one `TrainerState` record (optimiser and LR-scheduler
  state, the perturbation's sigma parameters, the problem sampler's position, every RNG state,
  the step counter, ...), written and read by one `TrainerState.save` / `TrainerState.load`.
* An *export* (``run_dir/final/``) is a plain ``save_pretrained`` directory (weights, config,
  tokenizer) that loads with ``AutoModelForCausalLM.from_pretrained(path)`` and contains no
  perturbation parameters: sigma is a training-time device, never part of the served policy.

Neither is written if any tensor is NaN or infinite (``NonFiniteCheckpointError``): a poisoned
checkpoint is worse than none, because resuming from it silently wastes the next run.

Example::

    from alp_agents.trainer.checkpoint import save_export, latest_checkpoint
    save_export(model, tokenizer, "runs/demo/final")
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained("runs/demo/final")
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIRNAME = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Substrings that mark perturbation parameters; exports drop any state-dict key containing one.
PERTURBATION_KEY_MARKERS = ("alp_perturb", "log_sigma", "perturbation")


class NonFiniteCheckpointError(RuntimeError):
    """Raised instead of writing a checkpoint that contains NaN or infinite values."""


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding a NaN/inf value, or None if all are finite."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def serving_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict (or ``state_dict``, e.g. one gathered from FSDP shards) without
    any perturbation parameter (what inference needs)."""
    state = model.state_dict() if state_dict is None else state_dict
    return {
        k: v
        for k, v in state.items()
        if not any(marker in k for marker in PERTURBATION_KEY_MARKERS)
    }


def save_export(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a plain Hugging Face directory loadable with ``from_pretrained`` (no sigma inside).

    ``state_dict`` replaces ``model.state_dict()`` where the model's own holds shards (FSDP:
    pass the full state dict, e.g. ``accelerator.get_state_dict(model)``). Refuses
    (``NonFiniteCheckpointError``) if any weight is NaN/inf.
    """
    path = Path(path)
    state = serving_state_dict(model, state_dict)
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to export {path}: tensor {bad!r} is not finite")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # GGUF-loaded models carry an hf_quantizer that makes save_pretrained refuse; the weights
    # are already dequantised, so it is safe to drop for saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


# Files of a training checkpoint besides ``model/`` and ``config.yaml``: the scalars of
# `TrainerState` in one JSON file (also the mark of a complete checkpoint), each field that
# holds tensors in its own torch file.
STATE_FILE = "trainer_state.json"
MODEL_DIRNAME = "model"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainerState:
    """Everything besides the weights that a resumed run needs to continue bit for bit.

    One record, written by `save_training_checkpoint` and read by `load_training_checkpoint`:
    a new piece of state is a new field here, nothing else. Fields whose metadata names a
    ``file`` are saved with `torch.save` there (they hold tensors); the others go to
    ``trainer_state.json``. ``rng`` is the saving (main) process's RNG state;
    ``rng_per_rank`` every rank's, when they were gathered (`for_rank` picks).
    """

    step: int
    sampler: dict[str, int]
    rng: dict[str, Any] = field(metadata={"file": "rng.pt"})
    optimizer: dict[str, Any] = field(metadata={"file": "optimizer.pt"})
    scheduler: dict[str, Any] | None = field(default=None, metadata={"file": "scheduler.pt"})
    perturbation: dict[str, torch.Tensor] | None = field(
        default=None, metadata={"file": "perturbation.pt"}
    )
    rng_per_rank: list[dict[str, Any]] | None = field(
        default=None, metadata={"file": "rng_per_rank.pt", "optional": True}
    )
    nonfinite_in_row: int = 0
    skipped_updates: int = 0
    signal_flat_steps: int = 0  # `LearningSignalMonitor`'s count of steps without signal
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    # rollout.async_steps > 0: the batches rolled out ahead of this step boundary, finished
    # (`alp_agents.trainer.async_rollouts.RolloutBatch.to_dict`); saved because the older
    # weights that sampled them are not in the checkpoint, so they cannot be regenerated
    pending_rollouts: list[dict[str, Any]] | None = field(
        default=None, metadata={"file": "pending_rollouts.pt", "optional": True}
    )

    def rng_for_rank(self, rank: int, world: int) -> dict[str, Any]:
        """This rank's saved RNG state; rank 0's when the ranks' were not gathered (or the
        run resumes on another number of processes)."""
        if self.rng_per_rank and len(self.rng_per_rank) == world:
            return self.rng_per_rank[rank]
        return self.rng

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the optimiser and the perturbation, by a readable name."""
        out = {
            f"optimizer.{pid}.{k}": v
            for pid, s in self.optimizer.get("state", {}).items()
            for k, v in s.items()
            if torch.is_tensor(v)
        }
        out.update({f"perturbation.{k}": v for k, v in (self.perturbation or {}).items()})
        return out

    def save(self, directory: Path) -> None:
        """Write the fields into ``directory`` (files of `dataclasses.fields` metadata)."""
        scalars: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if "file" not in f.metadata:
                scalars[f.name] = value
            elif value is not None or not f.metadata.get("optional"):
                torch.save(value, directory / f.metadata["file"])
        (directory / STATE_FILE).write_text(json.dumps(scalars, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        """Read what `save` wrote (fields absent from the files keep their defaults)."""
        scalars = json.loads((directory / STATE_FILE).read_text())
        values: dict[str, Any] = {}
        for f in fields(cls):
            if "file" in f.metadata:
                path = directory / f.metadata["file"]
                if path.exists():
                    values[f.name] = torch.load(path, weights_only=False)
            elif f.name in scalars:
                values[f.name] = scalars[f.name]
        return cls(**values)


def save_training_checkpoint(
    path: str | os.PathLike,
    state: TrainerState,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    model_state: dict[str, torch.Tensor] | None = None,
    config: Any = None,
) -> Path:
    """Atomically write a full training checkpoint to ``path`` (a directory).

    The model part is itself a valid export (``path/model``), so any checkpoint can be served
    or evaluated directly; ``model_state`` replaces ``model.state_dict()`` where the model holds
    shards (FSDP: the gathered full state). ``config`` (the resolved `TrainConfig`) is saved
    once, as ``config.yaml``, so ``--resume`` needs nothing else. Refuses
    (`NonFiniteCheckpointError`) if any weight, optimiser moment or sigma is NaN/inf.
    """
    path = Path(path)
    weights = serving_state_dict(model, model_state)
    bad = first_nonfinite({**weights, **state.tensors()})
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"refusing to write checkpoint {path}: tensor {bad!r} is not finite"
        )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_export(model, tokenizer, tmp / MODEL_DIRNAME, state_dict=weights)
    state.save(tmp)
    if config is not None:
        from alp_agents.configs.loader import save_config

        save_config(config, tmp / CONFIG_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_training_checkpoint(path: str | os.PathLike) -> TrainerState:
    """The `TrainerState` of a checkpoint (its weights are in `checkpoint_model_dir`)."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    return TrainerState.load(path)


def checkpoint_model_dir(path: str | os.PathLike) -> Path:
    """The plain export of the weights inside a training checkpoint."""
    return Path(path) / MODEL_DIRNAME


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in a run directory, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIRNAME
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``run_dir/checkpoints/step_000010``."""
    return Path(run_dir) / CHECKPOINT_DIRNAME / f"step_{step:06d}"


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
