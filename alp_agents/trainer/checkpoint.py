"""Checkpoints: exact-resume training state, and plain exports for serving.

Two different things are written, on purpose:

* A *training checkpoint* (``run_dir/checkpoints/step_000010/``) holds everything needed to
  continue a run bit-for-bit: model weights, optimiser and LR-scheduler state, the perturbation's
  sigma parameters, the problem sampler's position, every RNG state and the step counter.
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


def _optimizer_tensors(opt_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for pid, s in opt_state.get("state", {}).items():
        for k, v in s.items():
            if torch.is_tensor(v):
                out[f"optimizer.{pid}.{k}"] = v
    return out


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


def save_training_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler: Any,
    perturbation_state: dict[str, torch.Tensor] | None,
    trainer_state: dict[str, Any],
    rng: dict[str, Any],
    config: Any = None,
    model_state: dict[str, torch.Tensor] | None = None,
    rng_per_rank: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write a full training checkpoint to ``path`` (a directory).

    The model part is itself a valid export (``path/model``), so any checkpoint can be served
    or evaluated directly. Multi-process runs pass the full ``model_state`` where the model
    holds shards (FSDP), the optimiser as an already gathered state dict, and every rank's RNG
    state (``rng_per_rank``, restored per rank on resume; ``rng`` is rank 0's).
    """
    path = Path(path)
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    weights = serving_state_dict(model, model_state)
    tensors = {**weights, **_optimizer_tensors(opt_state)}
    tensors.update({f"perturbation.{k}": v for k, v in (perturbation_state or {}).items()})
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"refusing to write checkpoint {path}: tensor {bad!r} is not finite"
        )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_export(model, tokenizer, tmp / "model", state_dict=weights)
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict() if scheduler is not None else None, tmp / "scheduler.pt")
    torch.save(perturbation_state, tmp / "perturbation.pt")
    torch.save(rng, tmp / "rng.pt")
    if rng_per_rank is not None:
        torch.save(rng_per_rank, tmp / "rng_per_rank.pt")
    if config is not None:  # the resolved config, so --resume needs nothing else
        from alp_agents.configs.loader import save_config

        save_config(config, tmp / "config.yaml")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load the non-model parts of a checkpoint (the model is loaded from ``path/model``)."""
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.json)")
    return {
        "model_dir": path / "model",
        "optimizer": torch.load(path / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=False),
        "perturbation": torch.load(path / "perturbation.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
        "rng_per_rank": (
            torch.load(path / "rng_per_rank.pt", weights_only=False)
            if (path / "rng_per_rank.pt").exists()
            else None
        ),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in a run directory, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIRNAME
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "trainer_state.json").exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIRNAME / f"step_{step:06d}"


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
