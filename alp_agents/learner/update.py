"""The policy update of one training step: pi_old, then K mini-batches, one optimiser step each.

Given a collated batch with advantages (`UpdateBatch`), `PolicyUpdate.run`:

1. computes pi_old (the policy before this step, unperturbed) and, if the loss has a KL term,
   the reference log-probs, both without gradient;
2. measures the engine mismatch of the batch (pi_old vs the engine's mu, clean of noise and
   staleness) and decides the final loss mask (MIS-style rejection depends on pi_old / mu only);
3. splits the batch into K mini-batches of whole prompt groups and takes one optimiser step per
   mini-batch (the later ones are genuinely stale); each mini-batch runs as micro-batches with
   gradient accumulation, and the layerwise perturbation is on only in this forward (the ratio
   numerator), with a seed distinct for every rank, step, mini-batch and micro-batch;
4. skips an update whose loss or gradient is not finite (weights untouched) and raises
   `TrainingDivergedError` after too many in a row;
5. returns the step's metrics (`UpdateResult`): losses, gradient norms, ratio quantiles and
   clip fractions over the whole step, sigma.

The update knows nothing of rollouts, engines or files; what differs on several processes
comes in through a `Collectives` object (the trainer's `DistributedOps`).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from alp_agents.common import derive_seed
from alp_agents.learner.batching import mini_batch_rows, trim_shared_padding

if TYPE_CHECKING:
    from alp_agents.configs.train import TrainConfig
    from alp_agents.learner.objectives import LossTerms, PolicyLossConfig
    from alp_agents.learner.perturb import LayerwisePerturbation
    from alp_agents.rollout.trajectory import Trajectory


class TrainingDivergedError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


class Collectives(Protocol):
    """What the update needs from the accelerator (`alp_agents.trainer.distributed.DistributedOps`)."""

    @property
    def rank(self) -> int: ...

    @property
    def world(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def no_sync(self, model: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager: ...

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float: ...


def noise_seed(seed: int, step: int, rank: int, mini_batch: int, micro_batch: int) -> int:
    """The perturbation seed of one micro-batch forward: distinct for every process (under
    DDP/FSDP each rank must draw its own noise), step, mini-batch and micro-batch of a run.

    >>> noise_seed(0, 3, 0, 1, 2) != noise_seed(0, 3, 1, 1, 2)
    True
    """
    return derive_seed("noise", seed, step, rank, mini_batch, micro_batch)


def shuffle_seed(seed: int, step: int) -> int:
    """The seed of the order in which one step's prompt groups are split into mini-batches."""
    return derive_seed("mini-batches", seed, step)


@dataclass(frozen=True)
class UpdateSettings:
    """The numbers of `TrainConfig` the update reads (see its sections for each meaning)."""

    seed: int
    mini_batches: int
    micro_batch_size: int
    shuffle: bool = True
    share_prefixes: bool = True
    temperature: float = 1.0  # the rollout's: log-probs are of the distribution sampled from
    grad_clip: float = 1.0  # <= 0: no clipping
    catastrophic_ratio: float = 1e4
    max_nonfinite_in_row: int = 3
    autocast: str = "none"  # "bf16" | "none"
    # A mini-batch whose gradient is exactly 0 (every advantage 0, no KL/entropy term) still
    # moves AdamW's weights along its momentum; True skips its optimiser step instead.
    skip_signal_free_steps: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig, autocast: str) -> UpdateSettings:
        """From a `TrainConfig` and its resolved autocast ("bf16" | "none")."""
        a = cfg.algorithm
        return cls(
            seed=cfg.seed,
            mini_batches=a.mini_batches,
            micro_batch_size=a.micro_batch_size,
            shuffle=a.shuffle,
            share_prefixes=a.share_prefixes,
            temperature=cfg.rollout.temperature,
            grad_clip=cfg.optim.grad_clip,
            skip_signal_free_steps=cfg.optim.skip_signal_free_steps,
            catastrophic_ratio=a.catastrophic_ratio,
            max_nonfinite_in_row=cfg.max_nonfinite_in_row,
            autocast=autocast,
        )


