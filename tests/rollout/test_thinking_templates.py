"""Thinking-model templates that rewrite history (Qwen3 drops earlier <think> blocks).

The rollout keeps every turn as sampled, reasoning included, and takes only the template's text
around the turns from the template (`ChatDelta`). These tests use Qwen3's own template text
(tests/rollout/rollout_helpers.QWEN3_TEMPLATE) on a copy of the SmolLM2 tokenizer with
``<think>``/``</think>`` added, first on the deltas, then through real PythonTool episodes with a
tiny model whose turns are forced by a logits bias (a think block, a python call run in the
sandbox, a second think block and a boxed answer). Templates that change anything besides the
inside of earlier assistant turns are still refused, each with its reason.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import envs
from alp_agents.models import make_tiny_model
from alp_agents.rollout import agent_loop, run_episodes
from alp_agents.rollout.chat import ChatDelta, ChatTemplateError, encode, render
from alp_agents.rollout.engines import HFEngine, SamplingParams

from .rollout_helpers import (
    TEMPLATES,
    RecordingEngine,
    check_token_in_token_out,
    force_next_tokens,
    make_template_tokenizer,
)

INITIAL = [{"role": "user", "content": "What is 6 * 7? Use Python."}]
THINK = "<think>\nI should run the product in Python.\n</think>\n\n"
ANSWER = "```python\nprint(6 * 7)\n```"
ARITH = {"dataset": "arith", "split": "train"}


@pytest.fixture(scope="module")
def qwen3(tokenizer):
    return make_template_tokenizer(tokenizer, "qwen3")


def observation(role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": "Code execution result: 42"}]


def text_after_turn(full: str, turn_text: str) -> str:
    """What a rendering has after the assistant turn whose content ends with ``turn_text``."""
    end = full.index("<|im_end|>\n", full.index(turn_text)) + len("<|im_end|>\n")
    return full[end:]


# ------------------------------------------------------------------------------ deltas


@pytest.mark.parametrize("role", ["user", "tool"])
def test_qwen3_delta_is_the_templates_text_around_the_kept_reasoning(qwen3, role):
    """Prompt, sampled turn (think block included), closing and observation delta: every
    template token is the template's own text for the new messages, and the turn is kept as
    sampled. With a user message after it, the stock rendering of the whole conversation drops
    the turn's think block (and only that); after tool results it keeps it, so the trajectory
    is exactly the template's rendering."""
    delta = ChatDelta(qwen3, INITIAL)
    assert delta.prompt_ids == list(
        qwen3.apply_chat_template(INITIAL, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert qwen3.decode(delta.closing_ids) == "<|im_end|>\n"
    assert delta.end_of_turn_id == qwen3.convert_tokens_to_ids("<|im_end|>")
    sampled = encode(qwen3, THINK + ANSWER)
    assert sampled[0] == qwen3.convert_tokens_to_ids("<think>")
    obs = observation(role)
    observation_ids = delta.observation_ids(obs)  # refused before: the template rewrites history
    conversation = [*INITIAL, {"role": "assistant", "content": THINK + ANSWER}, *obs]
    stock = render(qwen3, conversation, generation_prompt=True)
    assert observation_ids == encode(qwen3, text_after_turn(stock, ANSWER))
    built = delta.prompt_ids + sampled + delta.closing_ids + observation_ids
    assert built[: len(delta.prompt_ids) + len(sampled)] == delta.prompt_ids + sampled
    kept = qwen3.decode(built)
    assert THINK in kept
    if role == "user":
        assert "<think>" not in stock and delta.rewrites_history(obs)
        assert kept.replace(THINK, "", 1) == stock
    else:
        assert THINK in stock and not delta.rewrites_history(obs)
        assert kept == stock


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_that_keep_history_are_not_flagged(template_tokenizers, name):
    delta = ChatDelta(template_tokenizers[name], INITIAL)
    assert not delta.rewrites_history(observation("user"))
    assert not delta.rewrites_history(observation("tool"))


CHATML_TURN = "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
GENERATION = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
INCONSISTENT = {
    # Renders the last message only: the earlier turns disappear.
    "last message only": (
        "{%- set m = messages[-1] %}" + CHATML_TURN + GENERATION,
        "appears 0 times",
    ),
    # Mistral-style: the system prompt goes into the LAST user message, so appending a user
    # message moves it out of the prompt the model was given.
    "system prompt in the last user message": (
        "{%- set sys = messages[0].content if messages[0].role == 'system' else '' %}"
        "{%- set ns = namespace(last=0) %}"
        "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}"
        "{%- endif %}{%- endfor %}"
        "{%- for m in messages %}{%- if m.role != 'system' %}"
        "{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if loop.index0 == ns.last and sys %}{{- sys + '\\n\\n' }}{%- endif %}"
        "{{- m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}" + GENERATION,
        "messages before the model's turn render differently",
    ),
    # Writes a note before an assistant turn only once it is not the last message.
    "text inserted before an earlier turn": (
        "{%- for m in messages %}"
        "{%- if m.role == 'assistant' and not loop.last %}{{- '(earlier reply)\\n' }}{%- endif %}"
        + CHATML_TURN
        + "{%- endfor %}"
        + GENERATION,
        "writes other text between the earlier messages and the assistant turn",
    ),
    # GPT-OSS-style: the last assistant turn ends with another token than the earlier ones
    # (<|return|> vs <|end|> there; <|endoftext|> vs <|im_end|> here), so the end-of-turn the
    # model sampled would change once the conversation goes on.
    "end of turn changes": (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content }}"
        "{%- if m.role == 'assistant' and loop.last %}{{- '<|endoftext|>' }}"
        "{%- else %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}" + GENERATION,
        "an assistant turn ends differently once messages follow it",
    ),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_templates_that_rewrite_more_than_assistant_turns_are_refused(tokenizer, case):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template, reason = INCONSISTENT[case]
    initial = [{"role": "system", "content": "Be brief."}, *INITIAL]
    delta = ChatDelta(tok, initial)  # the prompt itself is fine: single-turn episodes work
    with pytest.raises(ChatTemplateError, match="re-renders earlier turns") as error:
        delta.observation_ids(observation("user"))
    assert reason in str(error.value)
    assert "Qwen3" in str(error.value)  # says which rewriting is supported


# ------------------------------------------------------------------------------ episodes


def queued(script: list[int]):
    """``choose`` for `force_next_tokens` on a one-row engine: every forward (prefill or decode
    step) forces the next id of ``script``, across generate calls (turns)."""
    left = list(script)

    def choose(last, positions):
        return torch.full_like(last, left.pop(0) if left else -1)

    return choose


def thinking_turns(tok, problem) -> tuple[list[int], list[int]]:
    """A think block and a python call; then a think block and the boxed answer, ended by the
    model's own <|im_end|>."""
    first = encode(tok, f"{THINK}```python\nprint({problem.metadata['expression']})\n```\n")
    second = encode(
        tok, f"<think>\nIt printed the product.\n</think>\n\n\\boxed{{{problem.answer}}}"
    )
    return first, [*second, tok.convert_tokens_to_ids("<|im_end|>")]


def run_thinking_episode(tok, role: str):
    problem = envs.load_dataset("arith", split="train")[0]
    first, second = thinking_turns(tok, problem)
    hf = HFEngine(make_tiny_model(tokenizer=tok), tok, dtype=torch.float32)
    force_next_tokens(hf.model, queued(first + second))
    engine = RecordingEngine(hf)
    [traj] = run_episodes(
        "alp/PythonTool-v0", engine, tok, [problem], group_size=1,
        sampling=SamplingParams(max_tokens=64), env_kwargs={**ARITH, "observation_role": role},
        max_turns=3, progress=False, seed=0,
    )  # fmt: skip
    return traj, engine, problem, first, second


@pytest.mark.parametrize("role", ["user", "tool"])
def test_thinking_episode_is_token_exact_and_keeps_the_reasoning(qwen3, role, caplog, monkeypatch):
    """A real two-turn PythonTool episode under Qwen3's template: the engine got exactly the
    trajectory's prefixes, the turns are the forced ids verbatim (think blocks included), the
    second turn's context holds the first turn's reasoning, the template tokens are the
    template's text for the observation, and the only difference from the stock rendering of
    the conversation is the first turn's think block, dropped by the template when the result
    comes as a user message (with a warning, once) and kept when it comes as a tool message."""
    monkeypatch.setattr(agent_loop, "_HISTORY_NOTED", set())
    with caplog.at_level(logging.WARNING, logger=agent_loop.__name__):
        traj, engine, problem, first, second = run_thinking_episode(qwen3, role)
        delta = ChatDelta(qwen3, traj.messages[: traj.metrics["initial_messages"]])
        agent_loop._note_history_rewrite(delta, traj.steps[0].observation)  # noted already
    traj.validate()
    check_token_in_token_out([traj], engine.calls)
    assert (traj.finish_reason, traj.grade_status, traj.reward) == ("answer", "correct", 1.0)
    assert traj.num_turns == 2 and traj.num_tool_calls == 1
    assert traj.steps[0].tool_calls[0].status == "ok"
    assert traj.sampled_ids(0) == first and traj.sampled_ids(1) == second
    assert len(engine.calls) == 2
    context = traj.context_at_turn(1)
    assert context[len(traj.prompt_ids) : len(traj.prompt_ids) + len(first)] == first
    assert traj.messages[-3]["content"].startswith(THINK)  # the env got the turn's whole text

    obs = traj.steps[0].observation
    assert [m["role"] for m in obs] == [role]
    template_tokens = traj.response_ids[len(first) : traj.turn_start(1)]
    call = f"print({problem.metadata['expression']})\n```\n"
    stock_after = text_after_turn(render(qwen3, traj.messages[:-1], True), call)
    assert template_tokens == delta.closing_ids + encode(qwen3, stock_after)
    assert traj.response_ids[traj.turn_start(1) + len(second) :] == delta.closing_after(second)

    kept = qwen3.decode(traj.input_ids)
    stock = render(qwen3, traj.messages, generation_prompt=False)
    warnings = [r for r in caplog.records if "rewrites an assistant turn" in r.getMessage()]
    if role == "user":
        assert THINK not in stock and kept.replace(THINK, "", 1) == stock
        assert len(warnings) == 1
    else:
        assert kept == stock
        assert warnings == []


def test_inconsistent_template_still_stops_a_real_episode(tokenizer):
    """The GPT-OSS-style template (another end of turn once the conversation goes on) fails at
    the first observation of a real episode, with the reason."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = INCONSISTENT["end of turn changes"][0]
    with pytest.raises(ChatTemplateError, match="ends differently once messages follow it"):
        run_thinking_episode(tok, "user")
