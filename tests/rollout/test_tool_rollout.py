"""Native tool calls in the rollout: schemas through the chat template's ``tools=``, each call
format parsed, and the token-in/token-out invariants on every (template, format) pair."""

from __future__ import annotations

import copy

import pytest

import envs
from alp_agents.rollout import run_episodes
from alp_agents.rollout.chat import ChatDelta, encode, render, template_renders_tools
from alp_agents.rollout.engines import SamplingParams

from .rollout_helpers import (
    TOOL_TEMPLATES,
    ProtocolEngine,
    RecordingEngine,
    check_token_in_token_out,
    make_template_tokenizer,
)


@envs.tool
def add(a: int, b: float) -> float:
    """Add two numbers.

    Args:
        a: an integer.
        b: a number.
    """
    return a + b


EXAMPLE = envs.ToolExample("What is 2 + 3.5?", "add", {"a": 2, "b": 3.5}, answer="5.5")
PROBLEMS = [
    envs.Problem("p0", "What is 40 + 2?", "42", "test"),
    envs.Problem(
        "p1", "What is 41 + 1?", "42", "test"
    ),  # the scripted engine tells episodes apart by prompt
]


@pytest.fixture(scope="module")
def tool_tokenizers(tokenizer):
    return {name: make_template_tokenizer(tokenizer, name) for name in (*TOOL_TEMPLATES, "smollm2")}


def test_template_renders_tools_tells_tool_templates_apart(tool_tokenizers, tokenizer):
    assert template_renders_tools(tool_tokenizers["qwen_tools"])
    assert template_renders_tools(tool_tokenizers["qwen3_coder"])
    assert not template_renders_tools(tool_tokenizers["smollm2"])  # SmolLM2 ignores tools=
    refuses = copy.deepcopy(tokenizer)
    refuses.chat_template = (
        "{%- if tools %}{{ raise_exception('tools are not supported') }}{%- endif %}"
        "{%- for m in messages %}{{ m.content }}{%- endfor %}"
    )
    assert not template_renders_tools(refuses)


@pytest.mark.parametrize("name", list(TOOL_TEMPLATES))
def test_chat_delta_passes_tools_to_every_render(tool_tokenizers, name):
    tok = tool_tokenizers[name]
    env = envs.ToolEnv(problems=PROBLEMS, tools=[add], tool_format=TOOL_TEMPLATES[name],
                       one_shot=EXAMPLE)  # fmt: skip
    tools = env.configure_tool_prompt(template_renders_tools(tok))
    _, info = env.reset(seed=0)
    delta = ChatDelta(tok, info["messages"], tools=tools)
    expected = tok.apply_chat_template(
        info["messages"], tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert delta.prompt_ids == encode(tok, expected)
    prompt = tok.decode(delta.prompt_ids)
    assert "# Tools" in prompt and "Add two numbers." in prompt
    # The one-shot call is written by the template, in the format the env parses.
    fmt = envs.get_tool_format(TOOL_TEMPLATES[name])
    assert fmt.format_call("add", {"a": 2, "b": 3.5}) in prompt
    [call] = fmt.parse(prompt.split("What is 2 + 3.5?")[1], {"add": add.parameters})
    assert (call.name, call.arguments) == ("add", {"a": 2, "b": 3.5})


def _scripts(fmt: envs.ToolFormat) -> list[list[str]]:
    good = "Let me add.\n" + fmt.format_call("add", {"a": 40, "b": 2})
    bad = fmt.format_call("add", {"a": "forty", "b": 2}) if fmt.name == "qwen3_coder" else (
        '<tool_call>{"name": "add", "arguments": {"a": 40</tool_call>'
    )  # fmt: skip
    return [
        [good, "So \\boxed{42}."],
        [bad, good + fmt.format_call("add", {"a": 1, "b": 1}), "\\boxed{42}"],
    ]


@pytest.mark.parametrize(
    "name,fmt",
    [("qwen_tools", "hermes"), ("qwen3_coder", "qwen3_coder"), ("smollm2", "hermes"),
     ("smollm2", "qwen3_coder")],
)  # fmt: skip
def test_tool_episodes_are_token_exact_for_every_format(tool_tokenizers, name, fmt):
    """Scripted tool calls (a good call, a malformed one, two calls in a turn) through the real
    loop: every engine prompt is the trajectory's prefix, the full sequence decodes to the
    template's rendering of the whole conversation (tools included when the template renders
    them), and each call was parsed in the env's format."""
    tok = tool_tokenizers[name]
    native = name != "smollm2"
    fmt_ = envs.get_tool_format(fmt)
    engine = RecordingEngine(ProtocolEngine(tok, _scripts(fmt_)))

    def factory(**kwargs):
        return envs.ToolEnv(
            problems=PROBLEMS, tools=[add], tool_format=fmt, one_shot=EXAMPLE, **kwargs
        )

    trajectories = run_episodes(
        factory, engine, tok, PROBLEMS, group_size=1, sampling=SamplingParams(max_tokens=200),
        progress=False, seed=0,
    )  # fmt: skip
    check_token_in_token_out(trajectories, engine.calls)
    for traj in trajectories:
        tools = traj.metrics.get("tools")
        assert (tools == [add.schema()]) if native else tools is None
        text = render(tok, traj.messages, generation_prompt=False, tools=tools)
        assert tok.decode(traj.input_ids) == text
        assert traj.input_ids == encode(tok, text)  # ChatML: no seam (test_chat_delta.py)
        assert ("# Tools" in text) == native and ("Tools:\n" in text) == (not native)
    good, bad = trajectories
    assert (good.reward, good.num_tool_calls, good.finish_reason) == (1.0, 1, "answer")
    assert (bad.reward, bad.num_tool_calls, bad.num_turns) == (1.0, 3, 3)
    first, second = bad.steps[0].tool_calls, bad.steps[1].tool_calls
    assert first[0].status == "error" and [c.status for c in second] == ["ok", "ok"]
    assert [c.output for c in second] == ["42.0", "2.0"]
    observation = bad.steps[1].observation
    if native:  # one tool message per call; the template groups them into one user turn
        assert observation == [
            {"role": "tool", "content": "42.0"},
            {"role": "tool", "content": "2.0"},
        ]
    else:
        assert observation == [
            {"role": "user", "content": "<tool_response>\n42.0\n</tool_response>\n"
                                        "<tool_response>\n2.0\n</tool_response>"}
        ]  # fmt: skip
