"""Rubric rewards and graded partial credit: per-step values, weights, defaults, errors.

Every expected reward below is computed by hand from the rubric's definition
(``step reward = sum(weight * value)`` over the functions scored at that step).
"""

from __future__ import annotations

import math

import pytest

import envs
from envs import rewards


@envs.tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


PROBLEM = {"id": "p", "question": "What is 2 + 3?", "answer": "5"}
BAD_CALL = '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'  # 61 chars
GOOD_CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'  # 69 chars
ANSWER = "So it is \\boxed{5}."  # 19 chars


def full_rubric() -> envs.Rubric:
    return envs.Rubric(
        [
            rewards.correctness(),
            rewards.answer_format(weight=0.25),
            rewards.tool_use(weight=0.5),
            rewards.length(target_chars=100, weight=0.5),
        ]
    )


def run(env: envs.TextEnv, actions: list[str]) -> list[tuple[float, dict]]:
    env.reset(seed=0)
    return [(reward, info) for _, reward, *_, info in map(env.step, actions)]


# ----------------------------------------------------------------------------- Grade.score


def test_grade_score_defaults_to_the_binary_reward():
    assert [envs.Grade(s, None, "1").score for s in ("correct", "wrong", "unverifiable")] == [
        1.0,
        0.0,
        0.0,
    ]
    assert envs.Grade("correct", "1", "1").reward == 1.0
    assert envs.grade("\\boxed{7}", "7").score == 1.0
    assert envs.grade("\\boxed{8}", "7").score == 0.0


def test_grade_carries_partial_credit():
    partial = envs.Grade("wrong", "6, 7", "6, 7, 8", "2 of 3", score=0.5)
    assert (partial.status, partial.score, partial.reward) == ("wrong", 0.5, 0.5)
    assert partial.to_dict()["score"] == 0.5
    assert isinstance(envs.Grade("correct", "1", "1", score=1).score, float)


@pytest.mark.parametrize(
    ("status", "score", "error", "match"),
    [
        ("wrong", 1.5, ValueError, r"in \[0, 1\]"),
        ("wrong", -0.1, ValueError, r"in \[0, 1\]"),
        ("wrong", math.nan, ValueError, r"in \[0, 1\]"),
        ("wrong", True, TypeError, "a float"),
        ("wrong", "0.5", TypeError, "a float"),
        ("unverifiable", 0.5, ValueError, "unverifiable Grade scores 0.0"),
        ("none", None, ValueError, "correct, wrong or unverifiable"),
    ],
)
def test_grade_rejects_bad_scores_and_statuses(status, score, error, match):
    with pytest.raises(error, match=match):
        envs.Grade(status, None, "1", score=score)


# ----------------------------------------------------------------------------- default unchanged


def test_without_a_rubric_the_reward_is_binary_and_given_at_the_end():
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add])
    assert env.rubric is None
    steps = run(env, [BAD_CALL, GOOD_CALL, ANSWER])
    assert [reward for reward, _ in steps] == [0.0, 0.0, 1.0]
    assert [info["rewards"] for _, info in steps] == [{}, {}, {}]
    wrong = run(env, [GOOD_CALL, "So it is \\boxed{6}."])
    assert [reward for reward, _ in wrong] == [0.0, 0.0]
    math_env = envs.make("alp/Math-v0", dataset="aime24")
    math_env.reset(options={"problem_id": "aime2024-I-1"})
    _, reward, *_, info = math_env.step("\\boxed{204}")
    assert (reward, info["rewards"], info["grade"].score) == (1.0, {}, 1.0)


def test_a_partial_grade_is_the_reward_without_a_rubric():
    class HalfCredit(envs.ToolEnv):
        tools = [add]

        def grade_answer(self, text: str) -> envs.Grade:
            assert self.problem is not None
            return envs.Grade("wrong", envs.extract_boxed(text), self.problem.answer, score=0.5)

    env = HalfCredit(problems=[PROBLEM])
    [(reward, info)] = run(env, [ANSWER])
    assert (reward, info["grade"].status, info["grade"].score) == (0.5, "wrong", 0.5)
    env = HalfCredit(problems=[PROBLEM], rubric=envs.Rubric([rewards.correctness(weight=2.0)]))
    [(reward, info)] = run(env, [ANSWER])
    assert (reward, info["rewards"]) == (1.0, {"correctness": 0.5})


# ----------------------------------------------------------------------------- a rubric


def test_rubric_values_per_step_and_their_weighted_sum():
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=full_rubric())
    (r0, i0), (r1, i1), (r2, i2) = run(env, [BAD_CALL, GOOD_CALL, ANSWER])
    # Turn 0: the call failed (missing b): tool_use 0/1; outcome functions wait for the end.
    assert (r0, i0["rewards"]) == (0.0, {"tool_use": 0.0})
    # Turn 1: the call succeeded, the first paid tool turn: 0.5 * 1.0.
    assert (r1, i1["rewards"]) == (0.5, {"tool_use": 1.0})
    # Turn 2: correct, boxed, no call; 61 + 69 + 19 = 149 chars, 49 over 100: length -0.49.
    assert i2["rewards"] == {
        "correctness": 1.0,
        "format": 1.0,
        "tool_use": 0.0,
        "length": pytest.approx(-0.49),
    }
    assert r2 == pytest.approx(1.0 + 0.25 * 1.0 + 0.5 * 0.0 + 0.5 * -0.49)  # 1.005
    assert i2["grade"].status == "correct" and i2["finish_reason"] == "answer"


