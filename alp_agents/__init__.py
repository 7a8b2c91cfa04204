"""alp-agents: off-policy RL for tool-using LLM agents with Adaptive Layerwise Perturbation.

Public names are imported lazily so that `import alp_agents` stays cheap (no torch or
transformers import until a name that needs them is touched). The map below is the package's
table of contents: data flows sandbox -> envs -> rollout -> learner -> trainer, and
docs/architecture.md draws the packages:

    configs/     loader and schemas          models/      loading, precision, tiny test models
    rollout/     engines, chat, trajectory, the agent loop
    learner/     advantages, log-probs, perturbation, objectives, batching, metrics
    trainer/     the loop, checkpoints, CLI  evaluation/  runner, estimators
    reporting/   run log, plots, console     study/       the preset x seed x knob study runner

Modules that moved in the 0.2 restructuring stay importable under their old names
(``alp_agents.trainer`` now is a package; ``alp_agents.perturb`` is ``alp_agents.learner.perturb``);
see `MOVED_MODULES`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # model loading and run conventions
    "load_model": "alp_agents.models",
    "load_tokenizer": "alp_agents.models",
    "DEFAULT_MODEL": "alp_agents.models",
    "resolve_model_path": "alp_agents.models",
    "make_tiny_model": "alp_agents.models",
    "load_config": "alp_agents.configs",
    "ConfigError": "alp_agents.configs",
    "parse_cli": "alp_agents.configs",
    "RunLogger": "alp_agents.reporting.runlog",
    # rollout
    "Trajectory": "alp_agents.rollout.trajectory",
    "collate": "alp_agents.rollout.trajectory",
    "save_jsonl": "alp_agents.rollout.trajectory",
    "load_jsonl": "alp_agents.rollout.trajectory",
    "TrajectoryError": "alp_agents.rollout.trajectory",
    "ChatDelta": "alp_agents.rollout.chat",
    "InferenceEngine": "alp_agents.rollout.engines",
    "SamplingParams": "alp_agents.rollout.engines",
    "Sample": "alp_agents.rollout.engines",
    "HFEngine": "alp_agents.rollout.engines",
    "VLLMEngine": "alp_agents.rollout.engines",
    "run_episodes": "alp_agents.rollout.agent_loop",
    # learner
    "LayerwisePerturbation": "alp_agents.learner.perturb",
    "PolicyLossConfig": "alp_agents.learner.objectives",
    "policy_loss": "alp_agents.learner.objectives",
    "grpo_advantages": "alp_agents.learner.advantages",
    "token_logprobs": "alp_agents.learner.logprobs",
    # training and evaluation
    "ALPTrainer": "alp_agents.trainer",
    "TrainConfig": "alp_agents.trainer",
    "TrainResult": "alp_agents.trainer",
    "TrainingDivergedError": "alp_agents.trainer",
    "plot_run": "alp_agents.reporting.plots",
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


# Old module path -> new one. An import of an old path returns the new module object itself (one
# module, not a copy, so monkeypatching either name patches both) with a DeprecationWarning.
MOVED_MODULES: dict[str, str] = {
    "alp_agents.config": "alp_agents.configs.loader",
    "alp_agents.precision": "alp_agents.models.precision",
    "alp_agents.chat": "alp_agents.rollout.chat",
    "alp_agents.trajectory": "alp_agents.rollout.trajectory",
    "alp_agents.engines": "alp_agents.rollout.engines",
    "alp_agents.engines.base": "alp_agents.rollout.engines.base",
    "alp_agents.engines.hf": "alp_agents.rollout.engines.hf",
    "alp_agents.engines.vllm": "alp_agents.rollout.engines.vllm",
    "alp_agents.advantages": "alp_agents.learner.advantages",
    "alp_agents.logprobs": "alp_agents.learner.logprobs",
    "alp_agents.perturb": "alp_agents.learner.perturb",
    "alp_agents.objectives": "alp_agents.learner.objectives",
    "alp_agents.metrics": "alp_agents.learner.metrics",
    "alp_agents.checkpoint": "alp_agents.trainer.checkpoint",
    "alp_agents.eval_metrics": "alp_agents.evaluation.metrics",
    "alp_agents.runlog": "alp_agents.reporting.runlog",
    "alp_agents.plots": "alp_agents.reporting.plots",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the old module paths of `MOVED_MODULES` to the modules that replaced them."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old name will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        """The new module is already executed."""


# First in line: for an old submodule path (``alp_agents.engines.hf``) the parent already is the
# new package, and the ordinary path finder would find ``hf.py`` there and load a second copy.
if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
