"""Step records and episode statistics from a real PythonToolEnv episode, and the engine protocol.

`ProtocolEngine` (rollout_helpers) is written only to `InferenceEngine`'s documented signature (one
`SamplingParams` per prompt, indexed as a sequence) and replays a fixed script of assistant
turns, so the tool calls that fail, the void turn and the grades are known exactly and the
statistics can be checked by value.
"""

from __future__ import annotations

import pytest

import envs
from alp_agents.rollout import run_episodes
from alp_agents.rollout.engines import InferenceEngine, SamplingParams
from alp_agents.rollout.stats import episode_stats

from .rollout_helpers import FAILING_CODE, SCRIPTS, VOID, WORKING_CODE, ProtocolEngine


@pytest.fixture(scope="module")
def scripted_run(tokenizer):
    engine = ProtocolEngine(tokenizer, [list(s) for s in SCRIPTS])
    assert isinstance(engine, InferenceEngine)
    trajectories = run_episodes(
        "alp/PythonTool-v0", engine, tokenizer, envs.load_dataset("arith", split="train")[:2],
        group_size=1, sampling=SamplingParams(max_tokens=64), max_turns=4, progress=False,
        seed=5, env_kwargs={"dataset": "arith", "split": "train"},
    )  # fmt: skip
    return engine, trajectories


def test_an_engine_written_to_the_protocol_runs_run_episodes(scripted_run):
    engine, (worked, void) = scripted_run
    assert [t.num_turns for t in (worked, void)] == [3, 1]
    assert [t.finish_reason for t in (worked, void)] == ["answer", "void_turn"]
    # Every request got its own parameters, with a per-round seed derived from the run's seed.
    assert all(isinstance(p, SamplingParams) and p.seed is not None for p in engine.seen)
    assert len({p.seed for p in engine.seen}) == 3  # three rounds


def test_steps_record_actions_tool_results_observations_and_the_grade(scripted_run):
    _, (worked, void) = scripted_run
    first, second, last = worked.steps
    assert first.action == FAILING_CODE and second.action == WORKING_CODE
    [failed] = first.tool_calls
    assert (failed.name, failed.status, failed.code) == ("python", "error", "print(1 / 0)")
    assert "ZeroDivisionError" in failed.error and "ZeroDivisionError" in failed.observation
    assert first.observation and "ZeroDivisionError" in first.observation[0]["content"]
    [ok] = second.tool_calls
    assert (ok.status, ok.output.strip(), ok.failed) == ("ok", "4", False)
    assert last.tool_calls == [] and last.observation == [] and last.finish_reason == "answer"
    assert worked.grade is last.grade and worked.grade.extracted == "4"
    assert worked.grade.status == worked.grade_status
    assert worked.num_tool_calls == 2 and worked.num_tool_errors == 1
    [only] = void.steps
    assert (only.action, only.finish_reason, only.tool_calls) == (VOID, "void_turn", [])


def test_episode_stats_values_with_known_failing_tool_calls(scripted_run):
    _, trajectories = scripted_run
    stats = episode_stats(trajectories)
    assert stats["env/tool_error_ratio"] == pytest.approx(1 / 2)  # 1 failed of 2 calls
    assert stats["env/void_turn_ratio"] == pytest.approx(1 / 4)  # 1 void turn of 4 turns
    assert stats["env/void_episode_ratio"] == pytest.approx(1 / 2)  # 1 of 2 episodes
    assert stats["env/tool_calls_mean"] == pytest.approx(1.0)
    assert stats["env/code_use_ratio"] == pytest.approx(1 / 2)
    assert stats["env/turns_mean"] == pytest.approx(2.0)
    assert stats["finish/answer"] == stats["finish/void_turn"] == pytest.approx(1 / 2)


# ----------------------------------------------------------------------------- rewards


def test_default_rewards_are_unchanged_binary_and_at_the_end(scripted_run, tokenizer):
    _, (worked, void) = scripted_run
    # No rubric: every step's reward is 0.0 (the arith answer is not 4), no rubric values.
    assert [s.reward for s in worked.steps] == [0.0, 0.0, 0.0] and worked.reward == 0.0
    assert [s.rewards for s in worked.steps + void.steps] == [{}, {}, {}, {}]
    assert worked.grade.score == 0.0
    engine = ProtocolEngine(tokenizer, [["\\boxed{204}"], ["\\boxed{24}"]])
    right, wrong = run_episodes(
        "alp/Math-v0", engine, tokenizer, ["aime2024-I-1", "aime2024-I-2"], group_size=1,
        sampling=SamplingParams(max_tokens=16), progress=False, seed=0,
        env_kwargs={"dataset": "aime24"},
    )  # fmt: skip
    assert (right.reward, right.turn_rewards, right.grade.score) == (1.0, [1.0], 1.0)
    assert (wrong.reward, wrong.turn_rewards, wrong.grade.score) == (0.0, [0.0], 0.0)
    assert right.reward_components == {} == wrong.reward_components
    stats = episode_stats([right, wrong])
    assert stats["reward/mean"] == 0.5
    assert [k for k in stats if k.startswith("reward/")] == ["reward/mean"]


RUBRIC = envs.Rubric(
    [
        envs.rewards.correctness(),
        envs.rewards.answer_format(weight=0.25),
        envs.rewards.tool_use(weight=0.5),
        envs.rewards.length(target_chars=50, weight=0.5),
    ]
)


@pytest.fixture(scope="module")
def rubric_run(tokenizer):
    engine = ProtocolEngine(tokenizer, [list(s) for s in SCRIPTS])
    return run_episodes(
        "alp/PythonTool-v0", engine, tokenizer, envs.load_dataset("arith", split="train")[:2],
        group_size=1, sampling=SamplingParams(max_tokens=64), max_turns=4, progress=False,
        seed=5, env_kwargs={"dataset": "arith", "split": "train", "rubric": RUBRIC},
    )  # fmt: skip


def test_rubric_values_are_recorded_per_turn(rubric_run):
    worked, void = rubric_run
    # Turn 0: the call raised (tool_use 0); turn 1: it ran (0.5 * 1); turn 2: a wrong boxed
    # answer: format 1, correctness 0, and 43 + 27 + 24 = 94 chars, 44 over 50: length -0.88.
    assert [s.rewards for s in worked.steps[:2]] == [{"tool_use": 0.0}, {"tool_use": 1.0}]
    assert worked.steps[2].rewards == {
        "correctness": 0.0,
        "format": 1.0,
        "tool_use": 0.0,
        "length": pytest.approx(-0.88),
    }
    assert worked.turn_rewards == [0.0, 0.5, pytest.approx(0.25 * 1.0 + 0.5 * -0.88)]
    assert worked.reward == pytest.approx(0.5 + 0.25 - 0.44)  # 0.31, the sum of the turns
    # The void turn (25 chars): nothing earned.
    assert void.steps[0].rewards == {
        "correctness": 0.0,
        "format": 0.0,
        "tool_use": 0.0,
        "length": 0.0,
    }
    assert void.reward == 0.0


def test_episode_stats_log_each_reward_function(rubric_run):
    stats = episode_stats(rubric_run)
    assert stats["reward/mean"] == pytest.approx(0.31 / 2)
    assert stats["reward/correctness"] == 0.0
    assert stats["reward/format"] == 0.5
    assert stats["reward/tool_use"] == 0.5
    assert stats["reward/length"] == pytest.approx(-0.44)
    weighted = sum(RUBRIC.weights[n] * stats[f"reward/{n}"] for n in RUBRIC.weights)
    assert weighted == pytest.approx(stats["reward/mean"])
