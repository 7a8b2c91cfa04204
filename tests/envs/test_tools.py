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


# ----------------------------------------------------------------------------- async tools


def _tool_env(tools, **kwargs):
    return envs.ToolEnv(
        problems=[{"id": "a", "question": "Q?", "answer": "1"}], tools=tools, **kwargs
    )


def _call(name: str, **arguments) -> str:
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_async_tools_are_awaited_and_their_value_is_observed():
    @envs.tool
    async def double(x: int) -> int:
        """Double a number.

        Args:
            x: the number.
        """
        import asyncio

        await asyncio.sleep(0)
        return 2 * x

    assert double.is_async and not lookup.is_async
    env = _tool_env([double])
    env.reset(seed=0)
    obs, _, terminated, _, info = env.step(_call("double", x=21))
    assert not terminated and info["tool_results"][0]["status"] == "ok"
    assert info["tool_results"][0]["output"] == "42" and "coroutine" not in obs


def test_async_calls_of_one_turn_run_concurrently():
    """``wait`` can only finish if ``release`` runs while it waits: run one after the other,
    ``wait`` would hit its timeout. Results keep the order of the calls."""
    import asyncio

    gate: dict[str, asyncio.Event] = {}

    def event() -> asyncio.Event:
        return gate.setdefault("e", asyncio.Event())

    @envs.tool
    async def wait() -> str:
        """Wait for the release."""
        await event().wait()
        return "released"

    @envs.tool
    async def release() -> str:
        """Release the waiter."""
        event().set()
        return "done"

    env = _tool_env([wait, release], tool_timeout_s=5)
    env.reset(seed=0)
    _, _, _, _, info = env.step(_call("wait") + _call("release"))
    assert [(r["name"], r["status"], r.get("output")) for r in info["tool_results"]] == [
        ("wait", "ok", "released"),
        ("release", "ok", "done"),
    ]


def test_an_async_call_past_its_timeout_is_an_error_observation():
    @envs.tool
    async def hang() -> str:
        """Never returns."""
        import asyncio

        await asyncio.sleep(60)
        return "late"

    env = _tool_env([hang, lookup], tool_timeout_s=0.2)
    env.reset(seed=0)
    obs, _, terminated, _, info = env.step(_call("hang") + _call("lookup", city="Oslo"))
    assert not terminated
    assert info["tool_results"][0] == {
        "name": "hang",
        "arguments": {},
        "raw": info["tool_results"][0]["raw"],
        "status": "error",
        "error": "hang timed out after 0.2 s",
    }
    assert info["tool_results"][1]["status"] == "ok"  # the other call is unaffected
    assert "Error: hang timed out after 0.2 s" in obs
    with pytest.raises(ValueError, match="tool_timeout_s"):
        _tool_env([hang], tool_timeout_s=0)


def test_tool_calls_work_from_inside_a_running_event_loop():
    import asyncio

    @envs.tool
    async def one() -> int:
        """One."""
        return 1

    env = _tool_env([one])
    env.reset(seed=0)

    async def caller():
        return env.step(_call("one"))

    _, _, _, _, info = asyncio.run(caller())
    assert info["tool_results"][0]["output"] == "1"


# ----------------------------------------------------------------------------- the turn rules


def test_a_boxed_answer_before_the_first_call_ends_the_episode_one_after_it_does_not():
    env = _env()
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step("It is \\boxed{20}. " + _call("lookup", city="Oslo"))
    assert terminated and reward == 1.0 and info["tool_calls"] == 0  # the call never ran
    env.reset(seed=0)
    obs, _, terminated, _, info = env.step(_call("lookup", city="Oslo") + " so \\boxed{20}")
    assert not terminated and info["tool_calls"] == 1 and '"city": "Oslo"' in obs


def test_max_tool_errors_counts_turns_with_a_failed_call_not_calls():
    env = _env(max_tool_errors=2)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(_call("nope") + _call("nope") + _call("nope"))
    assert not terminated and info["tool_calls"] == 3  # three failed calls, one failing turn
    _, _, terminated, _, info = env.step(_call("lookup", city="Oslo") + _call("nope"))
    assert terminated and info["finish_reason"] == "tool_error"  # a turn with any failure counts


# ----------------------------------------------------------------------------- stateful tools


class NotebookEnv(envs.ToolEnv):
    """Tools that share per-episode state; setup/cleanup are logged to check their timing."""

    log: list[str] = []

    def setup_state(self, state):
        state["notes"] = []
        self.log.append(f"setup {self.problem.id}")

    def cleanup_state(self, state):
        self.log.append(f"cleanup {state['notes']}")


