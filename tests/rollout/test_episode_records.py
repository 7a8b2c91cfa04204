"""Step records and episode statistics from a real PythonToolEnv episode, and the engine protocol.

`ProtocolEngine` is written only to `InferenceEngine`'s documented signature (one
`SamplingParams` per prompt, indexed as a sequence) and replays a fixed script of assistant
turns, so the tool calls that fail, the void turn and the grades are known exactly and the
statistics can be checked by value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

import envs
from alp_agents.rollout import run_episodes
from alp_agents.rollout.engines import InferenceEngine, Sample, SamplingParams
from alp_agents.rollout.stats import episode_stats

FAILING_CODE = "Let me compute.\n```python\nprint(1 / 0)\n```\n"
WORKING_CODE = "```python\nprint(2 + 2)\n```\n"
ANSWER = "The answer is \\boxed{4}."
VOID = "I am not sure what to do."

SCRIPTS = [
    [FAILING_CODE, WORKING_CODE, ANSWER],  # episode 0: one failing and one working call, answer
    [VOID],  # episode 1: a void turn ends it
]


class ProtocolEngine:
    """Replays ``scripts[i]`` turn by turn for the i-th episode of the first call.

    Only what the protocol documents is used: ``sampling`` is a sequence with one entry per
    prompt (``sampling[i]``); a single `SamplingParams` would fail here (not subscriptable).
    """

    def __init__(self, tokenizer: Any, scripts: list[list[str]]) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.episodes: list[tuple[list[int], list[str]]] = []  # (initial prompt, turns left)
        self.seen: list[SamplingParams] = []

    def generate(
        self, prompts: list[list[int]], sampling: Sequence[SamplingParams]
    ) -> list[Sample]:
        assert len(sampling) == len(prompts)
        if not self.episodes:
            self.episodes = [(list(p), list(s)) for p, s in zip(prompts, self.scripts, strict=True)]
        out = []
        for prompt, params in zip(prompts, sampling, strict=True):
            self.seen.append(params)
            _, turns = next(e for e in self.episodes if prompt[: len(e[0])] == e[0])
            text = turns.pop(0)
            ids = self.tokenizer.encode(text, add_special_tokens=False)[: params.max_tokens]
            finish = "stop" if "```python" in text else "eos"
            if finish == "eos":
                ids.append(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
            out.append(Sample(ids, [-0.5] * len(ids), finish))
        return out

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Scripted: no weights."""


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
