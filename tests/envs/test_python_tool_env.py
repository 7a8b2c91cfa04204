"""alp/PythonTool-v0 on the real sandbox: scripted multi-turn episodes, budgets, stop rule."""

from __future__ import annotations

import os
import signal
import threading
import time

import gymnasium
import pytest

import envs
from sandbox import Limits, LocalSandbox


def make(**kwargs):
    kwargs.setdefault("dataset", "arith")
    kwargs.setdefault("split", "test")
    return envs.make("alp/PythonTool-v0", **kwargs)


def test_initial_messages_follow_the_release_prompt_with_a_one_shot_example():
    env = make()
    obs, info = env.reset(seed=3, options={"problem_id": "arith-test-17"})
    question = envs.load_dataset("arith", split="test")[17].question
    roles = [m["role"] for m in info["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert info["messages"][1]["content"].startswith("```python\n")
    assert info["messages"][2]["content"].startswith("Code execution result: ")
    assert obs == info["messages"][-1]["content"] and obs.endswith(question)
    assert "```python" in obs and "\\boxed{}" in obs and "Code execution result" in obs
    plain = make(one_shot=False, system_prompt="Be brief.", observation_role="tool")
    _, info = plain.reset(options={"problem_id": "arith-test-17"})
    assert [m["role"] for m in info["messages"]] == ["system", "user"]


def test_scripted_episode_keeps_state_across_turns_and_grades_the_printed_answer():
    env = make()
    _, info = env.reset(options={"problem_id": "arith-test-0"})
    problem = envs.load_dataset("arith", split="test")[0]
    a, b = problem.metadata["expression"].split(" * ")

    obs, reward, terminated, truncated, info = env.step(
        f"Let me multiply.\n```python\nx = {a} * {b}\n```\n"
    )
    assert (terminated, truncated, reward, info["turn"], info["tool_calls"]) == (
        False,
        False,
        0.0,
        1,
        1,
    )
    assert info["messages"] == [{"role": "user", "content": "Code execution result: "}]
    assert (
        info["tool_results"][0]["status"] == "ok"
        and info["tool_results"][0]["code"] == f"x = {a} * {b}"
    )

    obs, reward, terminated, truncated, info = env.step(
        "```python\nprint(x)\n```\n"
    )  # x from turn 1
    assert obs == f"Code execution result: {problem.answer}" and not terminated

    obs, reward, terminated, truncated, info = env.step(
        f"So the product is \\boxed{{{problem.answer}}}."
    )
    assert (reward, terminated, truncated, obs) == (1.0, True, False, "")
    assert (
        info["finish_reason"] == "answer"
        and info["grade"].status == "correct"
        and info["messages"] == []
    )
    assert info["turn"] == 3 and info["tool_calls"] == 2 and info["tool_results"] == []
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step("one more")
    transcript = env.messages
    assert [m["role"] for m in transcript[-5:]] == [
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert transcript[-1] == {
        "role": "assistant",
        "content": f"So the product is \\boxed{{{problem.answer}}}.",
    }


def test_stateless_option_runs_every_block_in_a_fresh_process():
    env = make(stateful=False)
    env.reset(options={"problem_id": "arith-test-0"})
    env.step("```python\nx = 5\n```\n")
    obs, *_ = env.step("```python\nprint(x)\n```\n")
    assert obs == "Code execution result: NameError: name 'x' is not defined"


def test_boxed_answer_printed_by_the_code_ends_the_episode():
    env = make()
    env.reset(options={"problem_id": "arith-test-1"})
    expression = envs.load_dataset("arith", split="test")[1].metadata["expression"]
    _, reward, terminated, _, info = env.step(
        f"```python\nprint('\\\\boxed{{%d}}' % ({expression}))\n```\n"
    )
    assert terminated and reward == 1.0 and info["finish_reason"] == "answer"
    assert info["tool_results"][0]["stdout"].startswith("\\boxed{")


def test_wrong_answer_void_turn_and_max_turns():
    env = make(max_turns=2)
    env.reset(options={"problem_id": "arith-test-2"})
    _, reward, terminated, _, info = env.step("\\boxed{12}")
    assert (
        terminated
        and reward == 0.0
        and info["grade"].status == "wrong"
        and info["finish_reason"] == "answer"
    )

    env.reset(options={"problem_id": "arith-test-2"})
    _, reward, terminated, truncated, info = env.step("I will think about it.")
    assert (
        terminated
        and not truncated
        and info["finish_reason"] == "void_turn"
        and info["messages"] == []
    )
    assert info["grade"].status == "wrong" and info["grade"].extracted is None

    env.reset(options={"problem_id": "arith-test-2"})
    env.step("```python\nprint(1)\n```\n")
    _, reward, terminated, truncated, info = env.step("```python\nprint(2)\n```\n")
    assert (terminated, truncated, info["finish_reason"]) == (False, True, "max_turns")
    assert info["messages"] == [] and info["tool_calls"] == 2 and reward == 0.0


def test_errors_and_timeouts_become_observations():
    env = make(limits=Limits(timeout_s=1.0))
    env.reset(options={"problem_id": "arith-test-3"})
    obs, *_ = env.step("```python\nprint('partial')\nraise ValueError('bad value')\n```\n")
    assert (
        obs == "Code execution result: ValueError: bad value"
    )  # last stderr line wins over stdout
    obs, _, terminated, _, info = env.step("```python\nwhile True:\n    pass\n```\n")
    assert not terminated and info["tool_results"][0]["status"] == "timeout"
    assert "Timeout" in obs or "time" in obs.lower()


def test_observation_budget_keeps_head_and_tail_with_a_marker():
    env = make(max_observation_chars=100)
    env.reset(options={"problem_id": "arith-test-4"})
    obs, *_ = env.step("```python\nprint('A' * 1000 + 'B' * 1000)\n```\n")
    assert obs.startswith("Code execution result: " + "A" * 50) and obs.endswith("B" * 50)
    assert "[1900 characters omitted]" in obs
    assert env.max_observation_tokens == 256  # the rollout applies the token budget


def test_stop_rule():
    env = make()
    (stop,) = env.stop_sequences
    text = "Compute it.\n```python\nprint(2 ** 10)\n```\nThe answer is"
    assert text.find(stop) == text.index("```\nThe")  # the opening fence does not match
    assert not env.response_is_complete("```python\nprint(1)\n")
    assert env.response_is_complete("```python\nprint(1)\n```")
    # Text after the first block (a generator that did not stop) is ignored: only block 1 runs.
    env.reset(options={"problem_id": "arith-test-5"})
    obs, *_ = env.step("```python\nprint(1)\n```\n```python\nprint(2)\n```\n")
    assert obs == "Code execution result: 1"


def test_many_envs_step_concurrently_on_the_shared_sandbox():
    environments = [make() for _ in range(8)]
    for i, env in enumerate(environments):
        env.reset(options={"problem_index": i})
    outputs: dict[int, list[str]] = {}

    def episode(i: int) -> None:
        env = environments[i]
        first, *_ = env.step(f"```python\nv = {i} * 1000\n```\n")
        second, *_ = env.step("```python\nprint(v + 1)\n```\n")
        outputs[i] = [first, second]

    threads = [threading.Thread(target=episode, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs == {
        i: ["Code execution result: ", f"Code execution result: {i * 1000 + 1}"] for i in range(8)
    }
    sandboxes = {id(env.sandbox) for env in environments}
    assert sandboxes == {id(envs.shared_sandbox())}  # one sandbox for all
    for env in environments:
        env.close()


def test_sandbox_failure_ends_the_episode_unverifiable_not_wrong():
    sandbox = LocalSandbox(workers=1)
    try:
        env = make(sandbox=sandbox, stateful=False)
        env.reset(options={"problem_id": "arith-test-6"})
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(
                step=env.step("```python\nimport time\ntime.sleep(3)\n```\n")
            )
        )
        sandbox.start()
        worker.start()
        time.sleep(0.7)
        for pid in sandbox.launcher_pids:  # our infrastructure dies under the snippet
            os.kill(pid, signal.SIGKILL)
        worker.join()
        _, reward, terminated, _, info = result["step"]
        assert terminated and reward == 0.0 and info["finish_reason"] == "sandbox_error"
        assert info["grade"].status == "unverifiable"
        env.reset(options={"problem_id": "arith-test-6"})
        obs, *_ = env.step("```python\nprint(7)\n```\n")  # the sandbox restarted its server
        assert obs == "Code execution result: 7"
    finally:
        sandbox.close()


def test_check_env_passes_for_both_modes():
    assert envs.check_env(make()).ok
    report = envs.check_env(
        make(stateful=False),
        actions=["```python\ny = 2\n```\n", "```python\nprint(3)\n```\n", "\\boxed{6}"],
    )
    assert report.ok, report