@envs.tool
def note(text: str, ctx: envs.ToolContext) -> str:
    """Write a note for this episode.

    Args:
        text: the note.
    """
    ctx.state["notes"].append(text)
    return f"{len(ctx.state['notes'])} notes on {ctx.problem.id} at turn {ctx.turn}"


@envs.tool
async def count_notes(ctx: envs.ToolContext) -> int:
    """How many notes this episode has."""
    return len(ctx.state["notes"])


def test_a_tool_context_parameter_is_hidden_from_the_model_and_filled_by_the_env():
    assert note.context_parameter == "ctx" and count_notes.context_parameter == "ctx"
    assert note.schema()["function"]["parameters"] == {
        "type": "object",
        "properties": {"text": {"type": "string", "description": "the note."}},
        "required": ["text"],
    }
    assert (
        '"ctx"'
        not in envs.ToolEnv(
            problems=[{"id": "p", "question": "q", "answer": "1"}], tools=[note]
        ).tool_system_prompt()
    )
    with pytest.raises(TypeError, match="takes a ToolContext"):
        note.call({"text": "x"})
    with pytest.raises(ToolCallError, match=r"unknown argument\(s\) \['ctx'\]"):
        note.validate({"text": "x", "ctx": {}})  # the model cannot set it
    with pytest.raises(TypeError, match="more than one ToolContext"):

        @envs.tool
        def twice(a: envs.ToolContext, b: envs.ToolContext) -> None:
            """Two contexts."""


def test_stateful_tools_share_the_episode_state_and_it_is_fresh_every_episode():
    NotebookEnv.log = []
    env = NotebookEnv(
        problems=[{"id": "a", "question": "q", "answer": "1"}, {"id": "b", "question": "q", "answer": "2"}],
        tools=[note, count_notes],
    )  # fmt: skip
    env.reset(seed=0, options={"problem_id": "a"})
    obs, *_ = env.step(_call("note", text="x") + _call("note", text="y"))
    assert "2 notes on a at turn 1" in obs
    _, _, _, _, info = env.step(_call("count_notes"))
    assert info["tool_results"][0]["output"] == "2"
    env.reset(options={"problem_id": "b"})  # the unfinished episode is cleaned up first
    _, _, _, _, info = env.step(_call("count_notes"))
    assert info["tool_results"][0]["output"] == "0"
    env.step("\\boxed{2}")  # the end of the episode cleans up
    assert env.log == ["setup a", "cleanup ['x', 'y']", "setup b", "cleanup []"]
    assert env.episode_state is None
    env.close()
    assert len(env.log) == 4  # nothing left to clean


# ----------------------------------------------------------------------------- one-shot and prompt


@envs.tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


EXAMPLE = envs.ToolExample("What is 2 + 3?", "add", {"a": 2, "b": 3}, answer="5")
PROBLEMS = [{"id": "p", "question": "What is 40 + 2?", "answer": "42"}]


@pytest.mark.parametrize("fmt", ["hermes", "qwen3_coder"])
def test_one_shot_example_is_written_in_the_env_s_call_format(fmt):
    env = envs.ToolEnv(problems=PROBLEMS, tools=[add], tool_format=fmt, one_shot=EXAMPLE)
    _, info = env.reset(seed=0)
    system, *shot, question = info["messages"]
    fmt_ = envs.get_tool_format(fmt)
    assert system["content"].startswith(
        "When you know the final answer, write it within \\boxed{}."
    )
    assert fmt_.instructions() in system["content"] and '"name": "add"' in system["content"]
    assert shot == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": fmt_.format_call("add", {"a": 2, "b": 3})},
        {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},  # the tool ran
        {"role": "assistant", "content": "The answer is \\boxed{5}."},
    ]
    assert question == {"role": "user", "content": "What is 40 + 2?"}
    # The call as the example writes it is a call the env runs.
    obs, *_ = env.step(fmt_.format_call("add", {"a": 40, "b": 2}))
    assert obs == "<tool_response>\n42\n</tool_response>"


