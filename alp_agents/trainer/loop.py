"""ALPTrainer: the on-line RL loop (rollout -> grade -> advantage -> K updates -> sync -> log).

One training step, as the issue and ALP_SPEC.md (sections 2-5) describe it:

1. sample ``prompts_per_step`` problems from a seeded sampler (its position is checkpointed);
2. run ``group_size`` episodes per problem with the inference engine (the environment grades);
3. drop infrastructure failures (counted), compute GRPO advantages over each group (void-turn
   trajectories count in the group statistics, but are masked out of the loss by default);
4. if the preset needs it, recompute pi_old (no perturbation); if ``kl_coef > 0`` compute the
   reference log-probs;
5. split the batch into K mini-batches and take one optimiser step per mini-batch (the later
   mini-batches are genuinely stale); each mini-batch is run as micro-batches with gradient
   accumulation; the layerwise perturbation is ON only in this forward (ratio numerator);
6. sync the new weights into the engine (never sigma), log every metric of ALP_SPEC section 4,
   evaluate on held-out problems every N steps, checkpoint every N steps.

Everything is configured by :class:`TrainConfig` (nested dataclasses, YAML + command line via
``alp_agents.configs.loader``). The same code runs on one CPU, one GPU or many processes under
``accelerate launch`` (each process rolls out its own shard of the problems; gradients are
all-reduced by DDP).

Example (tiny random model, seconds)::

    from alp_agents.trainer.loop import ALPTrainer, TrainConfig
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
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alp_agents.configs.train import (
    TINY_MODEL_PREFIX,
    TrainConfig,
    TrainConfigError,
    eval_dataset,
    loss_config,
    validate_config,
)
from alp_agents.learner.batching import first_scored_columns, mini_batch_rows, trim_shared_padding
from alp_agents.models import DEFAULT_MODEL, make_lm_head_input_contiguous
from alp_agents.reporting.console import (
    format_summary,
    progress_bar,
    progress_postfix,
    say,
    without_step_label,
)
from alp_agents.rollout.stats import episode_stats
from alp_agents.trainer import checkpoint as ckpt
from alp_agents.trainer.optim import lr_lambda
from alp_agents.trainer.problems import ProblemSampler

if TYPE_CHECKING:
    from alp_agents.learner.objectives import LossTerms

TRAJECTORY_SAMPLES_FILE = "trajectories.jsonl"
HELDOUT_SAMPLES_FILE = "heldout.jsonl"  # per held-out sample: label, problem id, reward


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class TrainingDivergedError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
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

        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.device = self.accelerator.device
        from alp_agents.models.precision import resolve_autocast

        self.autocast = resolve_autocast(config.model.autocast, self.device)  # "bf16" | "none"
        self.is_main = self.accelerator.is_main_process
        self._check_distributed_type()
        torch.manual_seed(config.seed)

        import envs

        opts = config.env.dataset_options
        self.train_problems = envs.load_dataset(
            config.env.dataset, split=config.env.train_split, **opts
        )
        self.eval_problems = (
            envs.load_dataset(eval_dataset(config), split=config.env.eval_split, **opts)[
                : config.eval.num_problems
            ]
            if config.eval.num_problems > 0
            else []
        )
        self.sampler = ProblemSampler(len(self.train_problems), config.seed)

        from alp_agents.models import load_tokenizer

        self.tokenizer = (
            tokenizer
            if tokenizer is not None
            else load_tokenizer(
                config.model.name
                if not config.model.name.startswith(TINY_MODEL_PREFIX)
                else DEFAULT_MODEL
            )
        )
        # The KL reference is the model the run STARTED from, also after a resume.
        needs_ref = self.loss_cfg.needs_ref_logprobs
        initial = None
        if model is None:
            model = self._load_model(resume["model_dir"] if resume else None)
            if resume and needs_ref:
                initial = self._load_model(None)
        elif resume:
            if needs_ref:
                initial = copy.deepcopy(model)
            model.load_state_dict(_state_dict_from_dir(resume["model_dir"]), strict=False)
        self.model = make_lm_head_input_contiguous(model.to(self.device))
        if self.model.config._attn_implementation != config.model.attn_implementation:
            self.model.set_attn_implementation(config.model.attn_implementation)
        if config.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()

        # Engine and reference model are built from the unperturbed weights, before hooks exist.
        self.engine = self._make_engine()
        self.ref_model = None
        if needs_ref:
            ref = copy.deepcopy(self.model) if initial is None else initial.to(self.device)
            ref.eval().requires_grad_(False)
            if ref.config._attn_implementation != config.model.attn_implementation:
                ref.set_attn_implementation(config.model.attn_implementation)
            self.ref_model = make_lm_head_input_contiguous(ref)

        self.perturbation = None
        if self.loss_cfg.perturbation:
            from alp_agents.learner.perturb import LayerwisePerturbation

            p = config.perturbation
            self.perturbation = LayerwisePerturbation(
                self.model,
                sigma_init=p.sigma_init,
                learnable=p.learnable,
                layers=p.layers,
                target=p.target,
                store_noise=p.store_noise,
            )
            if resume and resume["perturbation"] is not None:
                self.perturbation.load_state_dict(resume["perturbation"])
            self._warn_if_noise_unresolved()

        self.optimizer = self._make_optimizer()
        total_updates = config.steps * config.algorithm.mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(
                config.optim.lr_schedule,
                total_updates,
                config.optim.warmup_steps,
                config.optim.min_lr_ratio,
            ),
        )
        # accelerate's FSDP2 preparation swaps every optimiser parameter for its sharded twin
        # and fails on one that is not in the model: sigma's group joins after the sharding.
        outside = []
        if self._is_fsdp():
            groups = self.optimizer.param_groups
            outside = [g for g in groups if g.get("name") == "sigma"]
            groups[:] = [g for g in groups if g.get("name") != "sigma"]
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.optimizer.param_groups.extend(outside)
        if self.accelerator.num_processes > 1:
            # The engine and the reference model were built from this rank's own copy, before
            # prepare made the ranks agree (DDP broadcasts rank 0's weights; FSDP's memory-
            # efficient loading gives the other ranks empty weights until then): sync them.
            state = self._full_state_dict(all_ranks=True)
            self.engine.update_weights(state)
            if self.ref_model is not None and not resume:
                self.ref_model.load_state_dict(state)
            elif self.ref_model is not None:  # resumed: rank 0's initial model, everywhere
                for tensor in self.ref_model.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)

        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_updates = 0
        self.eval_history: list[dict[str, Any]] = []
        if resume:
            self.optimizer.load_state_dict(resume["optimizer"])
            if self._is_fsdp():
                self._shard_optimizer_state()
            if resume["scheduler"] is not None:
                self.scheduler.load_state_dict(resume["scheduler"])
            ts = resume["trainer_state"]
            self.step = int(ts["step"])
            self.nonfinite_in_row = int(ts.get("nonfinite_in_row", 0))
            self.skipped_updates = int(ts.get("skipped_updates", 0))
            self.eval_history = list(ts.get("eval_history", []))
            self.sampler.load_state_dict(ts["sampler"])
            rngs = resume.get("rng_per_rank")
            if rngs and len(rngs) == self.accelerator.num_processes:
                ckpt.set_rng_state(rngs[self.accelerator.process_index])
            else:
                ckpt.set_rng_state(resume["rng"])
            self.engine_sync()
        self.run_dir = self._resolve_run_dir(resume_from)
        self.logger = self._make_logger(resume_step=self.step if resume else None)
        self._interrupt_requested = False
        self._in_update = False

    # ---------------------------------------------------------------- construction helpers
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

    def _load_model(self, path: Path | None) -> Any:
        from alp_agents.models import load_model, make_tiny_model

        dtype = getattr(torch, self.cfg.model.dtype)
        if path is not None:
            return load_model(str(path), dtype=dtype)
        name = self.cfg.model.name
        if name.startswith(TINY_MODEL_PREFIX):
            return make_tiny_model(
                arch=name[len(TINY_MODEL_PREFIX) :],
                tokenizer=self.tokenizer,
                seed=self.cfg.seed,
                dtype=dtype,
            )
        return load_model(name, dtype=dtype)

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

    def _unwrapped(self) -> Any:
        return (
            self.accelerator.unwrap_model(self.model)
            if hasattr(self, "accelerator")
            else self.model
        )

    def _resolve_run_dir(self, resume_from: str | os.PathLike | None) -> Path:
        if resume_from is not None:
            return Path(resume_from).resolve().parent.parent
        if self.cfg.logging.run_dir:
            return Path(self.cfg.logging.run_dir)
        from alp_agents.reporting.runlog import make_run_dir

        if self.accelerator.num_processes == 1:
            return make_run_dir("runs", self.cfg.logging.name)
        # One fresh directory for the whole run: the main process makes it, the others use it.
        from accelerate.utils import broadcast_object_list

        made = [str(make_run_dir("runs", self.cfg.logging.name)) if self.is_main else None]
        broadcast_object_list(made, from_process=0)
        return Path(made[0])

    # ---------------------------------------------------------------- multi-process helpers
    def _check_distributed_type(self) -> None:
        from accelerate.utils import DistributedType

        world = self.accelerator.num_processes
        r = self.cfg.rollout
        if world > 1 and r.prompts_per_step % world:
            # Uneven shards give the ranks different numbers of forwards (under FSDP each one is
            # a collective) or, short of trajectories, of mini-batch all-reduces: the processes
            # then wait for each other forever.
            raise TrainConfigError(
                f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of the "
                f"number of processes ({world}): each process rolls out the same number of them"
            )
        per_process = r.prompts_per_step // world * r.group_size
        if world > 1 and self.cfg.algorithm.mini_batches > per_process:
            raise TrainConfigError(
                f"algorithm.mini_batches={self.cfg.algorithm.mini_batches}: more mini-batches "
                f"than trajectories per process ({r.prompts_per_step // world} x {r.group_size})"
            )
        kind = self.accelerator.distributed_type
        asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if asked and kind != DistributedType.FSDP:
            # accelerate only turns FSDP on over GPU-like devices; CPU processes get plain DDP.
            self._say(
                f"WARNING: accelerate was asked for FSDP but runs {kind.value} (it does not "
                "shard models over CPU processes): every process holds the full model and the "
                "gradients are all-reduced as with DDP."
            )
        if kind == DistributedType.FSDP and not self.accelerator.is_fsdp2:
            raise RuntimeError(
                "ALPTrainer supports FSDP2 only (fsdp_version: 2 in the accelerate config): under "
                "FSDP1 the optimiser's sigma group, gradient clipping and the full state dict "
                "for checkpoints and engine sync are not handled."
            )

    def _fewest_kept_over_ranks(self, kept: int) -> int:
        """The smallest number of usable trajectories on any process (``kept`` when alone)."""
        if self.accelerator.num_processes == 1:
            return kept
        count = torch.tensor([kept], device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        return int(count.item())

    def _is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _full_state_dict(self, all_ranks: bool) -> dict[str, torch.Tensor]:
        """The model's full (unsharded) state dict, without the perturbation.

        Under FSDP the shards are gathered (a collective: every process must call this); with
        ``all_ranks=False`` only the main process receives the tensors (accelerate's
        ``get_state_dict``, offloaded to CPU) and the others get ``{}``. Otherwise it is the
        unwrapped model's own ``state_dict()``.
        """
        if not self._is_fsdp():
            return self._unwrapped().state_dict()
        if not all_ranks:
            return self.accelerator.get_state_dict(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))

    def _full_optimizer_state(self) -> dict[str, Any]:
        """``optimizer.state_dict()`` with FSDP-sharded moments gathered into full tensors
        (a collective under FSDP), so a checkpoint resumes on any number of processes."""
        state = self.optimizer.state_dict()
        if not self._is_fsdp():
            return state
        from torch.distributed.tensor import DTensor

        # state_dict() shares the live per-parameter dicts: build new ones, never mutate them.
        state["state"] = {
            pid: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
            for pid, s in state["state"].items()
        }
        return state

    def _shard_optimizer_state(self) -> None:
        """After loading a full optimiser state under FSDP: each rank keeps its own shard."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not isinstance(p, DTensor):
                    continue
                state = self.optimizer.state.get(p, {})
                for k, v in list(state.items()):
                    if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                        state[k] = distribute_tensor(
                            v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                        )

    def _make_logger(self, resume_step: int | None) -> Any:
        if not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_jsonl(self.run_dir / TRAJECTORY_SAMPLES_FILE, resume_step)
            _truncate_jsonl(self.run_dir / HELDOUT_SAMPLES_FILE, resume_step)
        from alp_agents.reporting.runlog import RunLogger

        return RunLogger(
            self.run_dir,
            self.cfg,
            tensorboard=self.cfg.logging.tensorboard,
            resume_step=resume_step,
        )

    # ---------------------------------------------------------------- small operations
    def engine_sync(self) -> None:
        """Copy the trainer's weights into the inference engine (never the perturbation).

        Under FSDP the full weights are gathered first (every process calls this each step).
        """
        if self._is_fsdp():
            self.engine.update_weights(self._full_state_dict(all_ranks=True))
        else:
            self.engine.update_weights(self._unwrapped())

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _env_kwargs(self, split: str | None, dataset: str | None = None) -> dict[str, Any]:
        e = self.cfg.env
        kwargs: dict[str, Any] = {"dataset": dataset or e.dataset, "split": split}
        if e.dataset_options:
            kwargs["dataset_options"] = dict(e.dataset_options)
        return {**kwargs, **e.kwargs}

    def _sampling(self, temperature: float, top_p: float, max_tokens: int) -> Any:
        from alp_agents.rollout.engines import SamplingParams

        return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)

    def _log_probs(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        score_from: torch.Tensor,
        entropy: bool = False,
        share_prefixes: bool = True,
    ) -> Any:
        """``(B, L)`` float32 log-probs (and entropies if asked) under the configured autocast.

        Only columns from ``score_from`` on (the first model token of each row) are computed;
        earlier ones are 0 and never read (the loss and metrics mask them). Rows of one prompt
        share its forward when ``algorithm.share_prefixes`` and ``share_prefixes`` both allow.
        """
        from alp_agents.learner.logprobs import token_logprobs

        with self._autocast():
            return token_logprobs(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                self.cfg.rollout.temperature,
                return_entropy=entropy,
                score_from=score_from,
                share_prefixes=self.cfg.algorithm.share_prefixes and share_prefixes,
            )

    # ---------------------------------------------------------------- rollout
    def rollout(self) -> tuple[list[Any], dict[str, float]]:
        """Sample this step's problems and run the episodes (this process's shard)."""
        from alp_agents.rollout.agent_loop import run_episodes

        cfg = self.cfg
        idx = self.sampler.take(cfg.rollout.prompts_per_step)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        problems = [self.train_problems[i] for i in idx][rank::world]
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        trajs = run_episodes(
            cfg.env.id,
            self.engine,
            self.tokenizer,
            problems,
            cfg.rollout.group_size,
            self._sampling(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_tokens),
            env_kwargs=self._env_kwargs(cfg.env.train_split),
            max_turns=cfg.env.max_turns,
            progress=cfg.logging.progress and self.is_main,
            seed=_step_seed(cfg.seed, self.step, rank),
            stats=stats,
        )
        out = {"time/rollout_s": time.perf_counter() - t0}
        for key in ("generate_s", "env_s"):
            if key in stats:
                out[f"time/rollout_{key}"] = float(stats[key])
        if "generated_tokens" in stats:
            out["throughput/generated_tokens_per_s"] = float(stats["generated_tokens"]) / max(
                1e-9, out["time/rollout_s"]
            )
        return trajs, out

    # ---------------------------------------------------------------- one training step
    def train_step(self) -> dict[str, float]:
        """One full step: rollout, advantages, K mini-batch updates, weight sync. Returns metrics."""
        from alp_agents.learner.advantages import grpo_advantages
        from alp_agents.learner.objectives import final_loss_mask
        from alp_agents.rollout.trajectory import collate

        cfg = self.cfg
        t_step = time.perf_counter()
        trajs, metrics = self.rollout()
        metrics.update(episode_stats(trajs))
        self._save_trajectory_samples(trajs)

        infra = [bool(getattr(t, "is_infra_failure", False)) for t in trajs]
        kept = [t for t, bad in zip(trajs, infra, strict=False) if not bad]
        metrics["batch/infra_failures"] = float(sum(infra))
        metrics["batch/trajectories"] = float(len(kept))
        if self._fewest_kept_over_ranks(len(kept)) == 0:
            # Every rank skips together: one skipping alone would leave the others waiting
            # in the gradient all-reduce.
            metrics["batch/skipped_no_data"] = 1.0
            return metrics

        void = torch.tensor([bool(getattr(t, "is_void", False)) for t in kept])
        rewards = torch.tensor([float(t.reward) for t in kept])
        group_ids = [t.group_id for t in kept]
        valid = None if cfg.rollout.void_in_group_stats else ~void
        adv = grpo_advantages(
            rewards,
            group_ids,
            scale_by_std=self.loss_cfg.scale_advantages_by_std,
            eps=cfg.algorithm.advantage_eps,
            valid=valid,
        )
        batch = collate(kept, pad_token_id=self.tokenizer.pad_token_id)
        # Before void rows lose their mask: where each row's model tokens start.
        score_from = first_scored_columns(batch["loss_mask"])
        loss_mask = batch["loss_mask"].float()
        if cfg.rollout.mask_void_turns:
            loss_mask[void] = 0.0
        batch["loss_mask"] = loss_mask
        batch["advantages"] = adv.float()
        metrics["batch/void_masked"] = float(void.sum()) if cfg.rollout.mask_void_turns else 0.0
        metrics["advantage/abs_mean"] = float(adv.abs().mean())
        metrics["advantage/zero_groups_ratio"] = _zero_group_ratio(adv, group_ids)

        t_upd = time.perf_counter()
        # pi_old for every preset: the denominator of GRPO-style ratios, the rejection rules of
        # MIS-style ones, and for all of them the engine mismatch clean of noise and staleness.
        old_lp = self._no_grad_logprobs(self._unwrapped(), batch, group_ids, score_from)
        ref_lp = None
        if self.ref_model is not None:
            ref_lp = self._no_grad_logprobs(self.ref_model, batch, group_ids, score_from)
        metrics.update(self._batch_metrics(batch, old_lp))
        # Rejection depends on pi_old / mu only: known now, so every micro-batch of a mini-batch
        # shares the normaliser of the tokens that will really count.
        batch["final_mask"] = final_loss_mask(
            old_lp, batch["infer_logprobs"], batch["loss_mask"], self.loss_cfg
        )
        metrics.update(self._update(batch, old_lp, ref_lp, group_ids, score_from))
        metrics["time/update_s"] = time.perf_counter() - t_upd
        metrics["throughput/update_tokens_per_s"] = float(batch["attention_mask"].sum()) / max(
            1e-9, metrics["time/update_s"]
        )

        t_sync = time.perf_counter()
        self.engine_sync()
        metrics["time/sync_s"] = time.perf_counter() - t_sync
        metrics["time/step_s"] = time.perf_counter() - t_step
        return metrics

    def _no_grad_logprobs(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        group_ids: Sequence[Any],
        score_from: torch.Tensor,
    ) -> torch.Tensor:
        """pi_old / reference log-probs of the whole batch, in micro-batches of whole groups.

        No activation is kept for backward here, so micro-batches are 4x the training ones:
        fewer, larger forwards amortise the per-forward cost (autocast's weight casts, kernel
        launches), which dominates at this model size.
        """
        out = torch.zeros_like(batch["loss_mask"], dtype=torch.float32)
        [ordered] = mini_batch_rows(group_ids, 1)
        rows_all = torch.tensor(ordered)
        mbs = 4 * self.cfg.algorithm.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(ordered), mbs):
                rows = rows_all[start : start + mbs]
                sub = trim_shared_padding(
                    {k: batch[k][rows] for k in ("input_ids", "attention_mask")}
                )
                lp = self._log_probs(model, sub, score_from[rows])
                out[rows, : lp.shape[1]] = lp
        return out

    def _update(
        self,
        batch: dict[str, torch.Tensor],
        old_lp: torch.Tensor,
        ref_lp: torch.Tensor | None,
        group_ids: Sequence[Any],
        score_from: torch.Tensor,
    ) -> dict[str, float]:
        """K mini-batches, one optimiser step each, micro-batched gradient accumulation.

        Micro-batch losses share the mini-batch's count of loss tokens (or sequences) AFTER
        rejection (``batch["final_mask"]``) as normaliser, so their gradients add up to the loss
        of one call on the whole mini-batch whatever the micro-batch size.
        """
        from alp_agents.learner.objectives import accumulation_normalizer, policy_loss_terms

        cfg = self.cfg
        g = None
        if cfg.algorithm.shuffle:
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, self.step, 7))
        numerators = torch.zeros_like(batch["loss_mask"])  # log-prob in the ratio numerator
        mini_batches = mini_batch_rows(group_ids, cfg.algorithm.mini_batches, g)
        loss_metrics: list[tuple[float, dict[str, float]]] = []
        sums: Counter = Counter()
        noise_effect = Counter()  # |perturbed - unperturbed| log-prob on the first mini-batch
        rank = self.accelerator.process_index
        self._in_update = True
        try:
            for k, mb in enumerate(mini_batches):
                rows_mb = torch.tensor(mb)
                normalizer = accumulation_normalizer(batch["final_mask"][rows_mb], self.loss_cfg)
                micro = [
                    rows_mb[i : i + cfg.algorithm.micro_batch_size]
                    for i in range(0, len(rows_mb), cfg.algorithm.micro_batch_size)
                ]
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                mb_loss = 0.0
                for j, rows in enumerate(micro):
                    sub = trim_shared_padding(
                        {key: v[rows] for key, v in batch.items() if v.dim() == 2}
                    )
                    width = sub["input_ids"].shape[1]
                    last = j == len(micro) - 1
                    ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
                    seed = noise_seed(cfg.seed, self.step, rank, k, j)
                    with ctx, self._perturbed(seed=seed):
                        lp, ent = self._numerator_logprobs(sub, score_from[rows])
                        if not bool(torch.isfinite(lp[sub["loss_mask"] > 0]).all()):
                            # A NaN/inf forward (overflow, corrupted weights): no loss; the
                            # whole mini-batch update is skipped below. With several processes
                            # a (NaN) backward still runs, so the gradient all-reduce happens on
                            # every rank and makes all of them skip this update together.
                            finite = False
                            mb_loss = float("nan")
                            if self.accelerator.num_processes > 1:
                                self.accelerator.backward(lp.sum() * 0.0)
                            continue
                        terms = policy_loss_terms(
                            lp,
                            sub["infer_logprobs"],
                            batch["advantages"][rows],
                            sub["loss_mask"],
                            self.loss_cfg,
                            old_logprobs=old_lp[rows, :width],
                            turn_index=sub["turn_index"],
                            ref_logprobs=None if ref_lp is None else ref_lp[rows, :width],
                            entropy=ent,
                            normalizer=normalizer,
                            final_mask=sub["final_mask"],
                        )
                        finite = finite and bool(torch.isfinite(terms.total))
                        self._backward(terms)
                    numerators[rows, :width] = lp.detach()
                    if k == 0 and self.perturbation is not None:
                        # Same weights as pi_old: the difference is what the noise did.
                        scored = sub["loss_mask"] > 0
                        diff = (lp.detach() - old_lp[rows, :width])[scored].abs()
                        noise_effect["sum"] += float(diff.sum())
                        noise_effect["n"] += int(diff.numel())
                    mb_loss += float(terms.total.detach())
                    loss_metrics.append((float(sub["loss_mask"].sum()), terms.metrics))
                if self.perturbation is not None and self.accelerator.num_processes > 1:
                    self.perturbation.all_reduce_grads()  # sigma is not a DDP parameter
                sigma_grad = self._sigma_grad_norm()
                grad_norm = self._clip_grads()
                if not finite or not math.isfinite(grad_norm):
                    self._skip_update(k, mb_loss, grad_norm, finite)
                    sums["update/skipped"] += 1
                    continue
                self.nonfinite_in_row = 0
                self.optimizer.step()
                self.scheduler.step()
                sums["update/steps"] += 1
                sums["update/grad_norm"] += grad_norm
                sums["update/loss"] += mb_loss
                if sigma_grad is not None:
                    sums["sigma/grad_norm"] += sigma_grad
        finally:
            self._in_update = False
        done = max(1, sums["update/steps"])
        out = {
            "update/steps": float(sums["update/steps"]),
            "update/skipped": float(sums["update/skipped"]),
            "update/grad_norm": sums["update/grad_norm"] / done,
            "update/loss": sums["update/loss"] / done,
            "update/lr": float(self.scheduler.get_last_lr()[0]),
        }
        if self.perturbation is not None:
            out["sigma/grad_norm"] = sums["sigma/grad_norm"] / done
            out.update(self._sigma_metrics())
            if noise_effect["n"]:
                out["perturbation/logprob_change"] = noise_effect["sum"] / noise_effect["n"]
        out.update(_weighted_mean(loss_metrics, keep=_MICRO_METRIC_PREFIXES))
        out.update(self._step_ratio_metrics(batch, numerators, old_lp))
        return out

    def _numerator_logprobs(
        self, sub: dict[str, torch.Tensor], score_from: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ratio numerator's log-probs (with grad) and, if the loss needs it, the entropy.

        Rows of one prompt share the prompt's forward (``algorithm.share_prefixes``) except
        under a hidden-state perturbation: the spec draws noise per token of EACH row, and a
        shared prompt would give every row of a group the same noise on it (and the same
        perturbed distribution for its first token), correlating their ratios.
        """
        per_row_noise = self.perturbation is not None and self.perturbation.target == "hidden"
        entropy = self.loss_cfg.needs_entropy
        out = self._log_probs(
            self.model, sub, score_from, entropy=entropy, share_prefixes=not per_row_noise
        )
        return out if entropy else (out, None)

    def _backward(self, terms: LossTerms) -> None:
        """Backward of ``terms.total``, keeping the regulariser's gradient away from sigma.

        sigma learns only from the policy loss (ALP_SPEC section 1). The KL/entropy terms are
        computed on the perturbed log-probs, so their gradient also reaches sigma; it is taken
        apart first (a backward to sigma alone) and subtracted after the full backward.
        """
        sigma = None
        if self.perturbation is not None and (
            self.loss_cfg.kl_coef > 0 or self.loss_cfg.entropy_coef > 0
        ):
            sigma = next(iter(self.perturbation.parameters()), None)
        regularizer_grad = None
        if sigma is not None and terms.regularizer.requires_grad:
            (regularizer_grad,) = torch.autograd.grad(
                terms.regularizer, [sigma], retain_graph=True, allow_unused=True
            )
        self.accelerator.backward(terms.total)
        if regularizer_grad is not None and sigma.grad is not None:
            sigma.grad.sub_(regularizer_grad)

    def _skip_update(self, k: int, loss: float, grad_norm: float, loss_finite: bool) -> None:
        """Drop a non-finite update (weights untouched); stop after too many in a row."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.skipped_updates += 1
        what = "gradient" if loss_finite else "loss"
        self._warn(
            f"step {self.step + 1} mini-batch {k}: non-finite {what} (loss={loss}, "
            f"grad_norm={grad_norm}); update skipped "
            f"({self.nonfinite_in_row}/{cfg.max_nonfinite_in_row} in a row)"
        )
        if self.nonfinite_in_row >= cfg.max_nonfinite_in_row:
            raise TrainingDivergedError(
                f"{self.nonfinite_in_row} consecutive optimiser steps had a non-finite loss or "
                f"gradient (last: step {self.step + 1}, mini-batch {k}, loss={loss}, "
                f"grad_norm={grad_norm}). Training stopped; the weights are those of the last "
                f"finite update and no checkpoint of a non-finite state was written. Lower "
                f"optim.lr, check the data and rewards, or raise max_nonfinite_in_row."
            )

    def _batch_metrics(
        self, batch: dict[str, torch.Tensor], old_lp: torch.Tensor
    ) -> dict[str, float]:
        """Before any update: the engine mismatch and the correction weights of the whole batch.

        ``mismatch/*`` compares the trainer's unperturbed log-probs at the start of the step
        (pi_old) with the engine's (mu): the train/inference gap alone, clean of the noise and of
        the staleness that the update's own ratio (``mismatch_update/*``) also contains.
        ``correction/*`` are batch values of the weighting/rejection (ESS, weights, dropped).
        """
        from alp_agents.learner import metrics as M
        from alp_agents.learner.objectives import correction_batch_stats

        m = batch["loss_mask"].float()
        out = M.to_floats(
            M.mismatch_stats(
                old_lp,
                batch["infer_logprobs"],
                m,
                catastrophic=self.cfg.algorithm.catastrophic_ratio,
            )
        )
        out.update(correction_batch_stats(old_lp, batch["infer_logprobs"], m, self.loss_cfg))
        return out

    def _step_ratio_metrics(
        self,
        batch: dict[str, torch.Tensor],
        numerators: torch.Tensor,
        old_lp: torch.Tensor,
    ) -> dict[str, float]:
        """Ratio quantiles, clip fractions and envelopes over the WHOLE step.

        Quantiles of per-micro-batch quantiles would be meaningless, so the loss forward's
        log-probs are collected and the same functions policy_loss uses run once on all of them.
        Ratio quantiles and clip fractions are over the tokens that stayed in the loss (after
        MIS-style rejection); ``seq_log_ratio/*`` is the sequence log-ratio of the method's own
        ratio, ``seq_log_ratio_engine/*`` that of the numerator over the engine's mu, the same
        quantity for every preset (for ALP and Bypass the two coincide).
        """
        from alp_agents.learner import metrics as M
        from alp_agents.learner.objectives import log_ratio

        c = self.loss_cfg
        m = batch["loss_mask"].float()
        kept = batch["final_mask"].float()
        zeros = torch.zeros_like(m)
        lp = torch.where(m > 0, numerators.float(), zeros)
        infer = torch.where(m > 0, batch["infer_logprobs"].float(), zeros)
        old = torch.where(m > 0, old_lp.float(), zeros)
        den = infer if c.denominator == "infer" else old
        ratio = (
            log_ratio(lp, den, m, c, batch["turn_index"])
            .clamp(-c.log_ratio_clamp, c.log_ratio_clamp)
            .exp()
        )
        adv = batch["advantages"][:, None].expand_as(m)
        stats: dict[str, Any] = {}
        stats.update(M.ratio_stats(ratio, kept))
        stats.update(M.seq_log_ratio_stats(lp - den, m))
        stats.update(M.seq_log_ratio_stats(lp - infer, m, prefix="seq_log_ratio_engine"))
        stats.update(M.clip_fractions(ratio, adv, kept, c.eps_low, c.eps_high, c.dual_clip))
        stats.update(M.mismatch_stats(lp, infer, m, prefix="mismatch_update"))
        denom = m.sum().clamp_min(1)
        stats["entropy/sampled_nll"] = -(lp * m).sum() / denom
        stats["tokens/loss"] = kept.sum()
        stats["tokens/before_rejection"] = m.sum()
        return M.to_floats(stats)

    @contextlib.contextmanager
    def _perturbed(self, seed: int) -> Iterator[None]:
        if self.perturbation is None:
            yield
        else:
            with self.perturbation.active(seed=seed):
                yield

    def _clip_grads(self) -> float:
        """Clip the policy's gradient (sigma's is left alone); its norm before clipping.

        sigma is kept out so that ALP and the presets without it clip the same gradient: its
        log-sigma gradient sums over every token and channel and can dwarf the model's (its
        own norm is logged as ``sigma/grad_norm``; Adam normalises its step anyway).
        """
        params = [
            p for g in self.optimizer.param_groups if g.get("name") != "sigma" for p in g["params"]
        ]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if not self._is_fsdp():
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        # FSDP: the model's gradients are sharded DTensors and sigma's is a plain tensor, which
        # torch cannot stack into one norm; take each norm (the sharded one over all ranks).
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        norms = []
        if sharded:
            norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
        if plain:
            norms.append(torch.nn.utils.get_total_norm(plain))
        if not norms:
            return 0.0
        total = torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms]))
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
        return float(total)

    def _sigma_grad_norm(self) -> float | None:
        if self.perturbation is None:
            return None
        grads = [p.grad for p in self.perturbation.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def _sigma_metrics(self) -> dict[str, float]:
        """sigma per layer (``sigma/layer_XX``), mean/min/max, realised noise RMS if rounded."""
        out = self.perturbation.metrics()
        out.pop("sigma/grad_norm", None)  # the trainer logs the mean over this step's updates
        return out

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation with the (synced, unperturbed) inference engine."""
        if not self.eval_problems:
            return {}
        from alp_agents.evaluation.runner import evaluate_with_engine

        e = self.cfg.eval
        result = evaluate_with_engine(
            self.engine,
            self.tokenizer,
            self.cfg.env.id,
            self.eval_problems,
            k=e.k,
            sampling=self._sampling(
                e.temperature, e.top_p, e.max_tokens or self.cfg.rollout.max_tokens
            ),
            env_kwargs=self._env_kwargs(self.cfg.env.eval_split, eval_dataset(self.cfg)),
            seed=self.cfg.seed + 12345,
            progress=self.cfg.logging.progress and self.is_main,
            max_turns=self.cfg.env.max_turns,
        )
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

    # ---------------------------------------------------------------- checkpointing
    def save_checkpoint(self, gather: bool = True) -> Path | None:
        """Write ``run_dir/checkpoints/step_N``; returns its path (None on other processes).

        Multi-process, every process must call it: the RNG states of all ranks (and under FSDP
        the model and optimiser shards) are gathered; only the main process writes. With
        ``gather=False`` (Ctrl-C under DDP, where the ranks may have stopped at different
        points) the main process writes alone and a resume gives every rank rank 0's RNGs.
        """
        gather = gather or self._is_fsdp()  # sharded weights can only be saved together
        model_state = self._full_state_dict(all_ranks=False) if self._is_fsdp() else None
        optimizer_state = self._full_optimizer_state()
        rng = ckpt.rng_state()
        rng_per_rank = None
        if gather and self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rng_per_rank = gather_object([rng])
        if not self.is_main:
            return None
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        ckpt.save_training_checkpoint(
            path,
            model=self._unwrapped(),
            model_state=model_state,
            tokenizer=self.tokenizer,
            optimizer=optimizer_state,
            scheduler=self.scheduler,
            perturbation_state=self.perturbation.state_dict() if self.perturbation else None,
            trainer_state={
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "nonfinite_in_row": self.nonfinite_in_row,
                "skipped_updates": self.skipped_updates,
                "eval_history": self.eval_history,
                "config": asdict(self.cfg),
            },
            rng=rng,
            rng_per_rank=rng_per_rank,
            config=self.cfg,
        )
        ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

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
        interrupted = False
        metrics: dict[str, float] = {}
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
        eval_after = self._record_eval("after") if cfg.eval.after and self.eval_problems else None
        export = None
        if cfg.checkpoint.export:
            state = self._full_state_dict(all_ranks=False) if self._is_fsdp() else None
            if self.is_main:
                export = ckpt.save_export(
                    self._unwrapped(), self.tokenizer, self.run_dir / "final", state_dict=state
                )
        result = self._result(False, eval_before, eval_after, metrics, export)
        if self.is_main:
            self._say(format_summary(result))
        return result

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
        if self._in_update and not self._interrupt_requested:
            # Finish the optimiser steps of this batch so the checkpoint is a clean step boundary.
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


def _state_dict_from_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def noise_seed(seed: int, step: int, rank: int, mini_batch: int, micro_batch: int) -> int:
    """The perturbation seed of one micro-batch forward: distinct for every process (under
    DDP/FSDP each rank must draw its own noise), step, mini-batch and micro-batch of a run.

    >>> noise_seed(0, 3, 0, 1, 2) != noise_seed(0, 3, 1, 1, 2)
    True
    """
    import hashlib

    key = f"alp-noise:{seed}:{step}:{rank}:{mini_batch}:{micro_batch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 2**62


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


def _zero_group_ratio(adv: torch.Tensor, group_ids: Sequence[Any]) -> float:
    groups: dict[Any, list[float]] = {}
    for a, g in zip(adv.tolist(), group_ids, strict=False):
        groups.setdefault(g, []).append(a)
    if not groups:
        return 0.0
    return sum(all(abs(a) < 1e-12 for a in v) for v in groups.values()) / len(groups)


# Micro-batch metrics that are per-token means (loss/* are partial sums under a normaliser;
# correction/* are computed once on the whole batch, see ALPTrainer._batch_metrics).
_MICRO_METRIC_PREFIXES = ("entropy",)


def _weighted_mean(
    items: Sequence[tuple[float, dict[str, Any]]], keep: Sequence[str]
) -> dict[str, float]:
    """Token-weighted mean over micro-batches of the loss metrics whose key starts with ``keep``."""
    total: Counter = Counter()
    weight: Counter = Counter()
    for w, m in items:
        for k, v in m.items():
            if not k.startswith(tuple(keep)):
                continue
            fv = float(v) if torch.is_tensor(v) or isinstance(v, (int, float)) else None
            if fv is None or not math.isfinite(fv):
                continue
            total[k] += w * fv
            weight[k] += w
    return {k: total[k] / weight[k] for k in total if weight[k] > 0}


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) <= last_step:
            keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep))


def _trajectory_sample(t: Any, tokenizer: Any, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "problem_id": getattr(t, "problem_id", None),
        "group_id": t.group_id,
        "reward": float(t.reward),
        "finish_reason": str(t.finish_reason),
        "num_turns": int(t.num_turns),
        "num_tool_calls": int(t.num_tool_calls),
        "prompt": tokenizer.decode(t.prompt_ids),
        "response": tokenizer.decode(t.response_ids),
    }


# --------------------------------------------------------------------------------------------
# Command line (train/multi_turn.py and train/single_turn.py are thin wrappers over this)
# --------------------------------------------------------------------------------------------
