"""The K-mini-batch policy update on its own: no trainer, no engine, no accelerator.

A tiny random Llama, hand-made trajectories and a single-process stand-in for the
`Collectives` protocol are all `PolicyUpdate` needs; these tests check what it computes.
"""

from __future__ import annotations

import contextlib
import doctest

import pytest
import torch

import alp_agents.learner.update as update_module
from alp_agents.learner.objectives import PolicyLossConfig
from alp_agents.learner.update import (
    PolicyUpdate,
    TrainingDivergedError,
    UpdateSettings,
    build_update_batch,
    noise_seed,
    zero_advantage_group_ratio,
)
from alp_agents.models import make_tiny_model
from alp_agents.rollout.trajectory import Trajectory


class OneProcess:
    """`Collectives` on one process: plain backward, no all-reduce, plain clipping."""

    rank, world, device = 0, 1, torch.device("cpu")

    def unwrap(self, model):
        return model

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model, skip):
        return contextlib.nullcontext()

    def clip_grad_norm(self, params, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def trajectory(group: int, reward: float, tokens: list[int], void: int = 0) -> Trajectory:
    n = len(tokens)
    return Trajectory(
        prompt_ids=[1, 5, 6, 7],
        response_ids=tokens,
        loss_mask=[1] * n,
        infer_logprobs=[-10.8] * n,  # about log(1/49152): a random model's ratio is near 1
        turn_index=[0] * n,
        reward=reward,
        num_turns=1,
        num_void_turns=void,
        group_id=group,
        problem_id=f"p{group}",
    )


def batch_of_two_groups():
    trajs = [
        trajectory(0, 1.0, [10, 11, 2]),
        trajectory(0, 0.0, [12, 2]),
        trajectory(1, 1.0, [13, 14, 15, 2]),
        trajectory(1, 0.0, [16, 2], void=1),
    ]
    return build_update_batch(trajs, pad_token_id=2, scale_by_std=True, eps=1e-6)


def make_update(
    preset: str = "bypass", mini_batches: int = 2, setting: str = "multi_turn", **settings
) -> PolicyUpdate:
    model = make_tiny_model("llama", seed=0).train()
    loss_cfg = PolicyLossConfig.preset(preset, setting=setting)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "name": "model"}], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    return PolicyUpdate(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_cfg=loss_cfg,
        settings=UpdateSettings(seed=0, mini_batches=mini_batches, micro_batch_size=1, **settings),
        collectives=OneProcess(),
        ref_model=make_tiny_model("llama", seed=0).eval() if loss_cfg.kl_coef > 0 else None,
    )


def test_build_update_batch_gives_grpo_advantages_and_masks_void_rows():
    batch, metrics = batch_of_two_groups()
    adv = batch.tensors["advantages"]
    # each group: rewards (1, 0) -> +-(0.5 / std 0.7071) = +-0.7071
    assert adv.tolist() == pytest.approx([0.7071, -0.7071, 0.7071, -0.7071], abs=1e-3)
    assert metrics["advantage/abs_mean"] == pytest.approx(0.7071, abs=1e-3)
    assert metrics["advantage/zero_groups_ratio"] == 0.0
    assert metrics["batch/void_masked"] == 1.0
    assert batch.tensors["loss_mask"][3].sum() == 0  # the void row is out of the loss
    assert batch.tensors["loss_mask"][2].sum() == 4
    assert batch.score_from.tolist() == [4, 4, 4, 4]  # taken before the void row lost its mask
    assert list(batch.group_ids) == [0, 0, 1, 1]


def test_void_rows_can_be_left_out_of_the_group_statistics():
    trajs = [trajectory(0, 1.0, [10, 2]), trajectory(0, 0.0, [11, 2], void=1)]
    batch, metrics = build_update_batch(
        trajs, pad_token_id=2, scale_by_std=True, eps=1e-6, void_in_group_stats=False
    )
    # the only valid member of the group: advantage 0 for both rows
    assert batch.tensors["advantages"].tolist() == [0.0, 0.0]
    assert metrics["advantage/zero_groups_ratio"] == 1.0


def test_run_takes_k_optimiser_steps_and_moves_the_weights():
    update = make_update(mini_batches=2)
    batch, _ = batch_of_two_groups()
    before = [p.detach().clone() for p in update.model.parameters()]
    result = update.run(batch, step=0)
    assert (result.steps, result.skipped) == (2, 0)
    m = result.metrics
    assert m["update/steps"] == 2.0 and m["update/skipped"] == 0.0
    assert m["update/grad_norm"] > 0 and m["update/lr"] == pytest.approx(1e-2)
    assert m["tokens/before_rejection"] == 3 + 2 + 4  # the void row's 2 tokens are masked
    assert m["mismatch/k3"] >= 0 and m["ratio/q50"] > 0
    assert not update.in_progress
    assert any(
        not torch.equal(a, b) for a, b in zip(before, update.model.parameters(), strict=True)
    )
    assert "final_mask" in batch.tensors


