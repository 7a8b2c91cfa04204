"""A training step with a rubric env logs each reward function beside reward/mean.

The env is the parity env of conftest.py with a rubric class attribute (how a user opts in
from the CLI: register such a class in a module given to ``--import``); the expected metrics
are recomputed by hand from the step's own trajectories.
"""

from __future__ import annotations

import pytest

import envs
from envs import rewards

from .conftest import LengthParityEnv
from .test_trainer import make_trainer, record_rollouts, tiny_config

RUBRIC_ENV = "test/LengthParityRubric-v0"


class LengthParityRubricEnv(LengthParityEnv):
    rubric = envs.Rubric([rewards.correctness(), rewards.length(target_chars=8, weight=0.5)])


envs.register(RUBRIC_ENV, LengthParityRubricEnv)


def test_step_metrics_log_each_reward_function(tmp_path, problem_files, tokenizer):
    cfg = tiny_config(tmp_path, problem_files, steps=1)
    cfg.env.id = RUBRIC_ENV
    trainer = make_trainer(cfg, tokenizer)
    seen = record_rollouts(trainer)
    m = trainer.train_step()
    n = len(seen)
    assert n == cfg.rollout.prompts_per_step * cfg.rollout.group_size
    for t in seen:  # single-turn: one step, scored by both functions
        [step] = t.steps
        assert set(step.rewards) == {"correctness", "length"}
        chars = len(step.action)
        expected_length = 0.0 if chars <= 8 else -min(1.0, (chars - 8) / 8)
        assert step.rewards["length"] == pytest.approx(expected_length)
        assert step.rewards["correctness"] == (1.0 if chars % 2 == 0 else 0.0)
        assert t.reward == pytest.approx(step.rewards["correctness"] + 0.5 * expected_length)
    correctness = sum(t.steps[0].rewards["correctness"] for t in seen) / n
    length = sum(t.steps[0].rewards["length"] for t in seen) / n
    assert m["reward/correctness"] == pytest.approx(correctness)
    assert m["reward/length"] == pytest.approx(length)
    assert m["reward/mean"] == pytest.approx(correctness + 0.5 * length)
