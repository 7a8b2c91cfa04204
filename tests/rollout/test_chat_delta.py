"""Chat-template deltas on three templates: the appended tokens are exactly the template's."""

from __future__ import annotations

import pytest

from alp_agents.rollout.agent_loop import truncate_observation
from alp_agents.rollout.chat import ChatDelta, ChatTemplateError, encode, render

from .rollout_helpers import TEMPLATES

INITIAL = [{"role": "user", "content": "What is 6 * 7? Use Python."}]
ASSISTANT = "```python\nprint(6 * 7)\n```"
END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "qwen": "<|im_end|>"}


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_is_the_templates_generation_prompt(template_tokenizers, name):
    tok = template_tokenizers[name]
    delta = ChatDelta(tok, INITIAL)
    expected = tok.apply_chat_template(INITIAL, add_generation_prompt=True, return_dict=True)
    assert delta.prompt_ids == list(expected["input_ids"])
    if name == "qwen":
        assert "You are Qwen" in tok.decode(delta.prompt_ids)  # default system prompt rendered


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("role", ["user", "tool"])
def test_full_render_equals_prompt_sampled_closing_observation(template_tokenizers, name, role):
    """The pieces the loop appends (prompt, sampled ids, closing, observation delta) spell
    exactly the template's rendering of the whole conversation, for every template and two
    observation roles (Qwen groups consecutive tool messages into one user turn).

    Token for token it also equals re-tokenising that rendering for ChatML templates; for the
    Llama-3 one it does NOT: its generation prompt ends in "\n\n", which merges with the
    model's first characters when the whole text is re-tokenised. That seam is the reason the
    loop never re-tokenises: the engine saw the prompt's ids, and those are what is trained on.
    """
    tok = template_tokenizers[name]
    delta = ChatDelta(tok, INITIAL)
    assert tok.decode(delta.closing_ids).startswith(END_OF_TURN[name])
    assert delta.end_of_turn_id == tok.convert_tokens_to_ids(END_OF_TURN[name])
    observation = [{"role": role, "content": "Code execution result: 42"}]
    if role == "tool":
        observation.append({"role": "tool", "content": "second result"})
    sampled = encode(tok, ASSISTANT)
    conversation = [*INITIAL, {"role": "assistant", "content": ASSISTANT}, *observation]
    full_text = render(tok, conversation, generation_prompt=True)
    built = delta.prompt_ids + sampled + delta.closing_ids + delta.observation_ids(observation)
    assert tok.decode(built) == full_text
    if name == "llama3":
        assert built != encode(tok, full_text)  # the seam described above
    else:
        assert built == encode(tok, full_text)
    if name == "qwen" and role == "tool":
        text = tok.decode(delta.observation_ids(observation))
        assert text.count("<|im_start|>user") == 1 and text.count("<tool_response>") == 2
    # A sampled end-of-turn token is the model's; only the rest of the closing is template's.
    assert delta.closing_after([*sampled, delta.closing_ids[0]]) == delta.closing_ids[1:]
    assert delta.closing_after(sampled) == delta.closing_ids


@pytest.mark.parametrize("name", TEMPLATES)
def test_observation_delta_never_depends_on_model_text(template_tokenizers, name):
    """The base conversation is fixed: the delta is the same whatever the model wrote."""
    tok = template_tokenizers[name]
    a, b = ChatDelta(tok, INITIAL), ChatDelta(tok, INITIAL)
    obs = [{"role": "user", "content": "Code execution result: 1058688"}]
    assert a.observation_ids(obs) == b.observation_ids(obs)
    assert tok.decode(a.observation_ids(obs)).rstrip().endswith(
        {"smollm2": "<|im_start|>assistant", "llama3": "<|end_header_id|>",
         "qwen": "<|im_start|>assistant"}[name]
    )  # fmt: skip


def test_template_that_drops_earlier_turns_is_refused(tokenizer):
    """Rewriting the inside of earlier assistant turns is supported (Qwen3's dropped <think>
    blocks: test_thinking_templates.py); dropping the turns themselves is not."""
    import copy

    tok = copy.deepcopy(tokenizer)
    # Renders only the LAST message: appending a message changes what came before.
    tok.chat_template = (
        "{{ '<|im_start|>' + messages[-1]['role'] + '\\n' + messages[-1]['content'] + "
        "'<|im_end|>\\n' }}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    delta = ChatDelta(tok, INITIAL)
    with pytest.raises(ChatTemplateError, match="re-renders earlier turns"):
        delta.observation_ids([{"role": "user", "content": "x"}])
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatDelta(tok, INITIAL)


@pytest.mark.parametrize("name", TEMPLATES)
def test_observation_budget_is_counted_in_policy_tokens(template_tokenizers, name):
    tok = template_tokenizers[name]
    content = "Traceback: " + " ".join(str(i) for i in range(400))
    text, dropped = truncate_observation(tok, content, 40)
    n = len(tok.encode(text, add_special_tokens=False))
    assert dropped > 0 and "tokens truncated" in text
    assert n <= 40 + 2  # head + marker + tail; +2 for merges at the two seams
    assert text.startswith("Traceback: 0 1 2") and text.endswith("398 399")
    assert truncate_observation(tok, "short", 40) == ("short", 0)
    assert truncate_observation(tok, content, None) == (content, 0)