def test_the_same_step_seed_gives_the_same_update():
    losses = []
    for _ in range(2):
        update = make_update(preset="alp")
        from alp_agents.learner.perturb import LayerwisePerturbation

        update.perturbation = LayerwisePerturbation(update.model, sigma_init=0.02)
        batch, _ = batch_of_two_groups()
        losses.append(update.run(batch, step=3).metrics["update/loss"])
    assert losses[0] == losses[1]


def test_non_finite_updates_are_skipped_and_then_raise():
    update = make_update(mini_batches=2, max_nonfinite_in_row=3)
    warnings: list[str] = []
    update.warn = warnings.append

    def poison(module, args, output):
        output.logits = output.logits * float("nan")
        return output

    update.model.register_forward_hook(poison)
    before = [p.detach().clone() for p in update.model.parameters()]
    batch, _ = batch_of_two_groups()
    with pytest.raises(TrainingDivergedError, match="3 consecutive"):
        update.run(batch, step=0)  # no_grad pi_old is NaN too: both mini-batches are skipped
        update.run(batch_of_two_groups()[0], step=1)
    assert update.nonfinite.total == 3 and update.nonfinite.in_row == 3
    assert len(warnings) == 3 and "non-finite loss" in warnings[0]
    assert all(torch.equal(a, b) for a, b in zip(before, update.model.parameters(), strict=True))


def test_zero_advantage_groups():
    adv = torch.tensor([0.0, 0.0, 0.5, -0.5, 0.0])
    assert zero_advantage_group_ratio(adv, ["a", "a", "b", "b", "c"]) == pytest.approx(2 / 3)
    assert zero_advantage_group_ratio(torch.tensor([]), []) == 0.0


def test_noise_seeds_are_reproducible_and_distinct():
    assert noise_seed(0, 1, 0, 0, 0) == noise_seed(0, 1, 0, 0, 0)
    assert (
        len({noise_seed(0, 1, r, k, j) for r in range(2) for k in range(3) for j in range(3)}) == 18
    )


def test_docstring_examples():
    failures, tried = doctest.testmod(update_module)
    assert failures == 0 and tried > 0


def _signal_free_batch():
    """Two groups whose members all got the same reward: every advantage is 0."""
    trajs = [
        trajectory(0, 1.0, [10, 11, 2]),
        trajectory(0, 1.0, [12, 2]),
        trajectory(1, 0.0, [13, 14, 15, 2]),
        trajectory(1, 0.0, [16, 2]),
    ]
    return build_update_batch(trajs, pad_token_id=2, scale_by_std=True, eps=1e-6)[0]


@pytest.mark.parametrize("skip", [False, True])
def test_signal_free_mini_batches_are_counted_and_optionally_skipped(skip):
    """After a real update, AdamW moves the weights on zero-gradient mini-batches (its momentum)
    unless skip_signal_free_steps is on; update/signal_free counts them either way."""
    update = make_update(mini_batches=2, skip_signal_free_steps=skip)
    first = update.run(batch_of_two_groups()[0], step=0)
    assert first.metrics["update/signal_free"] == 0.0
    before = [p.detach().clone() for p in update.model.parameters()]
    result = update.run(_signal_free_batch(), step=1)
    assert result.metrics["update/signal_free"] == 2.0
    assert (first.metrics["update/no_advantage"], result.metrics["update/no_advantage"]) == (0, 2)
    assert result.metrics["update/grad_norm"] == 0.0
    moved = any(
        not torch.equal(a, b) for a, b in zip(before, update.model.parameters(), strict=True)
    )
    assert moved is not skip
    assert result.steps == (0 if skip else 2)


def test_a_kl_term_steps_mini_batches_without_reward_signal_even_when_skipping():
    """With the single-turn KL, a mini-batch whose every advantage is 0 has the KL's gradient
    (not 0 once the policy moved from the reference), so skip_signal_free_steps does not skip
    it; update/no_advantage counts it. In the CPU study most optimiser steps were such steps."""
    update = make_update(mini_batches=2, setting="single_turn", skip_signal_free_steps=True)
    assert update.loss_cfg.kl_coef > 0
    update.run(batch_of_two_groups()[0], step=0)  # the policy leaves the reference
    before = [p.detach().clone() for p in update.model.parameters()]
    result = update.run(_signal_free_batch(), step=1)
    assert result.metrics["update/no_advantage"] == 2.0
    assert result.metrics["update/signal_free"] == 0.0
    assert result.steps == 2 and result.metrics["update/grad_norm"] > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(before, update.model.parameters(), strict=True)
    )
