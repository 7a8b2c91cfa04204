"""alp-agents: off-policy RL for tool-using LLM agents with Adaptive Layerwise Perturbation.

Public names are imported lazily so that `import alp_agents` stays cheap (no torch or
transformers import until a name that needs them is touched). The map below is the package's
table of contents: data flows sandbox -> envs -> rollout -> trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # model loading and run conventions
    "load_model": "alp_agents.models",
    "load_tokenizer": "alp_agents.models",
    "DEFAULT_MODEL": "alp_agents.models",
    "resolve_model_path": "alp_agents.models",
    "make_tiny_model": "alp_agents.models",
    "load_config": "alp_agents.config",
    "ConfigError": "alp_agents.config",
    "parse_cli": "alp_agents.config",
    "RunLogger": "alp_agents.runlog",
    # rollout
    "Trajectory": "alp_agents.trajectory",
    "collate": "alp_agents.trajectory",
    "save_jsonl": "alp_agents.trajectory",
    "load_jsonl": "alp_agents.trajectory",
    "TrajectoryError": "alp_agents.trajectory",
    "ChatDelta": "alp_agents.chat",
    "InferenceEngine": "alp_agents.engines",
    "SamplingParams": "alp_agents.engines",
    "Sample": "alp_agents.engines",
    "HFEngine": "alp_agents.engines",
    "VLLMEngine": "alp_agents.engines",
    "run_episodes": "alp_agents.rollout",
    # learner
    "LayerwisePerturbation": "alp_agents.perturb",
    "PolicyLossConfig": "alp_agents.objectives",
    "policy_loss": "alp_agents.objectives",
    "grpo_advantages": "alp_agents.advantages",
    "token_logprobs": "alp_agents.logprobs",
    # training and evaluation
    "ALPTrainer": "alp_agents.trainer",
    "TrainConfig": "alp_agents.trainer",
    "TrainResult": "alp_agents.trainer",
    "TrainingDivergedError": "alp_agents.trainer",
    "plot_run": "alp_agents.plots",
    "evaluate": "alp_agents.evaluation",
    "evaluate_with_engine": "alp_agents.evaluation",
    "EvalConfig": "alp_agents.evaluation",
    "EvalResult": "alp_agents.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alp_agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
