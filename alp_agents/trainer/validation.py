"""Validation of a training configuration against the components it names.

`alp_agents.configs.train` is the schema alone; checking it needs the pieces the names refer
to (the loss presets, the registered models, environments and datasets, whether vLLM can run),
so the check lives here, above them, and runs before any model is loaded: a typo fails in a
second with the field, the bad value and the closest valid one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from alp_agents.common import did_you_mean
from alp_agents.configs.train import (
    ENGINES,
    LR_SCHEDULES,
    TrainConfig,
    TrainConfigError,
    dataset_kwargs,
    eval_dataset,
)
from alp_agents.learner.objectives import PolicyLossConfig, preset_names


def validate_config(cfg: TrainConfig) -> None:
    """Check every name and number that can be checked without loading a model.

    Raises TrainConfigError naming the field, the bad value and the valid choices.
    """

    def bad(field_name: str, value: Any, choices: Sequence[str] | str) -> TrainConfigError:
        if isinstance(choices, str):
            return TrainConfigError(f"{field_name}={value!r}: {choices}")
        return TrainConfigError(
            f"{field_name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}."
            + (did_you_mean(str(value), choices) if isinstance(value, str) else "")
        )

    from alp_agents.models import model_name_problem

    problem = model_name_problem(cfg.model.name)
    if problem is not None:
        raise bad("model.name", cfg.model.name, problem)
    presets = preset_names()
    if cfg.algorithm.preset not in presets:
        raise bad("algorithm.preset", cfg.algorithm.preset, presets)
    if cfg.algorithm.setting not in ("multi_turn", "single_turn"):
        raise bad("algorithm.setting", cfg.algorithm.setting, ("multi_turn", "single_turn"))
    if cfg.rollout.engine not in ENGINES:
        raise bad("rollout.engine", cfg.rollout.engine, ENGINES)
    if cfg.rollout.engine == "vllm":
        from alp_agents.rollout.engines import vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason:
            raise bad("rollout.engine", "vllm", f"vLLM cannot run here: {reason}")
    if cfg.optim.lr_schedule not in LR_SCHEDULES:
        raise bad("optim.lr_schedule", cfg.optim.lr_schedule, LR_SCHEDULES)
    if cfg.model.autocast not in ("auto", "bf16", "none"):
        raise bad("model.autocast", cfg.model.autocast, ("auto", "bf16", "none"))
    if cfg.perturbation.target not in ("hidden", "logits"):
        raise bad("perturbation.target", cfg.perturbation.target, ("hidden", "logits"))
    for name, value in (
        ("steps", cfg.steps),
        ("rollout.prompts_per_step", cfg.rollout.prompts_per_step),
        ("rollout.group_size", cfg.rollout.group_size),
        ("rollout.max_tokens", cfg.rollout.max_tokens),
        ("algorithm.mini_batches", cfg.algorithm.mini_batches),
        ("algorithm.micro_batch_size", cfg.algorithm.micro_batch_size),
        ("max_nonfinite_in_row", cfg.max_nonfinite_in_row),
    ):
        if int(value) < 1:
            raise bad(name, value, "must be >= 1")
    if not isinstance(cfg.rollout.async_steps, int) or cfg.rollout.async_steps < 0:
        raise bad(
            "rollout.async_steps",
            cfg.rollout.async_steps,
            "must be an integer >= 0 (0: synchronous rollouts)",
        )
    if cfg.algorithm.mini_batches > cfg.rollout.prompts_per_step * cfg.rollout.group_size:
        raise bad(
            "algorithm.mini_batches",
            cfg.algorithm.mini_batches,
            f"more mini-batches than trajectories per step "
            f"({cfg.rollout.prompts_per_step} x {cfg.rollout.group_size})",
        )
    if cfg.rollout.temperature <= 0:
        raise bad(
            "rollout.temperature",
            cfg.rollout.temperature,
            "training samples must be stochastic (> 0); greedy decoding is for eval.temperature",
        )
    if cfg.optim.lr < 0 or cfg.perturbation.sigma_lr < 0:
        raise bad("optim.lr", cfg.optim.lr, "learning rates must be >= 0")
    if cfg.perturbation.sigma_init <= 0:
        raise bad("perturbation.sigma_init", cfg.perturbation.sigma_init, "must be > 0")

    import envs

    registered = sorted(envs.registered())
    if cfg.env.id not in registered:
        raise bad("env.id", cfg.env.id, registered)
    checks = [("dataset", cfg.env.dataset, "train_split", cfg.env.train_split)]
    if cfg.eval.num_problems is None or cfg.eval.num_problems < 0:
        raise bad(
            "eval.num_problems", cfg.eval.num_problems, "must be a number >= 0 (0: no evaluation)"
        )
    if cfg.eval.num_problems > 0:
        field_name = "eval_dataset" if cfg.env.eval_dataset else "dataset"
        checks.append((field_name, eval_dataset(cfg), "eval_split", cfg.env.eval_split))
    if cfg.env.dataset_columns and not any(envs.is_dataset_file(c[1]) for c in checks):
        raise bad(
            "env.dataset_columns",
            dict(cfg.env.dataset_columns),
            "maps the columns of a problem file, but "
            + " and ".join(f"env.{c[0]}={c[1]!r}" for c in checks)
            + " names no file (bundled and procedural datasets have question and answer)",
        )
    if (
        cfg.eval.num_problems > 0
        and not cfg.env.eval_dataset
        and envs.is_dataset_file(cfg.env.dataset)
        and "{split}" not in cfg.env.dataset
    ):
        warnings.warn(
            f"env.dataset={cfg.env.dataset!r} is one file for both splits: the held-out "
            f"evaluation (eval.num_problems={cfg.eval.num_problems}) runs on training problems. "
            "Set env.eval_dataset, or put {split} in the path (data/{split}.parquet).",
            UserWarning,
            stacklevel=2,
        )
    for name_field, name, split_field, split in checks:
        kwargs = dataset_kwargs(cfg, name)
        columns = f" / env.dataset_columns={kwargs['columns']!r}" if "columns" in kwargs else ""
        try:
            envs.load_dataset(name, split=split, **kwargs)
        except Exception as exc:  # the dataset module names the valid choices
            raise TrainConfigError(
                f"env.{name_field}={name!r} / env.{split_field}={split!r}{columns}: {exc}"
            ) from exc
    # PolicyLossConfig rejects unknown override keys itself; surface it as a config error now.
    try:
        loss_config(cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise TrainConfigError(f"algorithm.loss={dict(cfg.algorithm.loss)!r}: {exc}") from exc


def loss_config(cfg: TrainConfig) -> PolicyLossConfig:
    """The preset's loss config with ``algorithm.loss`` overrides.

    Dr. GRPO's token-sum aggregation divides by a constant; unless set, it is the most model
    tokens an episode can have (``rollout.max_tokens * env.max_turns``), the same every step.
    """
    loss = PolicyLossConfig.preset(
        cfg.algorithm.preset, setting=cfg.algorithm.setting, **dict(cfg.algorithm.loss)
    )
    if loss.aggregation == "seq_mean_token_sum_norm" and loss.token_sum_norm is None:
        loss.token_sum_norm = float(cfg.rollout.max_tokens * cfg.env.max_turns)
    return loss
