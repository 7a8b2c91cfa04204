"""Chat-template deltas: the exact tokens a chat template adds around model turns.

Multi-turn RL must never re-tokenise model text (the tokens trained on would stop being the
tokens sampled). So the agent loop keeps the sampled ids verbatim and only ever appends tokens
the chat template itself produces, computed against a FIXED base conversation: the episode's
initial messages plus an assistant turn whose content is a placeholder. Model text never enters
a render. `ChatDelta` gives the three pieces:

* ``prompt_ids``: the initial messages rendered with the generation prompt (what the engine
  sees first);
* ``closing_ids``: what the template writes after an assistant message's content (e.g.
  ``<|im_end|>\\n`` for ChatML, ``<|eot_id|>`` for Llama 3). Its first token is the
  end-of-turn token the model is expected to sample (``end_of_turn_id``);
* ``observation_ids(messages)``: what the template adds for new messages after an assistant
  turn, generation prompt included (e.g. ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>
  assistant\\n``).

Every rendered string is tokenised with ``add_special_tokens=False``, as ``apply_chat_template``
does; a delta always starts right after a template-written end of turn, so its tokenisation does
not depend on what precedes it.

Templates that rewrite history. Some templates render an assistant turn differently once more
messages follow it: Qwen3's drops the ``<think>...</think>`` block of every assistant turn before
the last user message (and gives a final assistant turn without reasoning an empty think block).
Re-rendering such a conversation each turn would not extend the previous context. The deltas
never need that re-rendering: the model's turns are kept as sampled, reasoning included, and
only the template's text AROUND them is taken from the template. So a template may rewrite the
inside of earlier assistant turns (header, reasoning, content); what must stay append-only is
everything else: the messages before the turn, where the turn ends, and the new messages. A
template that changes those gets a `ChatTemplateError` naming which. The trade-off (the model
keeps seeing its earlier reasoning, which the stock template would drop at deployment) is
`ChatDelta.rewrites_history` and docs/rollout.md, "Thinking models".

Example::

    >>> from alp_agents.models import load_tokenizer
    >>> tok = load_tokenizer()                                               # doctest: +SKIP
    >>> delta = ChatDelta(tok, [{"role": "user", "content": "2+2?"}])        # doctest: +SKIP
    >>> tok.decode(delta.closing_ids)                                         # doctest: +SKIP
    '<|im_end|>\\n'
    >>> tok.decode(delta.observation_ids([{"role": "user", "content": "4"}]))  # doctest: +SKIP
    '<|im_start|>user\\n4<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

PLACEHOLDER = "\u2063ALP-ASSISTANT-PLACEHOLDER\u2063"
"""Content of the base conversation's assistant turn; never appears in real text."""

REASONING_PLACEHOLDER = "\u2063ALP-REASONING-PLACEHOLDER\u2063"
"""Reasoning of the probe turn that `ChatDelta.rewrites_history` looks for."""


class ChatTemplateError(ValueError):
    """The chat template does not render conversations as a growing prefix outside the model's
    own turns (which it may rewrite: see the module docstring)."""


