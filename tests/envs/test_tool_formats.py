"""Tool-call formats: Hermes JSON and Qwen3-Coder XML parsing, writing, and the format registry."""

from __future__ import annotations

from typing import Literal

import pytest

import envs
from envs.tool_formats import HermesFormat


@envs.tool
def plot(
    title: str,
    points: list[int],
    scale: float = 1.0,
    log: bool = False,
    color: Literal["red", "blue"] = "red",
) -> str:
    """Plot points.

    Args:
        title: the title.
        points: the values.
        scale: a factor.
        log: log scale.
        color: line colour.
    """
    return f"{title}: {len(points)} points x{scale} log={log} {color}"


PARAMETERS = {plot.name: plot.parameters}
XML = envs.get_tool_format("qwen3_coder")
HERMES = envs.get_tool_format("hermes")


def test_qwen3_coder_values_are_typed_by_the_schema():
    text = (
        "I will plot it.\n<tool_call>\n<function=plot>\n"
        "<parameter=title>\nTwo lines\nof title\n</parameter>\n"
        "<parameter=points>\n[1, 2, 3]\n</parameter>\n"
        "<parameter=scale>\n2\n</parameter>\n"
        "<parameter=log>\nTrue\n</parameter>\n"
        "<parameter=color>\nblue\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    [call] = XML.parse(text, PARAMETERS)
    assert call.error is None and call.name == "plot"
    assert call.arguments == {
        "title": "Two lines\nof title",  # only the markup's newlines are stripped
        "points": [1, 2, 3],
        "scale": 2,
        "log": True,
        "color": "blue",
    }
    assert plot.validate(call.arguments)["scale"] == 2.0  # the tool's check coerces int -> float
    assert XML.text_before_calls(text) == "I will plot it.\n"


def test_qwen3_coder_malformed_calls_come_back_with_an_error():
    no_function = XML.parse('<tool_call>\n{"name": "plot"}\n</tool_call>', PARAMETERS)
    assert no_function[0].name is None and "<function=TOOL NAME>" in no_function[0].error
    twice = XML.parse(
        "<tool_call>\n<function=plot>\n<parameter=title>\na\n</parameter>\n"
        "<parameter=title>\nb\n</parameter>\n</function>\n</tool_call>",
        PARAMETERS,
    )
    assert twice[0].error == "parameter 'title' is given twice"
    # Not JSON where a list is wanted: the text is kept and the tool's check names the type.
    [call] = XML.parse(
        "<tool_call>\n<function=plot>\n<parameter=points>\none, two\n</parameter>\n</function>",
        PARAMETERS,
    )  # unclosed call: generation ended before </tool_call>
    assert call.arguments == {"points": "one, two"}
    with pytest.raises(envs.ToolCallError, match="'points' must be an array, got str"):
        plot.validate({"title": "t", **call.arguments})
    # A parameter block without its closing tag ends at the next one.
    [call] = XML.parse(
        "<tool_call>\n<function=plot>\n<parameter=title>\nT\n<parameter=scale>\n3\n"
        "</function>\n</tool_call>",
        PARAMETERS,
    )
    assert call.arguments == {"title": "T", "scale": 3}


@pytest.mark.parametrize("name", ["hermes", "qwen3_coder"])
def test_a_written_call_parses_back_to_its_arguments(name):
    fmt = envs.get_tool_format(name)
    arguments = {"title": 'say "hi"\nthen <go>', "points": [4, 5], "scale": 0.5, "log": False}
    text = "Let me call it. " + fmt.format_call("plot", arguments) + " trailing text"
    [call] = fmt.parse(text, PARAMETERS)
    assert (call.name, call.arguments, call.error) == ("plot", arguments, None)
    assert fmt.stop_sequences == ["</tool_call>"]
    assert fmt.call_close in fmt.format_call("plot", arguments)


def test_hermes_parses_today_s_format():
    calls = envs.parse_tool_calls(
        '<tool_call>{"name": "plot", "arguments": {"title": "a"}}</tool_call>'
        '<tool_call>\n{"name": "plot", "parameters": "{\\"title\\": \\"b\\"}"}\n</tool_call>'
    )
    assert [(c.name, c.arguments) for c in calls] == [
        ("plot", {"title": "a"}),
        ("plot", {"title": "b"}),
    ]
    assert envs.parse_tool_calls(XML.format_call("plot", {"title": "a"}))[0].error.startswith(
        "the tool call is not valid JSON"
    )
    assert envs.parse_tool_calls(XML.format_call("plot", {"points": [1]}), "qwen3_coder", [plot])[
        0
    ].arguments == {"points": [1]}


class BracketFormat(HermesFormat):
    """A user's format: Hermes JSON between other tags."""

    name = "test_brackets"
    call_open, call_close = "[[call]]", "[[/call]]"


def test_registry_adds_formats_and_names_unknown_ones():
    assert {"hermes", "qwen3_coder"} <= set(envs.tool_formats())
    fmt = BracketFormat()
    envs.register_tool_format(fmt)
    envs.register_tool_format(fmt)  # the same object again is fine
    with pytest.raises(ValueError, match="already registered"):
        envs.register_tool_format(BracketFormat())
    env = envs.ToolEnv(
        problems=[{"id": "p", "question": "Plot.", "answer": "1"}],
        tools=[plot],
        tool_format="test_brackets",
    )
    assert env.stop_sequences == ["[[/call]]"] and env.response_is_complete("[[/call]]")
    env.reset(seed=0)
    obs, *_ = env.step(
        '[[call]]{"name": "plot", "arguments": {"title": "t", "points": [1]}}[[/call]]'
    )
    assert obs == "<tool_response>\nt: 1 points x1.0 log=False red\n</tool_response>"
    with pytest.raises(
        ValueError, match="unknown tool format 'qwen3-coder'.*Did you mean 'qwen3_coder'"
    ):
        envs.ToolEnv(problems=[{"id": "p", "question": "q", "answer": "1"}], tools=[plot],
                     tool_format="qwen3-coder")  # fmt: skip
    with pytest.raises(TypeError, match="not a named ToolFormat"):
        envs.register_tool_format(HermesFormat)
