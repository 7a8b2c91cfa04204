"""Prompt text: instructions, one-shot examples and how they become the first chat messages.

The Python-tool instruction follows the authors' release (docs/environments.md): reason step by
step, Python may be written in a fenced block, its output comes back as "Code execution result:
...", the final answer goes in ``\\boxed{}``; it is prepended to the question in the user message.

A one-shot example (a short solved conversation placed before the real question) is optional.
The default 135M model needs it to write python blocks at all; larger models do not, and the
authors' prompt has none (``one_shot=False``).

    >>> msgs = build_messages("What is 2 + 2?", MATH_INSTRUCTION)
    >>> msgs[0]["role"], msgs[0]["content"].endswith("What is 2 + 2?")
    ('user', True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: A chat message: ``role`` and ``content`` (str), and for an assistant turn of a one-shot
#: example possibly ``tool_calls`` (rendered by a chat template that supports tools).
Message = dict[str, Any]

MATH_INSTRUCTION = (
    "Solve the following math problem step by step. Put your final answer within \\boxed{}."
)

PYTHON_TOOL_INSTRUCTION = (
    "Solve the following problem step by step. You may write Python code in a fenced "
    "```python code block; it will be executed and its output returned to you as "
    '"Code execution result: ...". Put your final answer within \\boxed{}.'
)

#: The observation wrapper of the Python tool (the authors' release; docs/environments.md).
CODE_RESULT_TEMPLATE = "Code execution result: {output}"

#: Question template: ``{instruction}`` and ``{question}`` are filled in.
DEFAULT_QUESTION_TEMPLATE = "{instruction}\n\n{question}"


def format_question(
    question: str, instruction: str | None, template: str = DEFAULT_QUESTION_TEMPLATE
) -> str:
    """The user message for ``question`` (the instruction prepended, as in the release)."""
    if not instruction:
        return question
    return template.format(instruction=instruction, question=question)


def python_tool_one_shot(
    instruction: str | None,
    template: str = DEFAULT_QUESTION_TEMPLATE,
    observation_role: str = "user",
) -> list[Message]:
    """A solved example conversation for the Python tool: ask, code, result, boxed answer."""
    return [
        {"role": "user", "content": format_question("What is 123 * 456?", instruction, template)},
        {"role": "assistant", "content": "```python\nprint(123 * 456)\n```"},
        {"role": observation_role, "content": CODE_RESULT_TEMPLATE.format(output="56088")},
        {"role": "assistant", "content": "The answer is \\boxed{56088}."},
    ]


def math_one_shot(
    instruction: str | None, template: str = DEFAULT_QUESTION_TEMPLATE
) -> list[Message]:
    """A solved example for single-turn maths: short reasoning, boxed answer."""
    return [
        {"role": "user", "content": format_question("What is 15% of 80?", instruction, template)},
        {"role": "assistant", "content": "15% of 80 is 0.15 * 80 = 12. The answer is \\boxed{12}."},
    ]


def build_messages(
    question: str,
    instruction: str | None,
    *,
    system_prompt: str | None = None,
    one_shot: Sequence[Message] | None = None,
    template: str = DEFAULT_QUESTION_TEMPLATE,
) -> list[Message]:
    """The initial chat: optional system message, optional one-shot turns, then the question."""
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.extend(dict(m) for m in one_shot or ())
    messages.append({"role": "user", "content": format_question(question, instruction, template)})
    return messages