def test_rubric_scores_an_episode_without_an_answer():
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=full_rubric(), max_turns=2)
    (_, i0), (r1, i1) = run(env, [GOOD_CALL, GOOD_CALL])
    assert i0["rewards"] == {"tool_use": 1.0}
    # max_turns: no answer, so correctness and format 0; the second ok turn is past the limit of
    # one paid tool turn; 138 chars: length -0.38.
    assert i1["finish_reason"] == "max_turns"
    assert i1["rewards"] == {
        "correctness": 0.0,
        "format": 0.0,
        "tool_use": 0.0,
        "length": pytest.approx(-0.38),
    }
    assert r1 == pytest.approx(0.5 * -0.38)


def test_tool_use_pays_the_first_successful_turns_only():
    rubric = envs.Rubric([rewards.tool_use(weight=1.0, max_rewarded_turns=2)])
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=rubric, max_turns=5)
    both = GOOD_CALL + BAD_CALL  # one of two calls ok: 0.5
    steps = run(env, [BAD_CALL, both, GOOD_CALL, GOOD_CALL, ANSWER])
    assert [reward for reward, _ in steps] == [0.0, 0.5, 1.0, 0.0, 0.0]
    unlimited = envs.Rubric([rewards.tool_use(weight=1.0, max_rewarded_turns=None)])
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=unlimited, max_turns=5)
    assert [r for r, _ in run(env, [GOOD_CALL, GOOD_CALL, ANSWER])] == [1.0, 1.0, 0.0]


def test_length_penalty_values():
    assert rewards.length_penalty(0, 10) == 0.0
    assert rewards.length_penalty(10, 10) == 0.0
    assert rewards.length_penalty(15, 10) == -0.5
    assert rewards.length_penalty(20, 10) == -1.0
    assert rewards.length_penalty(1000, 10) == -1.0


def test_a_class_attribute_opts_in_and_the_constructor_overrides_it():
    class Scored(envs.ToolEnv):
        tools = [add]
        rubric = envs.Rubric([rewards.answer_format(weight=1.0)])

    [(reward, info)] = run(Scored(problems=[PROBLEM]), ["\\boxed{6}"])
    assert (reward, info["rewards"]) == (1.0, {"format": 1.0})  # wrong, but formatted
    own = envs.Rubric([rewards.correctness()])
    [(reward, info)] = run(Scored(problems=[PROBLEM], rubric=own), ["\\boxed{6}"])
    assert (reward, info["rewards"]) == (0.0, {"correctness": 0.0})


def test_a_user_reward_function_sees_the_episode():
    seen: list[envs.RewardInput] = []

    def polite(inp: envs.RewardInput) -> float:
        seen.append(inp)
        return 1.0 if "please" in inp.action.lower() else 0.0

    rubric = envs.Rubric([envs.RewardFunc("polite", polite, weight=0.5, per_turn=True)])
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=rubric)
    steps = run(env, ["Please: " + GOOD_CALL, ANSWER])
    assert [reward for reward, _ in steps] == [0.5, 0.0]
    first, last = seen
    assert (first.turn, first.done, first.grade, first.problem.id) == (0, False, None, "p")
    assert [r["status"] for r in first.tool_results] == ["ok"]
    assert (last.turn, last.done, last.finish_reason) == (1, True, "answer")
    assert last.actions == ("Please: " + GOOD_CALL, ANSWER)
    assert [len(r) for r in last.turn_tool_results] == [1, 0]
    assert last.grade is not None and last.grade.status == "correct"
    assert last.messages[-1] == {"role": "assistant", "content": ANSWER}


def test_env_with_a_rubric_passes_check_env():
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=full_rubric())
    report = envs.check_env(env, actions=[GOOD_CALL, ANSWER])
    assert report.ok, report
    made = envs.make("alp/Math-v0", dataset="aime24", rubric=full_rubric())
    assert envs.check_env(made).ok


# ----------------------------------------------------------------------------- errors


def test_reward_function_and_rubric_errors_name_the_culprit():
    def constant(inp: envs.RewardInput) -> float:
        return 1.0

    with pytest.raises(ValueError, match="reserved"):
        envs.RewardFunc("mean", constant)
    with pytest.raises(ValueError, match="letters, digits"):
        envs.RewardFunc("has space", constant)
    with pytest.raises(ValueError, match="finite"):
        envs.RewardFunc("x", constant, weight=math.inf)
    with pytest.raises(TypeError, match="callable"):
        envs.RewardFunc("x", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        envs.Rubric([])
    with pytest.raises(ValueError, match=r"duplicate reward function names \['x'\]"):
        envs.Rubric([envs.RewardFunc("x", constant), envs.RewardFunc("x", constant)])
    with pytest.raises(TypeError, match="wrap it"):
        envs.Rubric([constant])  # type: ignore[list-item]
    with pytest.raises(KeyError, match="not in the rubric"):
        envs.Rubric([envs.RewardFunc("x", constant)]).total({"y": 1.0})
    with pytest.raises(TypeError, match="rubric must be an envs.Rubric"):
        envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=[constant])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_chars"):
        rewards.length(target_chars=0)
    with pytest.raises(ValueError, match="max_rewarded_turns"):
        rewards.tool_use(max_rewarded_turns=0)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(math.nan, ValueError, "'bad' returned nan"), ("1", TypeError, "'bad' returned str")],
)
def test_a_reward_function_returning_a_non_number_is_an_error(value, error, match):
    rubric = envs.Rubric([envs.RewardFunc("bad", lambda inp: value, per_turn=True)])
    env = envs.ToolEnv(problems=[PROBLEM], tools=[add], rubric=rubric)
    env.reset(seed=0)
    with pytest.raises(error, match=match):
        env.step(GOOD_CALL)
