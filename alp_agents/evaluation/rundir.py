"""The evaluation run folder: file names, the resume fingerprint, checkpoint resolution.

A run folder holds ``samples.jsonl`` (appended as problems finish), ``eval_config.yaml`` (the
resolved configuration and the fingerprint of what decides the samples), and the reports.
Rerunning the same evaluation resumes it; a different one is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from alp_agents.configs.eval import UNSET, EvalConfig
from alp_agents.evaluation.records import load_records
from alp_agents.evaluation.results import EvaluationError
from alp_agents.reporting.console import say

SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "eval_config.yaml"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PASS_AT_K_PNG = "pass_at_k.png"

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.safetensors.index.json")
"""Files one of which a model folder must hold to have weights."""

# Fields that decide what the samples are; a run directory whose samples were drawn with other
# values cannot be resumed. (``num_problems`` and ``k`` are absent on purpose: more problems
# extend a finished run, and k only changes which numbers the report highlights.) The names are
# those of the first layout (``env``, ``env_kwargs``), so older run folders still resume.
_FINGERPRINT_FIELDS = (
    "model",
    "env",
    "dataset",
    "split",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_turns",
    "seed",
    "env_kwargs",
    "sandbox",
    "dtype",
)


def config_dict(cfg: EvalConfig) -> dict[str, Any]:
    """The configuration as plain data, without the deprecated alias keys."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v != UNSET}


def _fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    resolved = {
        "env": cfg.env.id,
        "env_kwargs": cfg.env.kwargs,
        "max_tokens": cfg.max_tokens_per_turn,
        "n": cfg.samples_per_problem,
    }
    values = {name: resolved.get(name, getattr(cfg, name, None)) for name in _FINGERPRINT_FIELDS}
    values["model_weights"] = _weights_signature(cfg.model)
    return json.loads(json.dumps(values, default=str))


def _weights_signature(model: str) -> str | None:
    """Size and mtime of a local model's weight files: a checkpoint rewritten in place is new."""
    local = Path(model).expanduser()
    if not local.is_dir():
        return None
    files = sorted(f for pattern in WEIGHT_PATTERNS for f in local.glob(pattern))
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def prepare_run_dir(run_dir: Path, cfg: EvalConfig) -> list[dict[str, Any]]:
    """Create the folder, check an earlier run is the same evaluation, return its records."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    samples_path = run_dir / SAMPLES_FILE
    fingerprint = _fingerprint(cfg)
    if cfg.overwrite:
        for name in (SAMPLES_FILE, REPORT_JSON, REPORT_MD, PASS_AT_K_PNG):
            (run_dir / name).unlink(missing_ok=True)
    elif samples_path.exists() and config_path.exists():
        earlier = (yaml.safe_load(config_path.read_text()) or {}).get("fingerprint", {})
        changed = sorted(
            key
            for key in set(earlier) | set(fingerprint)
            if earlier.get(key) != fingerprint.get(key)
        )
        if changed:
            detail = "; ".join(
                f"{key}: {earlier.get(key)!r} -> {fingerprint.get(key)!r}" for key in changed
            )
            raise EvaluationError(
                f"{run_dir} holds samples of a different evaluation ({detail}). "
                "Use another --run_dir, or --overwrite to discard them."
            )
    config_path.write_text(
        yaml.safe_dump({"config": config_dict(cfg), "fingerprint": fingerprint}, sort_keys=False)
    )
    return load_records(samples_path) if samples_path.exists() else []


def default_run_dir(cfg: EvalConfig) -> Path:
    """``runs/eval/<model>-<dataset>[-<split>]-n<n>-seed<seed>``: rerunning the same command resumes."""
    model = Path(cfg.model.rstrip("/")).name or cfg.model
    is_file = cfg.dataset.endswith((".jsonl", ".json", ".parquet", ".arrow", ".feather"))
    dataset = Path(cfg.dataset).stem if is_file else cfg.dataset
    parts = [model, dataset] + ([cfg.split] if cfg.split else [])
    parts += [f"n{cfg.samples_per_problem}", f"seed{cfg.seed}"]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))
    return Path("runs") / "eval" / slug


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def resolve_checkpoint(model: str) -> str:
    """Accept the folders a training run writes, not only the innermost model folder.

    A folder with weights is used as is; a training checkpoint (``checkpoints/step_N``) means its
    ``model/`` export; a run folder means its ``final/`` export, else its latest checkpoint.
    Names that are not local folders (embedded names, Hub ids) are returned unchanged.
    """
    local = Path(model).expanduser()
    if not local.is_dir() or _has_weights(local):
        return model
    candidates = [local / "model", local / "final"]
    candidates += sorted(local.glob("checkpoints/step_*/model"), reverse=True)
    for candidate in candidates:
        if candidate.is_dir() and _has_weights(candidate):
            say(f"{local} has no weights of its own; evaluating {candidate}", prefix="[evaluate] ")
            return str(candidate)
    return model


def check_model(model: str) -> None:
    """Refuse a local folder without weights or an unknown name before anything is loaded.

    A name registered with `alp_agents.models.register_model_factory` is a model too.
    """
    from alp_agents.models import UnknownModelError, resolve_model_path
    from alp_agents.models.registry import model_factory

    if model_factory(model) is not None:
        return

    local = Path(model).expanduser()
    if local.is_dir() and not _has_weights(local):
        raise EvaluationError(
            f"{local} holds no model weights (looked for {', '.join(WEIGHT_PATTERNS)} here and "
            "in its model/, final/ and checkpoints/step_*/model/ folders). Point --model at a "
            "folder written by save_pretrained, a training run or checkpoint folder, an "
            "embedded name or a Hub id."
        )
    try:
        resolve_model_path(model)
    except UnknownModelError as exc:
        raise EvaluationError(str(exc)) from exc