def test_template_rendered_tools_change_the_prompt_the_one_shot_and_the_observations():
    env = envs.ToolEnv(problems=PROBLEMS, tools=[add], one_shot=EXAMPLE, system_prompt="Box it.")
    assert env.configure_tool_prompt(template_renders_tools=True) == [add.schema()]
    _, info = env.reset(seed=0)
    assert info["messages"][0] == {
        "role": "system",
        "content": "Box it.",
    }  # the template lists tools
    assert info["messages"][2:4] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
            ],
        },
        {"role": "tool", "content": "5"},
    ]
    _, _, _, _, info = env.step(_call("add", a=1, b=2) + _call("add", a="x", b=2))
    assert info["messages"] == [
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": "Error: add: argument 'a' must be an integer, got str 'x'"},
    ]
    # A template without tools: back to the system message (explicitly, for the next episode).
    assert env.configure_tool_prompt(template_renders_tools=False) is None
    _, info = env.reset(seed=0)
    assert "Tools:\n" in info["messages"][0]["content"]
    assert info["messages"][3]["content"] == "<tool_response>\n5\n</tool_response>"


def test_tool_prompt_options_are_checked():
    system = envs.ToolEnv(problems=PROBLEMS, tools=[add], tool_prompt="system")
    assert system.configure_tool_prompt(True) is None and not system.tools_in_template
    template = envs.ToolEnv(problems=PROBLEMS, tools=[add], tool_prompt="template")
    with pytest.raises(ValueError, match="does not render tools"):
        template.configure_tool_prompt(False)
    with pytest.raises(ValueError, match="tool_prompt must be one of"):
        envs.ToolEnv(problems=PROBLEMS, tools=[add], tool_prompt="native")


def test_one_shot_options():
    with pytest.raises(ValueError, match="needs an example"):
        envs.ToolEnv(problems=PROBLEMS, tools=[add], one_shot=True)

    class AddEnv(envs.ToolEnv):
        tools = [add]
        example = EXAMPLE

    assert AddEnv(problems=PROBLEMS, one_shot=True).one_shot[1]["role"] == "assistant"
    assert AddEnv(problems=PROBLEMS).one_shot == []  # off by default
    with pytest.raises(ValueError, match="unknown tool 'sub'"):
        AddEnv(problems=PROBLEMS, one_shot=envs.ToolExample("q", "sub", {}, "1"))
    with pytest.raises(ValueError, match="missing required argument"):
        AddEnv(problems=PROBLEMS, one_shot=envs.ToolExample("q", "add", {"a": 1}, "1"))
    with pytest.raises(ValueError, match="needs a ToolContext; give result="):
        envs.ToolEnv(
            problems=PROBLEMS,
            tools=[note],
            one_shot=envs.ToolExample("q", "note", {"text": "t"}, "1"),
        )
    given = envs.ToolEnv(
        problems=PROBLEMS, tools=[count_notes],
        one_shot=envs.ToolExample("How many?", "count_notes", {}, "0", result="0"),
    )  # fmt: skip
    assert given.one_shot[2]["content"] == "<tool_response>\n0\n</tool_response>"
    raw = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert AddEnv(problems=PROBLEMS, one_shot=raw).one_shot == raw  # messages used as they are


@pytest.mark.parametrize("fmt", ["hermes", "qwen3_coder"])
def test_template_mode_passes_check_env_in_both_formats(fmt):
    @envs.tool
    async def slow_add(a: int, b: int) -> int:
        """Add two integers, slowly.

        Args:
            a: the first number.
            b: the second number.
        """
        return a + b

    example = envs.ToolExample("What is 2 + 3?", "slow_add", {"a": 2, "b": 3}, answer="5")
    env = envs.ToolEnv(problems=PROBLEMS, tools=[slow_add], tool_format=fmt, one_shot=example)
    assert env.one_shot[2]["content"] == "<tool_response>\n5\n</tool_response>"  # awaited once
    env.configure_tool_prompt(True)
    call = env.tool_format.format_call("slow_add", {"a": 40, "b": 2})
    assert envs.check_env(env, actions=[call, "\\boxed{42}"]).ok


def test_a_thought_is_written_before_the_example_call_in_both_modes():
    example = envs.ToolExample("What is 2 + 3?", "add", {"a": 2, "b": 3}, "5", thought="I add.\n")
    env = envs.ToolEnv(problems=PROBLEMS, tools=[add], one_shot=example)
    assert env.one_shot[1]["content"] == "I add.\n" + env.tool_format.format_call(
        "add", example.arguments
    )
    env.configure_tool_prompt(True)
    assert env.one_shot[1]["content"] == "I add.\n" and env.one_shot[1]["tool_calls"]