@dataclass
class UpdateBatch:
    """One step's trajectories, collated, with what the loss needs.

    ``tensors`` holds ``(B, L)`` ``input_ids``, ``attention_mask``, ``loss_mask`` (float, void
    rows already zeroed where configured), ``infer_logprobs`` (the engine's mu), ``turn_index``
    and ``(B,)`` ``advantages``. ``group_ids`` has one prompt group per row; ``score_from`` is
    each row's first model-token column (taken before any row lost its mask). ``token_lag``
    (asynchronous rollouts only, else None) is ``(B, L)``: how many policy versions the weights
    that sampled each token are behind the trainer's (-1 where unknown or not a token); the
    step's ratio statistics are then also logged per lag.
    """

    tensors: dict[str, torch.Tensor]
    group_ids: Sequence[Any]
    score_from: torch.Tensor
    token_lag: torch.Tensor | None = None

    def move_to(self, device: torch.device | str) -> None:
        """Put every tensor on ``device``, in place: collation builds the batch on the CPU, and
        the model may be on a GPU (no copy where a tensor is there already)."""
        self.tensors = {key: value.to(device) for key, value in self.tensors.items()}
        self.score_from = self.score_from.to(device)
        if self.token_lag is not None:
            self.token_lag = self.token_lag.to(device)


@dataclass
class UpdateResult:
    """What one `PolicyUpdate.run` did: optimiser steps taken and skipped, and its metrics."""

    steps: int
    skipped: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class NonFiniteCounter:
    """Skipped updates: in a row (reset by a finite one) and in the whole run (checkpointed)."""

    in_row: int = 0
    total: int = 0


def build_update_batch(
    trajectories: Sequence[Trajectory],
    *,
    pad_token_id: int,
    scale_by_std: bool,
    eps: float,
    void_in_group_stats: bool = True,
    mask_void_turns: bool = True,
    policy_version: int | None = None,
) -> tuple[UpdateBatch, dict[str, float]]:
    """Collate usable trajectories and attach GRPO advantages; returns the batch and its metrics.

    Void-turn trajectories count in their group's baseline when ``void_in_group_stats`` and
    lose their loss mask when ``mask_void_turns``. Metrics: ``batch/void_masked``,
    ``advantage/abs_mean``, ``advantage/zero_groups_ratio`` (groups whose advantages are all 0,
    so they teach nothing). With ``policy_version`` (the trainer's, asynchronous rollouts) the
    batch carries each token's staleness lag (`UpdateBatch.token_lag`).
    """
    from alp_agents.learner.advantages import grpo_advantages
    from alp_agents.learner.batching import first_scored_columns
    from alp_agents.rollout.trajectory import collate

    void = torch.tensor([t.is_void for t in trajectories], dtype=torch.bool)
    rewards = torch.tensor([float(t.reward) for t in trajectories])
    group_ids = [t.group_id for t in trajectories]
    adv = grpo_advantages(
        rewards,
        group_ids,
        scale_by_std=scale_by_std,
        eps=eps,
        valid=None if void_in_group_stats else ~void,
    )
    tensors = collate(trajectories, pad_token_id=pad_token_id)
    # Before void rows lose their mask: where each row's model tokens start.
    score_from = first_scored_columns(tensors["loss_mask"])
    loss_mask = tensors["loss_mask"].float()
    if mask_void_turns:
        loss_mask[void] = 0.0
    tensors["loss_mask"] = loss_mask
    tensors["advantages"] = adv.float()
    metrics = {
        "batch/void_masked": float(void.sum()) if mask_void_turns else 0.0,
        "advantage/abs_mean": float(adv.abs().mean()),
        "advantage/zero_groups_ratio": zero_advantage_group_ratio(adv, group_ids),
    }
    token_lag = None
    if policy_version is not None:
        version = tensors["policy_version"]
        token_lag = torch.where(
            version >= 0, policy_version - version, torch.full_like(version, -1)
        )
    return UpdateBatch(tensors, group_ids, score_from, token_lag), metrics


def zero_advantage_group_ratio(adv: torch.Tensor, group_ids: Sequence[Any]) -> float:
    """Fraction of groups whose every advantage is 0 (all rewards equal: no signal).

    >>> zero_advantage_group_ratio(torch.tensor([0.0, 0.0, 1.0, -1.0]), ["a", "a", "b", "b"])
    0.5
    """
    groups: dict[Any, list[float]] = {}
    for a, g in zip(adv.tolist(), group_ids, strict=True):
        groups.setdefault(g, []).append(a)
    if not groups:
        return 0.0
    return sum(all(abs(a) < 1e-12 for a in v) for v in groups.values()) / len(groups)


