"""The no-learning-signal warning: a pure counter, and the trainer saying it on a flat task."""

from __future__ import annotations

import doctest

import alp_agents.trainer.monitors as monitors_module
import envs
from alp_agents.trainer.monitors import LearningSignalMonitor
from envs.grading import Grade
from envs.math_env import MathEnv
from tests.trainer.test_trainer import make_trainer, step_rows, tiny_config

ALWAYS_RIGHT = "test/AlwaysRight-v0"


class AlwaysRight(MathEnv):
    """Every answer is correct: every group has equal rewards, so no advantage is ever nonzero."""

    def grade_answer(self, text: str) -> Grade:
        return Grade("correct", text, "anything", "always right")


envs.register(ALWAYS_RIGHT, AlwaysRight)


def test_docstring_examples():
    failures, tried = doctest.testmod(monitors_module)
    assert tried > 0 and failures == 0


def test_warns_once_per_flat_stretch_on_its_patience_th_step():
    m = LearningSignalMonitor(threshold=0.75, patience=3)
    said = [m.observe(r) for r in (0.8, 1.0, 0.75, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0)]
    assert [s is not None for s in said] == [False, False, True] + [False] * 5 + [True]
    assert "last 3 steps" in said[2] and "75%" in said[2]
    assert m.flat_steps == 3


def test_trainer_warns_when_every_group_has_equal_rewards(
    tmp_path, problem_files, tokenizer, capsys
):
    cfg = tiny_config(tmp_path, problem_files, steps=3)
    cfg.env.id = ALWAYS_RIGHT
    make_trainer(cfg, tokenizer).train()
    rows = step_rows(tmp_path / "run")
    assert [rows[s]["advantage/zero_groups_ratio"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [rows[s]["signal/flat_steps"] for s in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert capsys.readouterr().err.count("no learning signal") == 1
