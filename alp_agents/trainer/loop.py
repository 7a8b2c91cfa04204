"""ALPTrainer: the on-line RL loop, read top to bottom like a CleanRL script.

One training step (`ALPTrainer.train_step`), as docs/alp.md describes it:

1. sample ``prompts_per_step`` problems from a seeded sampler (its position is checkpointed)
   and run ``group_size`` episodes per problem with the inference engine (the environment
   grades);
2. drop infrastructure failures (counted), compute GRPO advantages over each group (void-turn
   trajectories count in the group statistics, but are masked out of the loss by default);
3. the K-mini-batch update (`alp_agents.learner.update.PolicyUpdate`): pi_old and the KL
   reference without gradient, then one optimiser step per mini-batch with the layerwise
   perturbation on only in the ratio numerator;
4. sync the new weights into the engine (never sigma) and log every metric.

With ``rollout.async_steps = N >= 1`` the same step reads the same way, but step t's rollout
was started N steps earlier by a background worker (`alp_agents.trainer.async_rollouts`): "roll
out" takes that batch (and submits the one for step t+N), "sync" hands the new weights to the
worker for the next batch it starts. Each trajectory records the policy version that sampled
each turn; the step logs the staleness lag and the ratio statistics per lag.

`ALPTrainer.train` runs the steps, evaluates on held-out problems every N steps and
checkpoints every N steps (`alp_agents.trainer.checkpoint.TrainerState`). What differs on
several processes is in `alp_agents.trainer.distributed`.

Everything is configured by :class:`TrainConfig` (nested dataclasses, YAML + command line via
``alp_agents.configs.loader``). The same code runs on one CPU, one GPU or many processes under
``accelerate launch`` (each process rolls out its own shard of the problems; gradients are
all-reduced by DDP).

Example (a tiny random model registered by name, seconds)::

    from alp_agents.models import register_tiny_models
    from alp_agents.trainer import ALPTrainer, TrainConfig
    register_tiny_models()              # "tiny-llama", ... (alp_agents.models.registry)
    cfg = TrainConfig()
    cfg.model.name = "tiny-llama"
    cfg.steps = 2
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_tokens = 2, 2, 16
    cfg.eval.num_problems = 0
    result = ALPTrainer(cfg).train()
    print(result.run_dir, result.final_metrics["reward/mean"])
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alp_agents.common import derive_seed, rewrite_jsonl
from alp_agents.configs.train import TrainConfig, dataset_kwargs, eval_dataset
from alp_agents.learner.update import (
    PolicyUpdate,
    TrainingDivergedError,
    UpdateSettings,
    build_update_batch,
    noise_seed,
)
from alp_agents.models import make_lm_head_input_contiguous, set_activation_checkpointing
from alp_agents.reporting.console import (
    format_summary,
    progress_bar,
    progress_postfix,
    say,
    without_step_label,
)
from alp_agents.rollout.stats import episode_stats
from alp_agents.rollout.trajectory import Trajectory
from alp_agents.trainer import checkpoint as ckpt
from alp_agents.trainer.async_rollouts import AheadRollouts, RolloutBatch
from alp_agents.trainer.checkpoint import TrainerState
from alp_agents.trainer.distributed import DistributedOps, check_world
from alp_agents.trainer.monitors import LearningSignalMonitor
from alp_agents.trainer.optim import lr_lambda
from alp_agents.trainer.problems import ProblemSampler
from alp_agents.trainer.validation import loss_config, validate_config

__all__ = ["ALPTrainer", "TrainResult", "TrainingDivergedError", "noise_seed"]

TRAJECTORY_SAMPLES_FILE = "trajectories.jsonl"
HELDOUT_SAMPLES_FILE = "heldout.jsonl"  # per held-out sample: label, problem id, reward


@dataclass
class TrainResult:
    """What `ALPTrainer.train` returns: where the run is and how it ended."""

    run_dir: Path
    steps_done: int
    interrupted: bool
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    final_metrics: dict[str, float]
    export_dir: Path | None
    plots: dict[str, Path]


class ALPTrainer:
    """Runs ``TrainConfig`` end to end; see the module docstring for the step.

    Args:
        config: the run's configuration (validated before anything heavy is loaded).
        model / tokenizer: optional pre-built objects (tests); default: loaded from
            ``config.model.name``.
        resume_from: a checkpoint directory (``run_dir/checkpoints/step_N``) to continue from.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: Any = None,
        tokenizer: Any = None,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        validate_config(config)  # before any model is loaded
        self.cfg = config
        self.loss_cfg = loss_config(config)
        resume = ckpt.load_training_checkpoint(resume_from) if resume_from else None
        model_dir = ckpt.checkpoint_model_dir(resume_from) if resume_from else None

        from accelerate import Accelerator

        from alp_agents.models.precision import resolve_autocast

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.dist = DistributedOps(self.accelerator)
        self.device = self.accelerator.device
        self.autocast = resolve_autocast(config.model.autocast, self.device)  # "bf16" | "none"
        self.is_main = self.dist.is_main
        check_world(config.rollout, config.algorithm, self.accelerator, self._say)
        torch.manual_seed(config.seed)

        self.train_problems, self.eval_problems = self._load_problems()
        self.sampler = ProblemSampler(len(self.train_problems), config.seed)
        self.signal_monitor = LearningSignalMonitor()
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer()
        model, initial = self._build_policy(model, model_dir)
        self.model = model
        # Engine and reference model are built from the unperturbed weights, before hooks exist.
        self.engine = self._make_engine()
        self.ref_model = self._build_reference(initial)
        self.perturbation = self._build_perturbation()
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self._prepare_for_processes()
        self._sync_ranks(resumed=resume is not None)
        self.update = PolicyUpdate(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loss_cfg=self.loss_cfg,
            settings=UpdateSettings.from_config(config, self.autocast),
            collectives=self.dist,
            perturbation=self.perturbation,
            ref_model=self.ref_model,
            warn=self._warn,
        )
        self.step = 0
        self.eval_history: list[dict[str, Any]] = []
        self.ahead: AheadRollouts | None = None  # the async worker's batches, while training
        self._restored_batches: list[RolloutBatch] = []
        if resume is not None:
            self._restore(resume)
        self.run_dir = self._resolve_run_dir(resume_from)
        self.logger = self._make_logger(resume_step=self.step if resume else None)
        self._interrupt_requested = False
        self._saving = False  # a checkpoint is being written (async: waits for the worker)

    # ---------------------------------------------------------------- construction
    def _load_problems(self) -> tuple[list[Any], list[Any]]:
        """The training problems and the first ``eval.num_problems`` held-out ones."""
        import envs

        c = self.cfg
        train = envs.load_dataset(
            c.env.dataset, split=c.env.train_split, **dataset_kwargs(c, c.env.dataset)
        )
        if c.eval.num_problems <= 0:
            return train, []
        held_name = eval_dataset(c)
        held_out = envs.load_dataset(
            held_name, split=c.env.eval_split, **dataset_kwargs(c, held_name)
        )
        return train, held_out[: c.eval.num_problems]

    def _load_tokenizer(self) -> Any:
        from alp_agents.models import load_tokenizer

        return load_tokenizer(self.cfg.model.name)

    def _load_model(self, path: Path | None) -> Any:
        """``config.model.name`` (any name `load_model` accepts), or the weights at ``path``."""
        from alp_agents.models import load_model

        dtype = getattr(torch, self.cfg.model.dtype)
        return load_model(
            str(path) if path else self.cfg.model.name, dtype=dtype, seed=self.cfg.seed
        )

    def _build_policy(self, model: Any, resume_dir: Path | None) -> tuple[Any, Any]:
        """The policy on the device, ready to train, and (resumed with a KL term) the model
        the run STARTED from, which stays the KL reference after a resume."""
        needs_ref = self.loss_cfg.needs_ref_logprobs
        initial = None
        if model is None:
            model = self._load_model(resume_dir)
            if resume_dir and needs_ref:
                initial = self._load_model(None)
        elif resume_dir:
            if needs_ref:
                initial = copy.deepcopy(model)
            model.load_state_dict(_state_dict_from_dir(resume_dir), strict=False)
        m = self.cfg.model
        model = make_lm_head_input_contiguous(model.to(self.device))
        if model.config._attn_implementation != m.attn_implementation:
            model.set_attn_implementation(m.attn_implementation)
        if m.gradient_checkpointing:
            set_activation_checkpointing(model, True)
        model.train()
        return model, initial

    def _build_reference(self, initial: Any) -> Any:
        """The frozen KL reference (None without a KL term): a copy of the starting policy."""
        if not self.loss_cfg.needs_ref_logprobs:
            return None
        ref = copy.deepcopy(self.model) if initial is None else initial.to(self.device)
        ref.eval().requires_grad_(False)
        if ref.config._attn_implementation != self.cfg.model.attn_implementation:
            ref.set_attn_implementation(self.cfg.model.attn_implementation)
        return make_lm_head_input_contiguous(ref)

    def _build_perturbation(self) -> Any:
        """The layerwise perturbation's hooks and sigma (presets that perturb), else None."""
        if not self.loss_cfg.perturbation:
            return None
        from alp_agents.learner.perturb import LayerwisePerturbation

        p = self.cfg.perturbation
        perturbation = LayerwisePerturbation(
            self.model,
            sigma_init=p.sigma_init,
            learnable=p.learnable,
            layers=p.layers,
            target=p.target,
            store_noise=p.store_noise,
        )
        self._warn_if_noise_unresolved()
        return perturbation

    def _warn_if_noise_unresolved(self) -> None:
        """Say so at start when sigma_0 is below what the trainer's matmul precision resolves."""
        from alp_agents.learner.perturb import resolvable_sigma

        p = self.cfg.perturbation
        if p.target != "hidden":
            return
        compute = (
            torch.bfloat16 if self.autocast == "bf16" else getattr(torch, self.cfg.model.dtype)
        )
        floor = resolvable_sigma(compute)
        if p.sigma_init < floor:
            self._say(
                f"WARNING: perturbation.sigma_init={p.sigma_init:g} is below what the trainer's "
                f"{str(compute).removeprefix('torch.')} matmuls resolve (~{floor:.2g} for "
                "activations of order 1): the noise mostly vanishes in rounding, and this ALP run "
                "is close to Bypass plus rounding jitter. Raise sigma_init (the single-turn "
                "release uses 0.02), or train without autocast; the logged "
                "perturbation/logprob_change shows the realised effect."
            )

    def _make_engine(self) -> Any:
        """The rollout engine, built from the unperturbed weights (before any hook exists)."""
        from alp_agents.rollout.engines import build_engine, describe_engine

        r = self.cfg.rollout
        engine = build_engine(
            r.engine, self._unwrapped(), self.tokenizer, dtype=r.engine_dtype,
            device=self.device, training=True, seed=self.cfg.seed,
            model_name=self.cfg.model.name, **r.engine_kwargs,
        )  # fmt: skip
        self._say(
            f"engine: {describe_engine(engine)}; trainer: {self.cfg.model.dtype}, "
            f"autocast {self.autocast}"
        )
        return engine

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the model's parameters, and sigma in its own group (``name="sigma"``)."""
        o = self.cfg.optim
        groups: list[dict[str, Any]] = [
            {
                "params": [p for p in self.model.parameters() if p.requires_grad],
                "lr": o.lr,
                "weight_decay": o.weight_decay,
                "name": "model",
            }
        ]
        if self.perturbation is not None:
            sigma = [p for p in self.perturbation.parameters() if p.requires_grad]
            if sigma:
                groups.append(
                    {
                        "params": sigma,
                        "lr": self.cfg.perturbation.sigma_lr,
                        "weight_decay": self.cfg.perturbation.weight_decay,
                        "name": "sigma",
                    }
                )
        fused = o.fused and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16)
            for g in groups
            for p in g["params"]
        )
        return torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None
        )

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """The LR schedule over all optimiser steps of the run (K per training step)."""
        o = self.cfg.optim
        total_updates = self.cfg.steps * self.cfg.algorithm.mini_batches
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(o.lr_schedule, total_updates, o.warmup_steps, o.min_lr_ratio),
        )

    def _prepare_for_processes(self) -> None:
        """Wrap the model and optimiser for DDP/FSDP (a no-op wrapper on one process).

        accelerate's FSDP2 preparation swaps every optimiser parameter for its sharded twin
        and fails on one that is not in the model: sigma's group joins after the sharding.
        """
        outside = []
        if self.dist.is_fsdp:
            groups = self.optimizer.param_groups
            outside = [g for g in groups if g.get("name") == "sigma"]
            groups[:] = [g for g in groups if g.get("name") != "sigma"]
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.optimizer.param_groups.extend(outside)

    def _sync_ranks(self, resumed: bool) -> None:
        """Make every rank's engine and reference model hold the weights the ranks train.

        They were built from this rank's own copy, before prepare made the ranks agree (DDP
        broadcasts rank 0's weights; FSDP's memory-efficient loading gives the other ranks empty
        weights until then). A resumed run's reference is rank 0's initial model, everywhere.
        """
        if self.dist.world == 1:
            return
        state = self.dist.full_state_dict(self.model, all_ranks=True)
        self.engine.update_weights(state)
        if self.ref_model is not None and not resumed:
            self.ref_model.load_state_dict(state)
        elif self.ref_model is not None:
            for tensor in self.ref_model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def _unwrapped(self) -> Any:
        return self.dist.unwrap(self.model)

    def _resolve_run_dir(self, resume_from: str | os.PathLike | None) -> Path:
        if resume_from is not None:
            return Path(resume_from).resolve().parent.parent
        if self.cfg.logging.run_dir:
            return Path(self.cfg.logging.run_dir)
        from alp_agents.reporting.runlog import make_run_dir

        # One fresh directory for the whole run: the main process makes it, the others use it.
        made = str(make_run_dir("runs", self.cfg.logging.name)) if self.is_main else None
        return Path(self.dist.broadcast_object(made))

    def _make_logger(self, resume_step: int | None) -> Any:
        if not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:  # a killed run may have logged past its checkpoint
            for name in (TRAJECTORY_SAMPLES_FILE, HELDOUT_SAMPLES_FILE):
                rewrite_jsonl(
                    self.run_dir / name, lambda row: int(row.get("step", 0)) <= resume_step
                )
        from alp_agents.reporting.runlog import RunLogger

        return RunLogger(
            self.run_dir,
            self.cfg,
            tensorboard=self.cfg.logging.tensorboard,
            resume_step=resume_step,
        )

    # ---------------------------------------------------------------- trainer state
    @property
    def skipped_updates(self) -> int:
        """Optimiser steps skipped for a non-finite loss or gradient, over the whole run."""
        return self.update.nonfinite.total

    def _capture_state(self, gather: bool) -> TrainerState | None:
        """This run's `TrainerState` (None on processes other than the main one).

        Collective on several processes: the optimiser's FSDP shards are gathered, and with
        ``gather`` every rank's RNG state.
        """
        optimizer = self.dist.full_optimizer_state(self.optimizer)
        # Batches rolled out ahead are saved, not regenerated: the older weights that sampled
        # them are not in the checkpoint (alp_agents.trainer.async_rollouts). Waits for them.
        pending = None
        if self.ahead is not None:
            pending = [b.to_dict() for b in self.ahead.pending(self.step)]
        elif self._restored_batches:  # not started yet: what was restored is still pending
            pending = [b.to_dict() for b in self._restored_batches]
        rng = ckpt.rng_state()
        rng_per_rank = self.dist.gather_objects(rng) if gather else None
        if not self.is_main:
            return None
        return TrainerState(
            step=self.step,
            sampler=self.sampler.state_dict(),
            rng=rng,
            optimizer=optimizer,
            scheduler=self.scheduler.state_dict(),
            perturbation=self.perturbation.state_dict() if self.perturbation else None,
            rng_per_rank=rng_per_rank,
            nonfinite_in_row=self.update.nonfinite.in_row,
            skipped_updates=self.update.nonfinite.total,
            signal_flat_steps=self.signal_monitor.flat_steps,
            eval_history=list(self.eval_history),
            pending_rollouts=pending,
        )

    def _restore(self, state: TrainerState) -> None:
        """Continue from ``state`` (the inverse of `_capture_state`), then sync the engine."""
        if self.perturbation is not None and state.perturbation is not None:
            self.perturbation.load_state_dict(state.perturbation)
        self.dist.load_optimizer_state(self.optimizer, state.optimizer)
        if state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        self.step = int(state.step)
        self.update.nonfinite.in_row = int(state.nonfinite_in_row)
        self.update.nonfinite.total = int(state.skipped_updates)
        self.signal_monitor.flat_steps = int(state.signal_flat_steps)
        self.eval_history = list(state.eval_history)
        self.sampler.load_state_dict(state.sampler)
        ckpt.set_rng_state(state.rng_for_rank(self.dist.rank, self.dist.world))
        self._restored_batches = [RolloutBatch.from_dict(b) for b in state.pending_rollouts or []]
        if self._restored_batches and not self.cfg.rollout.async_steps:
            self._say(
                f"WARNING: the checkpoint holds {len(self._restored_batches)} batch(es) rolled "
                "out ahead (rollout.async_steps > 0); this run is synchronous and drops them "
                "(their problems are skipped)"
            )
            self._restored_batches = []
        self.engine_sync()

    def save_checkpoint(self, gather: bool = True) -> Path | None:
        """Write ``run_dir/checkpoints/step_N``; returns its path (None on other processes).

        Multi-process, every process must call it: the RNG states of all ranks (and under FSDP
        the model and optimiser shards) are gathered; only the main process writes. With
        ``gather=False`` (Ctrl-C under DDP, where the ranks may have stopped at different
        points) the main process writes alone and a resume gives every rank rank 0's RNGs.
        """
        gather = gather or self.dist.is_fsdp  # sharded weights can only be saved together
        model_state = (
            self.dist.full_state_dict(self.model, all_ranks=False) if self.dist.is_fsdp else None
        )
        self._saving = True
        try:
            state = self._capture_state(gather)
        finally:
            self._saving = False
        if state is None:
            return None
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        ckpt.save_training_checkpoint(
            path,
            state,
            model=self._unwrapped(),
            tokenizer=self.tokenizer,
            model_state=model_state,
            config=self.cfg,
        )
        ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    # ---------------------------------------------------------------- one training step
    def train_step(self) -> dict[str, float]:
        """Roll out, advantages, K mini-batch updates, weight sync; returns the step's metrics."""
        t_step = time.perf_counter()
        trajs, metrics = self.rollout()
        metrics.update(episode_stats(trajs))
        self._save_trajectory_samples(trajs)

        kept = [t for t in trajs if not t.is_infra_failure]
        metrics["batch/infra_failures"] = float(len(trajs) - len(kept))
        metrics["batch/trajectories"] = float(len(kept))
        if self.dist.fewest_over_ranks(len(kept)) == 0:
            # Every rank skips together: one skipping alone would leave the others waiting
            # in the gradient all-reduce.
            metrics["batch/skipped_no_data"] = 1.0
            if self.ahead is not None:  # the version moves on with the step (same weights)
                self.engine_sync()
            return metrics

        r = self.cfg.rollout
        batch, batch_metrics = build_update_batch(
            kept,
            pad_token_id=self.tokenizer.pad_token_id,
            scale_by_std=self.loss_cfg.scale_advantages_by_std,
            eps=self.cfg.algorithm.advantage_eps,
            void_in_group_stats=r.void_in_group_stats,
            mask_void_turns=r.mask_void_turns,
            # asynchronous: each token's lag behind this step's weights (staleness/* metrics)
            policy_version=self.step if self.ahead is not None else None,
        )
        metrics.update(batch_metrics)
        warning = self.signal_monitor.observe(metrics["advantage/zero_groups_ratio"])
        metrics["signal/flat_steps"] = float(self.signal_monitor.flat_steps)
        if warning is not None:
            self._say(f"WARNING: {warning}")

        t_update = time.perf_counter()
        metrics.update(self.update.run(batch, self.step).metrics)
        metrics["time/update_s"] = time.perf_counter() - t_update
        tokens = float(batch.tensors["attention_mask"].sum())
        metrics["throughput/update_tokens_per_s"] = tokens / max(1e-9, metrics["time/update_s"])

        t_sync = time.perf_counter()
        self.engine_sync()
        metrics["time/sync_s"] = time.perf_counter() - t_sync
        metrics["time/step_s"] = time.perf_counter() - t_step
        return metrics

    def rollout(self) -> tuple[list[Any], dict[str, float]]:
        """This step's trajectories (this process's shard of its problems).

        Synchronous: sample the problems and run the episodes now, with the current weights.
        Asynchronous: submit the batches of the next ``rollout.async_steps`` steps not yet
        submitted (with the current weights), then take this step's batch, rolled out ahead by
        the worker; ``time/rollout_wait_s`` is how long the trainer waited for it.
        """
        if self.ahead is None:
            batch = self._roll_out(self.engine, self._sample_problems(), self.step)
            return batch.trajectories, batch.metrics
        t0 = time.perf_counter()
        self.ahead.fill(self.step, version=self.step)
        batch = self.ahead.take(self.step)
        return batch.trajectories, {
            **batch.metrics,
            "time/rollout_wait_s": time.perf_counter() - t0,
        }

    def _sample_problems(self) -> list[Any]:
        """The next batch's problems, this process's shard (advances the sampler)."""
        idx = self.sampler.take(self.cfg.rollout.prompts_per_step)
        rank, world = self.dist.rank, self.dist.world
        return [self.train_problems[i] for i in idx][rank::world]

    def _roll_out(
        self, engine: Any, problems: Sequence[Any], step: int, version: int | None = None
    ) -> RolloutBatch:
        """Run the episodes of step ``step``'s problems on ``engine``, whose weights are policy
        ``version`` (default: ``step``, the synchronous case)."""
        from alp_agents.rollout.agent_loop import run_episodes

        cfg = self.cfg
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        trajs = run_episodes(
            cfg.env.id,
            engine,
            self.tokenizer,
            problems,
            cfg.rollout.group_size,
            self._sampling(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_tokens),
            env_kwargs=self._env_kwargs(cfg.env.train_split),
            max_turns=cfg.env.max_turns,
            # the worker's bar would garble the train bar: only synchronous rollouts show one
            progress=cfg.logging.progress and self.is_main and self.ahead is None,
            seed=rollout_seed(cfg.seed, step, self.dist.rank),
            stats=stats,
            policy_version=step if version is None else version,
        )
        out = {"time/rollout_s": time.perf_counter() - t0}
        for key in ("generate_s", "env_s"):
            if key in stats:
                out[f"time/rollout_{key}"] = float(stats[key])
        if "generated_tokens" in stats:
            out["throughput/generated_tokens_per_s"] = float(stats["generated_tokens"]) / max(
                1e-9, out["time/rollout_s"]
            )
        return RolloutBatch(step, trajs, out)

    def engine_sync(self) -> None:
        """Copy the trainer's weights into the inference engine (never the perturbation).

        Under FSDP the full weights are gathered first (every process calls this each step).
        Asynchronous: a snapshot goes to the worker as version ``step + 1`` (called at the end
        of a step, before the counter moves), loaded before the next batch it starts.
        """
        if self.ahead is not None:
            self.ahead.worker.push_weights(self.step + 1, self._unwrapped().state_dict())
            return
        if self.dist.is_fsdp:
            self.engine.update_weights(self.dist.full_state_dict(self.model, all_ranks=True))
        else:
            self.engine.update_weights(self._unwrapped())

    def _env_kwargs(self, split: str | None, dataset: str | None = None) -> dict[str, Any]:
        e = self.cfg.env
        kwargs: dict[str, Any] = {"dataset": dataset or e.dataset, "split": split}
        options = dataset_kwargs(self.cfg, kwargs["dataset"])
        if options:
            kwargs["dataset_options"] = options
        return {**kwargs, **e.kwargs}

    def _sampling(self, temperature: float, top_p: float, max_tokens: int) -> Any:
        from alp_agents.rollout.engines import SamplingParams

        return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)

    def _save_trajectory_samples(self, trajs: Sequence[Any]) -> None:
        lc = self.cfg.logging
        if not self.is_main or lc.trajectory_samples_every <= 0:
            return
        if self.step % lc.trajectory_samples_every:
            return
        chosen = trajs if lc.trajectory_samples < 0 else trajs[: lc.trajectory_samples]
        with open(self.run_dir / TRAJECTORY_SAMPLES_FILE, "a") as f:
            for t in chosen:
                f.write(json.dumps(_trajectory_sample(t, self.tokenizer, self.step)) + "\n")

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation with the (synced, unperturbed) inference engine."""
        if not self.eval_problems:
            return {}
        from alp_agents.evaluation.runner import evaluate_with_engine

        e = self.cfg.eval

        def run(engine: Any, version: int) -> Any:
            return evaluate_with_engine(
                engine,
                self.tokenizer,
                self.cfg.env.id,
                self.eval_problems,
                k=e.k,
                sampling=self._sampling(
                    e.temperature, e.top_p, e.max_tokens or self.cfg.rollout.max_tokens
                ),
                env_kwargs=self._env_kwargs(self.cfg.env.eval_split, eval_dataset(self.cfg)),
                seed=self.cfg.seed + 12345,
                progress=self.cfg.logging.progress and self.is_main and self.ahead is None,
                max_turns=self.cfg.env.max_turns,
            )

        # Asynchronous: the worker owns the engine; it evaluates after the batches queued
        # before, with this step's weights (pushed by the last sync).
        if self.ahead is not None:
            result = self.ahead.worker.call(run, self.step)
        else:
            result = run(self.engine, self.step)
        self._last_eval_records = result.records
        return {k: float(v) for k, v in result.summary.items() if isinstance(v, (int, float))}

    def _record_eval(self, label: str) -> dict[str, float]:
        summary = self.evaluate()
        if summary:
            self.eval_history.append({"step": self.step, "label": label, **summary})
            if self.logger is not None:
                self.logger.log(self.step, {f"eval/{k}": v for k, v in summary.items()})
                self._save_heldout_samples(label)
        return summary

    def _save_heldout_samples(self, label: str) -> None:
        """Every held-out sample's reward (``heldout.jsonl``): what a study's intervals need."""
        with open(self.run_dir / HELDOUT_SAMPLES_FILE, "a") as f:
            for r in self._last_eval_records:
                row = {
                    "step": self.step,
                    "label": label,
                    "problem_id": r["problem_id"],
                    "sample_index": r["sample_index"],
                    "reward": r["reward"],
                    "grade": r["grade"],
                }
                f.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        """Run until ``config.steps``; Ctrl-C saves a checkpoint and returns (interrupted=True)."""
        cfg = self.cfg
        eval_before = None
        if cfg.eval.before and self.step == 0 and self.eval_problems:
            self._say("held-out evaluation before training ...")
            eval_before = self._record_eval("before")
        elif self.eval_history:
            eval_before = without_step_label(self.eval_history[0])
        bar = progress_bar(
            cfg.steps,
            desc="train",
            unit="step",
            initial=self.step,
            enabled=cfg.logging.progress and self.is_main,
        )
        previous = signal.getsignal(signal.SIGINT)
        if threading_is_main():
            signal.signal(signal.SIGINT, self._on_sigint)
        self._start_async()
        try:
            return self._train_loop(eval_before, bar, previous)
        finally:
            self._stop_async()

    def _train_loop(
        self, eval_before: dict[str, float] | None, bar: Any, previous: Any
    ) -> TrainResult:
        """The steps, then the final checkpoint, evaluation and export (see `train`)."""
        cfg = self.cfg
        interrupted = False
        metrics: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                start_state = (self.sampler.state_dict(), ckpt.rng_state())
                try:
                    metrics = self.train_step()
                except KeyboardInterrupt:
                    # Interrupted during the rollout: no weight changed yet, so rewind this step's
                    # sampler/RNG and checkpoint the end of the previous step.
                    self.sampler.load_state_dict(start_state[0])
                    ckpt.set_rng_state(start_state[1])
                    if self.ahead is not None:  # batches sampled in this step go back too
                        self.ahead.undo_fill()
                    interrupted = True
                    break
                self.step += 1
                metrics["step"] = self.step
                if self.logger is not None:
                    self.logger.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(progress_postfix(metrics), refresh=True)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                    self._record_eval(f"step {self.step}")
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                if self._interrupt_requested:
                    interrupted = True
                    break
        finally:
            bar.close()
            if threading_is_main():
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            if cfg.checkpoint.on_interrupt:
                path = self.save_checkpoint(gather=False)
                self._say(
                    f"interrupted: checkpoint saved to {path}; continue with --resume {self.run_dir}"
                )
            return self._result(True, eval_before, None, metrics, None)
        if cfg.checkpoint.every == 0 or self.step % cfg.checkpoint.every:
            self.save_checkpoint()
        self._stop_async()  # the engine is the main thread's again, with the final weights
        eval_after = self._record_eval("after") if cfg.eval.after and self.eval_problems else None
        export = self._export()
        result = self._result(False, eval_before, eval_after, metrics, export)
        if self.is_main:
            self._say(format_summary(result))
        return result

    def _start_async(self) -> None:
        """``rollout.async_steps > 0``: start the engine worker and the batches ahead.

        On a CPU the two threads split torch's intra-op threads (`split_cpu_threads`: each
        thread's count is its own), else both would start a full OpenMP team on the same cores.
        """
        n = self.cfg.rollout.async_steps
        if not n or self.ahead is not None:
            return
        from alp_agents.rollout.worker import EngineWorker, split_cpu_threads

        worker_threads = None
        self._threads_before = torch.get_num_threads()
        if self.device.type == "cpu":
            trainer_threads, worker_threads = split_cpu_threads(self._threads_before)
            torch.set_num_threads(trainer_threads)
        worker = EngineWorker(self.engine, version=self.step, threads=worker_threads)
        self.ahead = AheadRollouts(
            worker,
            ahead=n,
            last_step=self.cfg.steps,
            sample=self._sample_problems,
            roll_out=self._roll_out,
        )
        self.ahead.restore(self._restored_batches)
        self._restored_batches = []

    def _stop_async(self) -> None:
        """Stop the worker (queued batches dropped, a running one stopped, thread joined) and
        give the engine the trainer's weights again. Safe to call twice."""
        if self.ahead is None:
            return
        ahead, self.ahead = self.ahead, None
        ahead.close()
        torch.set_num_threads(self._threads_before)
        self.engine_sync()

    def _export(self) -> Path | None:
        """The plain ``from_pretrained`` export in ``run_dir/final`` (if configured)."""
        if not self.cfg.checkpoint.export:
            return None
        state = (
            self.dist.full_state_dict(self.model, all_ranks=False) if self.dist.is_fsdp else None
        )
        if not self.is_main:
            return None
        return ckpt.save_export(
            self._unwrapped(), self.tokenizer, self.run_dir / "final", state_dict=state
        )

    def _result(self, interrupted, before, after, metrics, export) -> TrainResult:
        plots: dict[str, Path] = {}
        if self.logger is not None:
            with contextlib.suppress(Exception):
                self.logger.close()
            if self.cfg.logging.plots:
                from alp_agents.reporting.plots import plot_run

                plots = plot_run(self.run_dir)
        return TrainResult(
            self.run_dir, self.step, interrupted, before, after, metrics, export, plots
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        busy = self.update.in_progress or self._saving
        if busy and not self._interrupt_requested:
            # Finish the optimiser steps of this batch (or the checkpoint being written, which
            # asynchronously waits for the batches rolled out ahead) so the checkpoint is a
            # clean step boundary.
            self._interrupt_requested = True
            self._say(
                "\nCtrl-C: finishing this update, then saving a checkpoint (Ctrl-C again to abort) ..."
            )
            return
        raise KeyboardInterrupt

    def _say(self, text: str) -> None:
        if self.is_main:
            say(text)

    def _warn(self, text: str) -> None:
        self._say(f"WARNING: {text}")
        if self.logger is not None:
            with contextlib.suppress(Exception):
                self.logger.log(self.step, {"warning/nonfinite_step": float(self.step)})


# --------------------------------------------------------------------------------------------
# Module-level helpers
# --------------------------------------------------------------------------------------------
def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one process's episodes of one step (sampling and environments); 31 bits,
    the range the rollout's own seed arithmetic was written for."""
    return derive_seed("rollout", seed, step, rank, bits=31)


def _state_dict_from_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _trajectory_sample(t: Trajectory, tokenizer: Any, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "problem_id": t.problem_id,
        "group_id": t.group_id,
        "reward": float(t.reward),
        "finish_reason": str(t.finish_reason),
        "num_turns": int(t.num_turns),
        "num_tool_calls": int(t.num_tool_calls),
        "prompt": tokenizer.decode(t.prompt_ids),
        "response": tokenizer.decode(t.response_ids),
    }
