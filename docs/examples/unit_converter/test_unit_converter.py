"""Tests for the unit-converter example (run: ``python -m pytest docs/examples``).

They double as a template for testing your own environment: the tool alone, a scripted
episode with fixed actions, bad model output, and ``envs.check_env``.
"""

from __future__ import annotations

import pytest
import unit_converter_env as example

import envs

example.register()


def test_the_tool_converts_and_refuses_mixed_dimensions():
    assert example.convert(value=1.0, from_unit="mi", to_unit="km") == pytest.approx(1.609344)
    assert example.convert(value=212.0, from_unit="F", to_unit="C") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="cannot convert 'kg' to 'm'"):
        example.convert(value=1.0, from_unit="kg", to_unit="m")
    params = example.convert.schema()["function"]["parameters"]
    assert (
        params["required"] == ["value", "from_unit", "to_unit"]
        and params["properties"]["value"]["type"] == "number"
    )


def test_dataset_splits_are_disjoint_and_reproducible():
    train = envs.load_dataset("units", split="train")
    test = envs.load_dataset("units", split="test")
    assert envs.dataset_overlap(train, test).n_overlap == 0
    assert test == envs.load_dataset("units", split="test")


def test_scripted_episode_tool_call_then_answer():
    env = envs.make("units/Convert-v0")
    obs, info = env.reset(options={"problem_id": "units-test-3"})
    assert (
        info["messages"][0]["role"] == "system"
        and '"name": "convert"' in info["messages"][0]["content"]
    )
    value, source, _, target = _parse(obs)
    call = f'<tool_call>{{"name": "convert", "arguments": {{"value": {value}, "from_unit": "{source}", "to_unit": "{target}"}}}}</tool_call>'
    obs, reward, terminated, _, info = env.step("I will use the tool. " + call)
    assert not terminated and obs.startswith("<tool_response>\n")
    result = float(obs.split("\n")[1])
    _, reward, terminated, _, info = env.step(f"The result is \\boxed{{{result:.2f}}}.")
    assert terminated and reward == 1.0 and info["finish_reason"] == "answer"


def _parse(question: str) -> tuple[str, str, str, str]:
    # "Convert 474.1 ft to cm. Give ..." -> ("474.1", "ft", "to", "cm")
    words = question.split()
    return words[1], words[2], words[3], words[4].rstrip(".")


def test_bad_calls_are_shown_to_the_model_not_raised():
    env = envs.make("units/Convert-v0")
    env.reset(options={"problem_id": "units-test-0"})
    obs, _, terminated, _, info = env.step(
        '<tool_call>{"name": "convert", "arguments": {"value": "ten"}}</tool_call>'
    )
    assert not terminated and "Error:" in obs and info["tool_results"][0]["status"] == "error"
    obs, *_ = env.step(
        '<tool_call>{"name": "convert", "arguments": {"value": 1, "from_unit": "kg", "to_unit": "m"}}</tool_call>'
    )
    assert "cannot convert" in obs


def test_check_env():
    report = envs.check_env(envs.make("units/Convert-v0"))
    assert report.ok, report
