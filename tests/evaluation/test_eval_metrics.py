"""The evaluation maths against values computed by hand (no models involved)."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

import envs
from alp_agents.evaluation.metrics import (
    avg_at_n,
    bootstrap_ci,
    default_report_ks,
    majority_vote,
    nanmean,
    normalize_answer,
    pass_at_k,
    problem_maj_at_k,
    problem_pass_at_k,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)  # C(7,4)=35, C(10,4)=210


@pytest.mark.parametrize("n", [1, 3, 6, 9])
def test_pass_at_k_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows floats; the product form must not.
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0.0 < pass_at_k(1000, 1, 500) <= 1.0
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (0, 0, 1), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_k_larger_than_n_error_names_both():
    with pytest.raises(ValueError, match=r"pass@16.*n=8"):
        pass_at_k(8, 2, 16)


def test_unverifiable_is_neither_right_nor_wrong():
    grades = ["correct", "unverifiable", "wrong", "unverifiable"]
    assert avg_at_n(grades) == 0.5
    # two verifiable samples, one correct: pass@2 = 1, pass@1 = 0.5, pass@3 undefined
    assert problem_pass_at_k(grades, 1) == 0.5
    assert problem_pass_at_k(grades, 2) == 1.0
    assert math.isnan(problem_pass_at_k(grades, 3))
    assert math.isnan(avg_at_n(["unverifiable", "unverifiable"]))
    with pytest.raises(ValueError, match="unknown grade"):
        avg_at_n(["correct", "right"])


def test_normalize_answer_equivalences():
    same = [
        "1/2",
        "0.5",
        "\\frac{1}{2}",
        "\\dfrac{1}{2}",
        " 0.50 ",
        "$\\frac12$".replace("12", "{1}{2}"),
    ]
    assert {normalize_answer(a) for a in same} == {"1/2"}
    assert normalize_answer("1,000") == normalize_answer("1000") == "1000"
    assert normalize_answer("18.0") == "18"
    assert normalize_answer("\\$18.") == "18"
    assert normalize_answer("-\\frac{3}{6}") == "-1/2"
    assert normalize_answer("\\left( 3, \\frac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("\\text{Monday}") == "Monday"
    assert normalize_answer("") is None
    assert normalize_answer(None) is None
    assert normalize_answer("12") != normalize_answer("1/2")


def test_majority_vote_counts_equivalent_answers_together_and_breaks_ties_by_order():
    assert majority_vote(["3", "0.5", "1/2", "3", "\\frac{1}{2}"]) == (1, 3)
    assert majority_vote(["7", "5", "5", "7"]) == (0, 2)  # tie -> first seen
    assert majority_vote([None, "", None]) == (None, 0)
    assert majority_vote([None, "4"]) == (1, 1)


def test_maj_at_k_uses_first_k_samples_and_the_winner_grade():
    answers = ["5", "7", "7", "5", "5"]
    grades = ["correct", "wrong", "wrong", "correct", "correct"]
    assert problem_maj_at_k(answers, grades, 1) == 1.0
    assert problem_maj_at_k(answers, grades, 3) == 0.0  # 7 wins among the first three
    assert problem_maj_at_k(answers, grades, 5) == 1.0
    assert problem_maj_at_k([None, None], ["wrong", "wrong"], 2) == 0.0
    assert math.isnan(problem_maj_at_k(["4", "4"], ["unverifiable", "unverifiable"], 2))
    with pytest.raises(ValueError, match="maj@3"):
        problem_maj_at_k(["1", "2"], ["wrong", "wrong"], 3)


def test_bootstrap_ci_is_deterministic_given_a_seed_and_brackets_the_mean():
    values = [1.0, 0.0, 0.0, 1.0, 1.0, 0.25, 0.75, 0.0, 1.0, 0.5]
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3)
    assert a != bootstrap_ci(values, seed=4)
    low, high = a
    assert 0.0 <= low < nanmean(values) < high <= 1.0
    wider = bootstrap_ci(values, confidence=0.99, seed=3)
    assert wider[0] <= low and wider[1] >= high
    assert bootstrap_ci([1.0, math.nan, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([0.5]))


def test_default_report_ks():
    assert default_report_ks(1) == [1]
    assert default_report_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_report_ks(6, k=3) == [1, 2, 3, 4, 6]


def _record(pid, i, grade, answer=None, source="s", level=None, **stats):
    return {
        "problem_id": pid,
        "sample_index": i,
        "grade": grade,
        "extracted_answer": answer,
        "source": source,
        "level": level,
        **stats,
    }


def test_summarize_hand_computed_report():
    from alp_agents.evaluation.metrics import summarize

    records = [
        # problem a: 1 of 2 correct; problem b: 0 of 2; problem c: 1 verifiable, correct
        _record("a", 1, "wrong", "3", source="gsm8k", level=1, num_turns=2, num_tool_calls=1),
        _record("a", 0, "correct", "4", source="gsm8k", level=1, num_turns=1, num_tool_calls=1,
                num_tool_errors=1, finish_reason="answer"),
        _record("b", 0, "wrong", "5", source="gsm8k", level=2, num_turns=1, finish_reason="answer"),
        _record("b", 1, "wrong", None, source="gsm8k", level=2, num_turns=1, num_void_turns=1,
                finish_reason="void_turn"),
        _record("c", 0, "unverifiable", "x", source="math", level=10, num_turns=1),
        _record("c", 1, "correct", "x", source="math", level=10, num_turns=3, num_tool_calls=2),
    ]  # fmt: skip
    report = summarize(records, n=2, num_resamples=200)
    m = report["metrics"]
    assert report["report_ks"] == [1, 2]
    assert m["pass@1"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert m["avg@2"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert m["pass@2"] == pytest.approx((1.0 + 0.0) / 2)  # c has one verifiable sample: dropped
    assert report["scored_problems"]["pass@2"] == 2
    assert m["maj@1"] == pytest.approx((1.0 + 0.0) / 2)  # c's first vote is unverifiable
    assert m["maj@2"] == pytest.approx((1.0 + 0.0) / 2)  # a: tie 4 vs 3 -> sample 0 "4" wins
    assert m["num_problems"] == 3 and m["num_samples"] == 6 and m["num_unverifiable"] == 1
    assert m["unverifiable_rate"] == pytest.approx(1 / 6)
    assert m["turns_per_episode"] == pytest.approx(9 / 6)
    assert m["tool_calls_per_episode"] == pytest.approx(4 / 6)
    assert m["tool_use_rate"] == pytest.approx(3 / 6)
    assert m["tool_error_rate"] == pytest.approx(1 / 4)
    assert m["void_turn_rate"] == pytest.approx(1 / 9)
    assert m["finish_reason/answer"] == pytest.approx(2 / 6)
    assert m["finish_reason/unknown"] == pytest.approx(3 / 6)
    assert list(report["breakdown"]["level"]) == ["1", "2", "10"]
    assert report["breakdown"]["source"]["gsm8k"]["pass@2"] == pytest.approx(0.5)
    assert report["breakdown"]["source"]["math"]["avg@2"] == pytest.approx(1.0)
    low, high = report["intervals"]["pass@1"]
    assert low <= m["pass@1"] <= high
    assert report == summarize(records, n=2, num_resamples=200)  # seeded: identical


def test_summarize_rejects_k_above_n_and_missing_samples():
    from alp_agents.evaluation.metrics import summarize

    records = [_record("a", 0, "correct"), _record("a", 1, "wrong")]
    with pytest.raises(ValueError, match=r"k=4 is larger than the n=2"):
        summarize(records, n=2, k=4)
    with pytest.raises(ValueError, match="has 2 samples, expected n=3"):
        summarize(records, n=3)


def test_rubric_rewards_are_averaged_per_function_only_when_present():
    from alp_agents.evaluation.metrics import episode_statistics

    plain = [_record("a", 0, "correct", reward=1.0), _record("a", 1, "wrong", reward=0.0)]
    assert not [key for key in episode_statistics(plain) if key.startswith("reward/")]
    scored = [
        _record("a", 0, "correct", reward=1.25, rewards={"correctness": 1.0, "format": 1.0}),
        _record("a", 1, "wrong", reward=0.25, rewards={"correctness": 0.0, "format": 1.0}),
        _record("b", 0, "wrong", reward=0.0, rewards={}),  # cut short: never scored
        _record("b", 1, "wrong", reward=0.0),  # a record written before rubrics existed
    ]
    stats = episode_statistics(scored)
    assert stats["reward/mean"] == pytest.approx(1.5 / 4)
    assert stats["reward/correctness"] == pytest.approx(1 / 4)
    assert stats["reward/format"] == pytest.approx(2 / 4)


def test_sample_record_carries_the_score_and_rubric_values():
    from alp_agents.evaluation.records import sample_record
    from alp_agents.rollout.trajectory import GradeRecord, StepRecord, Trajectory

    problem = envs.Problem("p", "What is 2 + 3?", "5", "toy")
    steps = [
        StepRecord(turn=0, action="call", reward=0.5, rewards={"tool_use": 1.0}),
        StepRecord(
            turn=1, action="\\boxed{5}", finish_reason="answer", reward=1.0,
            rewards={"correctness": 1.0, "tool_use": 0.0},
            grade=GradeRecord("correct", "5", "5", "exact match", score=1.0),
        ),
    ]  # fmt: skip
    trajectory = Trajectory(
        prompt_ids=[1], response_ids=[7, 0, 8, 0], loss_mask=[1, 0, 1, 0],
        infer_logprobs=[-0.5, 0.0, -0.5, 0.0], turn_index=[0, 0, 1, 1], reward=1.5,
        grade_status="correct", finish_reason="answer", num_turns=2, problem_id="p", steps=steps,
    )  # fmt: skip
    trajectory.validate()
    record = sample_record(problem, 0, trajectory)
    assert record["reward"] == 1.5 and record["score"] == 1.0
    assert record["rewards"] == {"tool_use": 1.0, "correctness": 1.0}