# Micro-batch metrics that are per-token means (loss/* are partial sums under a normaliser;
# correction/* are computed once on the whole batch, see PolicyUpdate.batch_metrics).
_MICRO_METRIC_PREFIXES = ("entropy",)


class PolicyUpdate:
    """The K-mini-batch update of `alp_agents.learner.objectives.policy_loss` (see module doc).

    Args:
        model: the policy being trained (possibly wrapped by DDP/FSDP).
        optimizer / scheduler: AdamW over the model (and sigma in a group named ``"sigma"``),
            and its LR schedule, stepped once per optimiser step.
        loss_cfg: the objective.
        settings: the numbers of the run's configuration the update reads.
        collectives: backward, ``no_sync`` and clipping across processes.
        perturbation: the layerwise perturbation (presets that perturb), else None.
        ref_model: the frozen KL reference (``loss_cfg.needs_ref_logprobs``), else None.
        warn: called with a message for every skipped (non-finite) update.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_cfg: PolicyLossConfig,
        settings: UpdateSettings,
        collectives: Collectives,
        perturbation: LayerwisePerturbation | None = None,
        ref_model: torch.nn.Module | None = None,
        warn: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_cfg = loss_cfg
        self.settings = settings
        self.collectives = collectives
        self.perturbation = perturbation
        self.ref_model = ref_model
        self.warn = warn
        self.nonfinite = NonFiniteCounter()
        self.in_progress = False  # True while optimiser steps are being taken (Ctrl-C waits)

    # ---------------------------------------------------------------- the one entry point
    def run(self, batch: UpdateBatch, step: int) -> UpdateResult:
        """pi_old, batch metrics, the final loss mask, then K optimiser steps on ``batch``.

        ``step`` is the number of steps done before this one (it seeds the noise and the
        mini-batch order). ``batch.tensors`` gains ``final_mask``.
        """
        from alp_agents.learner.objectives import final_loss_mask

        batch.move_to(self.collectives.device)
        t = batch.tensors
        # pi_old for every preset: the denominator of GRPO-style ratios, the rejection rules of
        # MIS-style ones, and for all of them the engine mismatch clean of noise and staleness.
        old_lp = self.no_grad_logprobs(
            self.collectives.unwrap(self.model), t, batch.group_ids, batch.score_from
        )
        ref_lp = None
        if self.ref_model is not None:
            ref_lp = self.no_grad_logprobs(self.ref_model, t, batch.group_ids, batch.score_from)
        metrics = self.batch_metrics(t, old_lp)
        # Rejection depends on pi_old / mu only: known now, so every micro-batch of a mini-batch
        # shares the normaliser of the tokens that will really count.
        t["final_mask"] = final_loss_mask(
            old_lp, t["infer_logprobs"], t["loss_mask"], self.loss_cfg
        )
        result = self._mini_batch_steps(batch, old_lp, ref_lp, step)
        result.metrics = {**metrics, **result.metrics}
        return result

    # ---------------------------------------------------------------- log-probs
    def log_probs(
        self,
        model: torch.nn.Module,
        sub: dict[str, torch.Tensor],
        score_from: torch.Tensor,
        entropy: bool = False,
        share_prefixes: bool = True,
    ) -> Any:
        """``(B, L)`` float32 log-probs (and entropies if asked) under the configured autocast.

        Only columns from ``score_from`` on (the first model token of each row) are computed;
        earlier ones are 0 and never read (the loss and metrics mask them). Rows of one prompt
        share its forward when ``settings.share_prefixes`` and ``share_prefixes`` both allow.
        """
        from alp_agents.learner.logprobs import token_logprobs

        with self._autocast():
            return token_logprobs(
                model,
                sub["input_ids"],
                sub["attention_mask"],
                self.settings.temperature,
                return_entropy=entropy,
                score_from=score_from,
                share_prefixes=self.settings.share_prefixes and share_prefixes,
            )

    def no_grad_logprobs(
        self,
        model: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        group_ids: Sequence[Any],
        score_from: torch.Tensor,
    ) -> torch.Tensor:
        """pi_old / reference log-probs of the whole batch, in micro-batches of whole groups.

        No activation is kept for backward here, so micro-batches are 4x the training ones:
        fewer, larger forwards amortise the per-forward cost (autocast's weight casts, kernel
        launches), which dominates at this model size.
        """
        out = torch.zeros_like(tensors["loss_mask"], dtype=torch.float32)
        [ordered] = mini_batch_rows(group_ids, 1)
        rows_all = torch.tensor(ordered)
        mbs = 4 * self.settings.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(ordered), mbs):
                rows = rows_all[start : start + mbs]
                sub = trim_shared_padding(
                    {k: tensors[k][rows] for k in ("input_ids", "attention_mask")}
                )
                lp = self.log_probs(model, sub, score_from[rows])
                out[rows, : lp.shape[1]] = lp
        return out

    def numerator_logprobs(
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
        out = self.log_probs(
            self.model, sub, score_from, entropy=entropy, share_prefixes=not per_row_noise
        )
        return out if entropy else (out, None)

    # ---------------------------------------------------------------- the K optimiser steps
    def _mini_batch_steps(
        self,
        batch: UpdateBatch,
        old_lp: torch.Tensor,
        ref_lp: torch.Tensor | None,
        step: int,
    ) -> UpdateResult:
        """K mini-batches, one optimiser step each, micro-batched gradient accumulation.

        Micro-batch losses share the mini-batch's count of loss tokens (or sequences) AFTER
        rejection (``final_mask``) as normaliser, so their gradients add up to the loss of one
        call on the whole mini-batch whatever the micro-batch size.
        """
        from alp_agents.learner.objectives import accumulation_normalizer, policy_loss_terms

        s = self.settings
        t, score_from = batch.tensors, batch.score_from
        g = torch.Generator().manual_seed(shuffle_seed(s.seed, step)) if s.shuffle else None
        numerators = torch.zeros_like(t["loss_mask"])  # log-prob in the ratio numerator
        mini_batches = mini_batch_rows(batch.group_ids, s.mini_batches, g)
        loss_metrics: list[tuple[float, dict[str, float]]] = []
        sums: Counter = Counter()
        noise_effect: Counter = Counter()  # |perturbed - unperturbed| log-prob, mini-batch 0
        rank = self.collectives.rank
        self.in_progress = True
        try:
            for k, mb in enumerate(mini_batches):
                rows_mb = torch.tensor(mb)
                normalizer = accumulation_normalizer(t["final_mask"][rows_mb], self.loss_cfg)
                micro = [
                    rows_mb[i : i + s.micro_batch_size]
                    for i in range(0, len(rows_mb), s.micro_batch_size)
                ]
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                mb_loss = 0.0
                for j, rows in enumerate(micro):
                    sub = trim_shared_padding(
                        {key: v[rows] for key, v in t.items() if v.dim() == 2}
                    )
                    width = sub["input_ids"].shape[1]
                    skip_sync = j != len(micro) - 1
                    seed = noise_seed(s.seed, step, rank, k, j)
                    with self.collectives.no_sync(self.model, skip_sync), self._perturbed(seed):
                        lp, ent = self.numerator_logprobs(sub, score_from[rows])
                        if not bool(torch.isfinite(lp[sub["loss_mask"] > 0]).all()):
                            # A NaN/inf forward (overflow, corrupted weights): no loss; the
                            # whole mini-batch update is skipped below. With several processes
                            # a (NaN) backward still runs, so the gradient all-reduce happens on
                            # every rank and makes all of them skip this update together.
                            finite = False
                            mb_loss = float("nan")
                            if self.collectives.world > 1:
                                self.collectives.backward(lp.sum() * 0.0)
                            continue
                        terms = policy_loss_terms(
                            lp,
                            sub["infer_logprobs"],
                            t["advantages"][rows],
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
                        self.backward(terms)
                    numerators[rows, :width] = lp.detach()
                    if k == 0 and self.perturbation is not None:
                        # Same weights as pi_old: the difference is what the noise did.
                        scored = sub["loss_mask"] > 0
                        diff = (lp.detach() - old_lp[rows, :width])[scored].abs()
                        noise_effect["sum"] += float(diff.sum())
                        noise_effect["n"] += int(diff.numel())
                    mb_loss += float(terms.total.detach())
                    loss_metrics.append((float(sub["loss_mask"].sum()), terms.metrics))
                if self.perturbation is not None and self.collectives.world > 1:
                    self.perturbation.all_reduce_grads()  # sigma is not a DDP parameter
                sigma_grad = self._sigma_grad_norm()
                grad_norm = self._clip_grads()
                if not finite or not math.isfinite(grad_norm):
                    self._skip(step, k, mb_loss, grad_norm, finite)
                    sums["update/skipped"] += 1
                    continue
                self.nonfinite.in_row = 0
                if not bool(t["advantages"][rows_mb].any()):
                    # No reward signal. A KL or entropy term still has a gradient here, and
                    # AdamW turns even a small one into a step of about lr per parameter.
                    sums["update/no_advantage"] += 1
                if grad_norm == 0.0:
                    # No learning signal in this mini-batch. AdamW would still step along its
                    # momentum (measured in the CPU study: rewards fell from 1.0 to 0.0 over
                    # steps whose every gradient was 0; docs/training.md).
                    sums["update/signal_free"] += 1
                    if s.skip_signal_free_steps:
                        self.optimizer.zero_grad(set_to_none=True)
                        continue
                self.optimizer.step()
                self.scheduler.step()
                sums["update/steps"] += 1
                sums["update/grad_norm"] += grad_norm
                sums["update/loss"] += mb_loss
                if sigma_grad is not None:
                    sums["sigma/grad_norm"] += sigma_grad
        finally:
            self.in_progress = False
        done = max(1, sums["update/steps"])
        out = {
            "update/steps": float(sums["update/steps"]),
            "update/skipped": float(sums["update/skipped"]),
            "update/signal_free": float(sums["update/signal_free"]),
            "update/no_advantage": float(sums["update/no_advantage"]),
            "update/grad_norm": sums["update/grad_norm"] / done,
            "update/loss": sums["update/loss"] / done,
            "update/lr": float(self.scheduler.get_last_lr()[0]),
        }
        if self.perturbation is not None:
            out["sigma/grad_norm"] = sums["sigma/grad_norm"] / done
            out.update(self._sigma_metrics())
            if noise_effect["n"]:
                out["perturbation/logprob_change"] = noise_effect["sum"] / noise_effect["n"]
        out.update(weighted_mean(loss_metrics, keep=_MICRO_METRIC_PREFIXES))
        out.update(self.step_ratio_metrics(t, numerators, old_lp))
        if batch.token_lag is not None:
            out.update(self.staleness_metrics(t, numerators, old_lp, batch.token_lag))
        return UpdateResult(int(sums["update/steps"]), int(sums["update/skipped"]), out)

    def backward(self, terms: LossTerms) -> None:
        """Backward of ``terms.total``, keeping the regulariser's gradient away from sigma.

        sigma learns only from the policy loss (docs/alp.md). The KL/entropy terms are
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
        self.collectives.backward(terms.total)
        if regularizer_grad is not None and sigma.grad is not None:
            sigma.grad.sub_(regularizer_grad)

    def _skip(self, step: int, k: int, loss: float, grad_norm: float, loss_finite: bool) -> None:
        """Drop a non-finite update (weights untouched); stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.in_row += 1
        self.nonfinite.total += 1
        limit = self.settings.max_nonfinite_in_row
        what = "gradient" if loss_finite else "loss"
        self.warn(
            f"step {step + 1} mini-batch {k}: non-finite {what} (loss={loss}, "
            f"grad_norm={grad_norm}); update skipped ({self.nonfinite.in_row}/{limit} in a row)"
        )
        if self.nonfinite.in_row >= limit:
            raise TrainingDivergedError(
                f"{self.nonfinite.in_row} consecutive optimiser steps had a non-finite loss or "
                f"gradient (last: step {step + 1}, mini-batch {k}, loss={loss}, "
                f"grad_norm={grad_norm}). Training stopped; the weights are those of the last "
                f"finite update and no checkpoint of a non-finite state was written. Lower "
                f"optim.lr, check the data and rewards, or raise max_nonfinite_in_row."
            )

    # ---------------------------------------------------------------- metrics
    def batch_metrics(
        self, tensors: dict[str, torch.Tensor], old_lp: torch.Tensor
    ) -> dict[str, float]:
        """Before any update: the engine mismatch and the correction weights of the whole batch.

        ``mismatch/*`` compares the trainer's unperturbed log-probs at the start of the step
        (pi_old) with the engine's (mu): the train/inference gap alone, clean of the noise and of
        the staleness that the update's own ratio (``mismatch_update/*``) also contains.
        ``correction/*`` are batch values of the weighting/rejection (ESS, weights, dropped).
        """
        from alp_agents.learner import metrics as M
        from alp_agents.learner.objectives import correction_batch_stats

        m = tensors["loss_mask"].float()
        infer = tensors["infer_logprobs"]
        out = M.to_floats(
            M.mismatch_stats(old_lp, infer, m, catastrophic=self.settings.catastrophic_ratio)
        )
        out.update(correction_batch_stats(old_lp, infer, m, self.loss_cfg))
        return out

    def step_ratio_metrics(
        self,
        tensors: dict[str, torch.Tensor],
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

        c = self.loss_cfg
        m = tensors["loss_mask"].float()
        kept = tensors["final_mask"].float()
        lp, infer, den, ratio = self._loss_ratio(tensors, numerators, old_lp)
        adv = tensors["advantages"][:, None].expand_as(m)
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

    def _loss_ratio(
        self, tensors: dict[str, torch.Tensor], numerators: torch.Tensor, old_lp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(numerator, mu, denominator, ratio)`` of the loss tokens (0 elsewhere): the ratio
        as the objective formed it (per token, sequence or turn), clamped as there."""
        from alp_agents.learner.objectives import log_ratio

        c = self.loss_cfg
        m = tensors["loss_mask"].float()
        zeros = torch.zeros_like(m)
        lp = torch.where(m > 0, numerators.float(), zeros)
        infer = torch.where(m > 0, tensors["infer_logprobs"].float(), zeros)
        old = torch.where(m > 0, old_lp.float(), zeros)
        den = infer if c.denominator == "infer" else old
        ratio = (
            log_ratio(lp, den, m, c, tensors["turn_index"])
            .clamp(-c.log_ratio_clamp, c.log_ratio_clamp)
            .exp()
        )
        return lp, infer, den, ratio

    def staleness_metrics(
        self,
        tensors: dict[str, torch.Tensor],
        numerators: torch.Tensor,
        old_lp: torch.Tensor,
        token_lag: torch.Tensor,
    ) -> dict[str, float]:
        """The lag distribution of the loss tokens and the ratio statistics of each lag.

        ``staleness/mean|max`` and ``staleness/lag_K/token_frac`` over the loss tokens (before
        rejection); per lag K: ``staleness/lag_K/ratio/*`` (the ratio used in the loss, over
        the kept tokens of that lag), ``staleness/lag_K/seq_log_ratio/*`` (the sequence
        log-ratio of the method's own ratio over that lag's tokens), and two k3 values:
        ``mismatch/k3`` (pi_old vs the engine's mu: staleness plus precision, no noise) and
        ``mismatch_update/k3`` (the update's numerator vs mu: what the objective really saw,
        perturbed for ALP). So the tail can be read growing with the lag, and next to it what
        the correction made of it.
        """
        from alp_agents.learner import metrics as M

        m = tensors["loss_mask"].float()
        lag = torch.where(m > 0, token_lag, torch.full_like(token_lag, -1))
        known = lag >= 0
        if not bool(known.any()):
            return {}
        lags = lag[known]
        out: dict[str, Any] = {
            "staleness/mean": lags.float().mean(),
            "staleness/max": lags.max().float(),
        }
        lp, infer, den, ratio = self._loss_ratio(tensors, numerators, old_lp)
        old = torch.where(m > 0, old_lp.float(), torch.zeros_like(m))
        kept = tensors["final_mask"].float()
        for k in sorted(set(lags.tolist())):
            at = (lag == k).float()
            name = f"staleness/lag_{k}"
            out[f"{name}/token_frac"] = at.sum() / known.sum()
            out.update(M.ratio_stats(ratio, kept * at, prefix=f"{name}/ratio"))
            out.update(M.seq_log_ratio_stats(lp - den, m * at, prefix=f"{name}/seq_log_ratio"))
            out[f"{name}/mismatch/k3"] = M.mismatch_stats(old, infer, m * at)["mismatch/k3"]
            out[f"{name}/mismatch_update/k3"] = M.mismatch_stats(lp, infer, m * at)["mismatch/k3"]
        return M.to_floats(out)

    # ---------------------------------------------------------------- small operations
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.autocast == "bf16":
            return torch.autocast(device_type=self.collectives.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        clip = self.settings.grad_clip
        return self.collectives.clip_grad_norm(params, clip if clip > 0 else float("inf"))

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
        out.pop("sigma/grad_norm", None)  # the mean over this step's updates is logged instead
        return out


def weighted_mean(
    items: Sequence[tuple[float, dict[str, Any]]], keep: Sequence[str]
) -> dict[str, float]:
    """Token-weighted mean over micro-batches of the metrics whose key starts with ``keep``.

    >>> weighted_mean([(1.0, {"entropy": 1.0}), (3.0, {"entropy": 2.0, "x": 9})], ["entropy"])
    {'entropy': 1.75}
    """
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
