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
