"""@envs.tool schemas and validation, tool-call parsing, and ToolEnv's error handling."""

from __future__ import annotations

from typing import Literal

import pytest

import envs
from envs.tools import ToolCallError


@envs.tool
def lookup(
    city: str,
    unit: Literal["C", "F"] = "C",
    days: int = 1,
    scale: float | None = None,
    tags: list[str] | None = None,
) -> dict:
    """Look up the weather forecast.

    Args:
        city: the city name,
            for example "Paris".
        unit: temperature unit.
        days: how many days ahead.
        scale: optional factor.
        tags: optional labels.

    Returns:
        the forecast.
    """
    return {"city": city, "unit": unit, "days": days}


def test_schema_from_signature_and_docstring():
    schema = lookup.schema()
    assert schema["type"] == "function" and schema["function"]["name"] == "lookup"
    assert schema["function"]["description"] == "Look up the weather forecast."
    params = schema["function"]["parameters"]
    assert params["required"] == ["city"]
    assert params["properties"]["city"] == {
        "type": "string",
        "description": 'the city name, for example "Paris".',
    }
    assert params["properties"]["unit"]["enum"] == ["C", "F"]
    assert params["properties"]["days"]["type"] == "integer"
    assert params["properties"]["scale"]["type"] == "number"
    assert params["properties"]["tags"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": "optional labels.",
    }


def test_validation_messages_name_the_problem():
    assert lookup.call({"city": "Oslo", "days": 2}) == {"city": "Oslo", "unit": "C", "days": 2}
    with pytest.raises(ToolCallError, match="missing required argument"):
        lookup.call({"unit": "C"})
    with pytest.raises(ToolCallError, match=r"unknown argument\(s\) \['town'\]"):
        lookup.call({"city": "Oslo", "town": "x"})
    with pytest.raises(ToolCallError, match="'days' must be an integer, got float 1.5"):
        lookup.call({"city": "Oslo", "days": 1.5})
    with pytest.raises(ToolCallError, match="must be one of"):
        lookup.call({"city": "Oslo", "unit": "K"})
    with pytest.raises(ToolCallError, match="must be an integer, got bool"):
        lookup.call({"city": "Oslo", "days": True})


def test_decorator_refuses_undescribable_functions():
    with pytest.raises(TypeError, match="needs a type annotation"):

        @envs.tool
        def untyped(x):
            """Doc."""

    with pytest.raises(TypeError, match="needs a description"):

        @envs.tool
        def undocumented(x: int) -> int:
            return x


def test_decorator_options_rename_and_describe():
    def add(a: int, b: int) -> int:
        return a + b

    named = envs.tool(name="add_numbers", description="Adds two integers.")(add)
    assert named.name == "add_numbers" and named.description == "Adds two integers."
    assert named(a=1, b=2) == 3


def test_parse_tool_calls():
    text = (
        'Sure. <tool_call>{"name": "lookup", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "lookup", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'
        "<tool_call>not json</tool_call>"
        '<tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "lookup", "arguments": {"city": "Bern"}}'  # unclosed at the end
    )
    calls = envs.parse_tool_calls(text)
    assert [c.arguments for c in calls[:2]] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert "not valid JSON" in calls[2].error and "must be" in calls[3].error
    assert calls[4].arguments == {"city": "Bern"}
    assert envs.parse_tool_calls("no calls") == []


def _env(**kwargs):
    return envs.ToolEnv(
        problems=[{"id": "w", "question": "How warm is Oslo?", "answer": "20"}],
        tools=[lookup],
        **kwargs,
    )


def test_malformed_calls_become_error_observations_then_tool_error():
    env = _env(max_tool_errors=2)
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step("<tool_call>{bad json}</tool_call>")
    assert not terminated and obs.startswith(
        "<tool_response>\nError: the tool call is not valid JSON"
    )
    assert info["tool_results"][0]["status"] == "error" and info["tool_calls"] == 1
    obs, reward, terminated, _, info = env.step(
        '<tool_call>{"name": "forecast", "arguments": {}}</tool_call>'
    )
    assert terminated and info["finish_reason"] == "tool_error" and reward == 0.0
    assert "unknown tool 'forecast'" in info["tool_results"][0]["error"]


def test_tool_exceptions_are_reported_and_a_good_call_resets_the_error_count():
    @envs.tool
    def fragile(x: int) -> int:
        """Fails on zero.

        Args:
            x: a number.
        """
        return 10 // x

    env = envs.ToolEnv(
        problems=[{"id": "f", "question": "q", "answer": "5"}], tools=[fragile], max_tool_errors=2
    )
    env.reset(seed=0)
    obs, *_ = env.step('<tool_call>{"name": "fragile", "arguments": {"x": 0}}</tool_call>')
    assert "fragile raised ZeroDivisionError" in obs
    obs, _, terminated, _, _ = env.step(
        '<tool_call>{"name": "fragile", "arguments": {"x": 2}}</tool_call>'
    )
    assert obs == "<tool_response>\n5\n</tool_response>" and not terminated
    obs, _, terminated, _, _ = env.step(
        '<tool_call>{"name": "fragile", "arguments": {"x": "a"}}</tool_call>'
    )
    assert not terminated  # one error after a success: not yet max_tool_errors in a row
    _, reward, terminated, _, info = env.step("It is \\boxed{5}.")
    assert terminated and reward == 1.0 and info["finish_reason"] == "answer"


def test_toolenv_requires_tools_and_passes_check_env():
    with pytest.raises(ValueError, match="has no tools"):
        envs.ToolEnv(problems=[{"id": "x", "question": "q", "answer": "1"}])
    env = _env()
    assert env.stop_sequences == ["</tool_call>"] and env.response_is_complete(
        "<tool_call>{}</tool_call>"
    )
    assert envs.check_env(
        env,
        actions=[
            '<tool_call>{"name": "lookup", "arguments": {"city": "Oslo"}}</tool_call>',
            "\\boxed{20}",
        ],
    ).ok