def render(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    generation_prompt: bool,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The chat template's text for ``messages`` (no tokenisation); ``tools``: JSON schemas
    for the template's ``tools=`` argument."""
    extra = {"tools": list(tools)} if tools else {}
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, **extra
    )
    if not isinstance(text, str):  # some versions return a list for batched input
        raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, not str")
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Tokenise template text exactly as ``apply_chat_template(tokenize=True)`` does."""
    return list(tokenizer.encode(text, add_special_tokens=False))


class ChatDelta:
    """Template tokens for one episode, computed once against its fixed base conversation.

    Args:
        tokenizer: a tokenizer with a chat template.
        initial_messages: the episode's first messages (system/user), as ``env.reset`` gives them.
        tools: the tools' JSON schemas, passed as ``tools=`` to every render of the episode (the
            env's ``configure_tool_prompt`` decides; None: the template renders no tools).
    """

    def __init__(
        self,
        tokenizer: Any,
        initial_messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("the tokenizer has no chat_template; set one before rollout")
        self.tokenizer = tokenizer
        self.initial_messages = [dict(m) for m in initial_messages]
        self.tools = [dict(t) for t in tools] if tools else None
        self._prompt_text = render(tokenizer, self.initial_messages, True, self.tools)
        self.prompt_ids = encode(tokenizer, self._prompt_text)
        self._base = [*self.initial_messages, {"role": "assistant", "content": PLACEHOLDER}]
        base_text = render(tokenizer, self._base, False, self.tools)
        at = base_text.rfind(PLACEHOLDER)
        if at < 0:
            raise ChatTemplateError(
                "the chat template drops the assistant message content; cannot find where an "
                "assistant turn ends"
            )
        self.closing_text = base_text[at + len(PLACEHOLDER) :]
        self.closing_ids = encode(tokenizer, self.closing_text)

    @property
    def end_of_turn_id(self) -> int | None:
        """The token that ends an assistant turn (first closing token), if it is one token the
        model can sample (a special/added token, not a piece of plain text)."""
        if not self.closing_ids:
            return None
        first = self.closing_ids[0]
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        return first if first in special or first in added else None

    def closing_after(self, sampled_ids: Sequence[int]) -> list[int]:
        """Template tokens to append after a turn's sampled ids (loss mask 0).

        If the model sampled the end-of-turn token itself (the last sampled id), only the rest of
        the closing is template-written; otherwise (stop string, length) the whole closing is.
        """
        if sampled_ids and self.closing_ids and sampled_ids[-1] == self.closing_ids[0]:
            return list(self.closing_ids[1:])
        return list(self.closing_ids)

    def observation_ids(self, new_messages: Sequence[dict[str, Any]]) -> list[int]:
        """What the template adds for ``new_messages`` after an assistant turn, ending with the
        generation prompt for the next assistant turn.

        The delta is the text after the assistant turn's closing in the template's rendering of
        the base conversation plus ``new_messages``. How that rendering writes the assistant turn
        itself does not matter (the sampled ids stand for it), so templates that rewrite earlier
        assistant turns are supported; `ChatTemplateError` if the template changes anything
        else once messages are appended (see `_split_after_turn`).
        """
        full = render(self.tokenizer, [*self._base, *new_messages], True, self.tools)
        return encode(self.tokenizer, self._split_after_turn(full))

    def rewrites_history(self, new_messages: Sequence[dict[str, Any]]) -> bool:
        """True when the template does not keep an assistant turn verbatim once
        ``new_messages`` follow it, e.g. Qwen3's drops the turn's ``<think>`` block when a user
        message follows (but keeps it when only tool results follow).

        The rollout is not affected (it keeps the sampled tokens, reasoning included); the flag
        says that the contexts trained on are not what the stock template renders for the same
        conversation at deployment. Probed with an assistant turn ``<think>\\n(reasoning)\\n
        </think>\\n\\n(answer)``, the format of Qwen3 and DeepSeek-R1; one render per call.
        """
        probe = f"<think>\n{REASONING_PLACEHOLDER}\n</think>\n\n{PLACEHOLDER}"
        messages = [*self.initial_messages, {"role": "assistant", "content": probe}]
        full = render(self.tokenizer, [*messages, *new_messages], True, self.tools)
        return probe not in full

    @cached_property
    def _history_text(self) -> str:
        """The initial messages alone, without a generation prompt (rendered on first use: a
        single-turn episode never needs it)."""
        return render(self.tokenizer, self.initial_messages, False, self.tools)

    def _split_after_turn(self, full: str) -> str:
        """The text of ``full`` (the base conversation plus new messages, rendered) after the
        placeholder turn's closing, once the parts that must be append-only are checked: the
        initial messages render as in the prompt, nothing but the assistant header comes
        between them and the turn, and the turn ends with ``closing_text``."""
        history, prompt = self._history_text, self._prompt_text
        lead = (
            "the chat template re-renders earlier turns when messages are appended, so no "
            "token-exact delta exists for it (templates that only rewrite earlier assistant "
            "turns, e.g. Qwen3's dropping their <think> blocks, are supported): "
        )
        if full.count(PLACEHOLDER) != 1:
            raise ChatTemplateError(
                lead + f"the earlier assistant turn's content appears {full.count(PLACEHOLDER)} "
                "times in the rendering (it must appear once)"
            )
        at = full.index(PLACEHOLDER)
        for label, text in (("the prompt", prompt), ("the rendering with messages", full)):
            if not text.startswith(history):
                i = len(os.path.commonprefix([history, text]))
                raise ChatTemplateError(
                    lead + f"the messages before the model's turn render differently in {label}:"
                    f"\n  alone:   {history[max(0, i - 60) : i + 60]!r}"
                    f"\n  in {label}: {text[max(0, i - 60) : i + 60]!r}"
                )
        header, generation_prompt = full[len(history) : at], prompt[len(history) :]
        if not (generation_prompt.startswith(header) or header.startswith(generation_prompt)):
            raise ChatTemplateError(
                lead + "the template writes other text between the earlier messages and the "
                f"assistant turn: {header!r} where the generation prompt was "
                f"{generation_prompt!r}"
            )
        after = full[at + len(PLACEHOLDER) :]
        if not after.startswith(self.closing_text):
            raise ChatTemplateError(
                lead + "an assistant turn ends differently once messages follow it: "
                f"{self.closing_text!r} as the last turn, {after[: len(self.closing_text) + 40]!r}"
                " with messages after it"
            )
        return after[len(self.closing_text) :]


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "alp_probe_tool",
        "description": "Probe whether the chat template renders tools.",
        "parameters": {
            "type": "object",
            "properties": {"x": {"type": "string", "description": "a value."}},
            "required": ["x"],
        },
    },
}


def template_renders_tools(tokenizer: Any) -> bool:
    """True when the chat template renders ``tools=`` (its text changes and names the tool).

    SmolLM2's template ignores ``tools=``: tool envs then list the schemas in their own system
    message (``envs.ToolEnv(tool_prompt="auto")``). A template that raises when given tools
    counts as not rendering them.
    """
    if not getattr(tokenizer, "chat_template", None):
        return False
    messages = [{"role": "user", "content": "Hi"}]
    try:
        with_tools = render(tokenizer, messages, True, [_PROBE_TOOL])
    except Exception:  # noqa: BLE001 - e.g. raise_exception("tools are not supported")
        return False
    return "alp_probe_tool" in with_tools and with_tools != render(tokenizer, messages, True)
