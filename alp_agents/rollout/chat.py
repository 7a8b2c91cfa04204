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

from collections.abc import Sequence
from typing import Any

PLACEHOLDER = "\u2063ALP-ASSISTANT-PLACEHOLDER\u2063"
"""Content of the base conversation's assistant turn; never appears in real text."""


class ChatTemplateError(ValueError):
    """The chat template does not render conversations as a growing prefix."""


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
        prompt_text = render(tokenizer, self.initial_messages, True, self.tools)
        self.prompt_ids = encode(tokenizer, prompt_text)
        self._base = [*self.initial_messages, {"role": "assistant", "content": PLACEHOLDER}]
        self._base_text = render(tokenizer, self._base, False, self.tools)
        at = self._base_text.rfind(PLACEHOLDER)
        if at < 0:
            raise ChatTemplateError(
                "the chat template drops the assistant message content; cannot find where an "
                "assistant turn ends"
            )
        self.closing_text = self._base_text[at + len(PLACEHOLDER) :]
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
        generation prompt for the next assistant turn."""
        full = render(self.tokenizer, [*self._base, *new_messages], True, self.tools)
        if not full.startswith(self._base_text):
            raise ChatTemplateError(
                "the chat template re-renders earlier turns when messages are appended, so no "
                "token-exact delta exists for it:\n"
                f"  base: {self._base_text[-120:]!r}\n"
                f"  with new messages: {full[: len(self._base_text)][-120:]!r}"
            )
        return encode(self.tokenizer, full[len(self._base_text) :])


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
