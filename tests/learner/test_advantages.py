"""GRPO advantages: unbiased std, singleton and constant groups, validity mask."""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents.learner.advantages import grpo_advantages


def test_unbiased_std_hand_computed():
    # group 0: [1, 0, 0, 0], mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 0]), torch.tensor([7, 7, 7, 7]))
    assert adv.tolist() == pytest.approx(
        [0.75 / 0.500001, -0.25 / 0.500001] + [-0.25 / 0.500001] * 2
    )
    # unscaled: just centred
    adv = grpo_advantages([1.0, 0, 0, 0], [7, 7, 7, 7], scale_by_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_groups_are_independent_and_any_hashable():
    adv = grpo_advantages([3.0, 1.0, 0.5, 0.5, 2.0], ["p1", "p1", "p2", "p2", "p3"])
    # p1: mean 2, unbiased std sqrt(2); p2 constant -> 0; p3 singleton -> 0
    s = math.sqrt(2) + 1e-6
    assert adv.tolist() == pytest.approx([1 / s, -1 / s, 0.0, 0.0, 0.0])


def test_constant_groups_are_exactly_zero():
    # 0.1 is not exact in binary: the mean differs from the values by rounding noise, which
    # divided by (0 + 1e-6) would be garbage; the function must return exact zeros instead.
    adv = grpo_advantages([0.1, 0.1, 0.1, 1.0, 1.0], [0, 0, 0, 1, 1])
    assert adv.tolist() == [0.0] * 5


def test_valid_mask_excludes_infra_failures_from_stats():
    rewards = [1.0, 0.0, 0.0, 1.0]
    adv = grpo_advantages(rewards, [0, 0, 0, 0], valid=[True, True, True, False])
    # stats over [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3) + 1e-6
    assert adv.tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0])
    # a group left with one valid member gets 0
    adv = grpo_advantages([1.0, 0.0], [0, 0], valid=[True, False])
    assert adv.tolist() == [0.0, 0.0]


def test_bad_input():
    with pytest.raises(ValueError, match="NaN/inf at rows \\[1\\]"):
        grpo_advantages([1.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        grpo_advantages([1.0, 0.0], [0, 0, 1])
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.zeros(2, 2), [0, 0])
    assert grpo_advantages([], []).shape == (0,)
