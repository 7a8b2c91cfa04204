"""alp/Math-v0: one step, graded, terminated; options; misuse errors."""

from __future__ import annotations

import gymnasium
import pytest

import envs


def test_single_turn_episode_on_real_data():
    env = envs.make("alp/Math-v0", dataset="math500")
    obs, info = env.reset(options={"problem_id": "test/precalculus/807.json"})
    assert info["messages"] == [{"role": "user", "content": obs}]
    assert obs.startswith("Solve the following math problem step by step.")
    assert env.stop_sequences == [] and env.max_turns == 1
    obs, reward, terminated, truncated, info = env.step(
        r"... so $(r,\theta) = \boxed{(3, \pi/2)}$."
    )
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False)
    assert info["finish_reason"] == "answer" and info["grade"].status == "correct"
    assert info["source"] == "math500" and info["messages"] == []


def test_seeding_is_deterministic_and_spreads_over_the_dataset():
    env = envs.make("alp/Math-v0", dataset="gsm8k", split="test")
    first = [env.reset(seed=7)[1]["problem_id"]] + [env.reset()[1]["problem_id"] for _ in range(5)]
    again = [env.reset(seed=7)[1]["problem_id"]] + [env.reset()[1]["problem_id"] for _ in range(5)]
    other = envs.make("alp/Math-v0", dataset="gsm8k", split="test")
    assert (
        first
        == again
        == [other.reset(seed=7)[1]["problem_id"]]
        + [other.reset()[1]["problem_id"] for _ in range(5)]
    )
    assert len(set(first)) > 1


def test_prompt_options_and_answer_extraction():
    env = envs.make(
        "alp/Math-v0",
        dataset="gsm8k_test",
        instruction="Answer:",
        system_prompt="You are precise.",
        one_shot=True,
        answer_extraction="boxed_or_number",
    )
    _, info = env.reset(options={"problem_id": "gsm8k-test-0"})
    assert [m["role"] for m in info["messages"]] == ["system", "user", "assistant", "user"]
    assert info["messages"][-1]["content"].startswith("Answer:\n\n")
    _, reward, *_ = env.step("She makes 18 dollars.")
    assert reward == 1.0  # GSM8K-style last number


def test_custom_problems_and_reset_options():
    env = envs.make("alp/Math-v0", problems=[{"id": "p", "question": "1+1?", "answer": "2"}])
    _, info = env.reset(options={"problem": {"id": "q", "question": "2+2?", "answer": "4"}})
    assert info["problem_id"] == "q"
    assert env.step(r"\boxed{4}")[1] == 1.0
    with pytest.raises(KeyError, match="not in dataset"):
        env.reset(options={"problem_id": "zzz"})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"problme_id": "p"})
    with pytest.raises(ValueError, match="max_turns must be 1"):
        envs.make("alp/Math-v0", max_turns=3)


def test_misuse_raises_gymnasium_errors():
    env = envs.make("alp/Math-v0", dataset="aime24")
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step("before reset")
    env.reset(seed=0)
    env.step("no idea")
    with pytest.raises(gymnasium.error.ResetNeeded, match="after the episode ended"):
        env.step("again")
    env.reset()
    with pytest.raises(TypeError, match="str"):
        env.step(42)


def test_render_ansi():
    env = envs.make("alp/Math-v0", dataset="aime24", render_mode="ansi")
    env.reset(seed=0)
    env.step(r"\boxed{1}")
    text = env.render()
    assert text.startswith("[user]\n") and "[assistant]\n\\boxed{1}" in text


def test_check_env_passes():
    report = envs.check_env(envs.make("alp/Math-v0", dataset="math500"))
    assert report.ok and "gymnasium.utils.env_checker.check_env" in report.passed


def test_unknown_problem_id_names_the_closest_ids():
    env = envs.make("alp/Math-v0", dataset="arith", split="test")
    with pytest.raises(KeyError, match=r"arith-tset-3.*Did you mean 'arith-test-3'"):
        env.reset(options={"problem_id": "arith-tset-3"})
    with pytest.raises(KeyError, match=r"\(\d+ problems\)\.\W*$"):  # nothing close: no hint
        env.reset(options={"problem_id": "zzz"})
