"""Tool-call formats: how a model writes a tool call in its text, and how the env reads it back.

A chat template that supports tools (``tools=`` in ``apply_chat_template``) tells the model, in
its own system prompt, how to write a call; the env must parse exactly that. Two formats ship:

* ``"hermes"`` (Hermes / Qwen2.5 / Qwen3 templates): a JSON object inside the tags,
  ``<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>``;
* ``"qwen3_coder"`` (Qwen3-Coder templates): XML, one block per argument,
  ``<tool_call>\\n<function=add>\\n<parameter=a>\\n2\\n</parameter>\\n...</function>\\n</tool_call>``.
  Values are text; each is converted with the tool's JSON schema (a string parameter keeps the
  text as is, any other type is read as JSON), as vLLM's ``qwen3_coder`` parser does.

Add your own by subclassing :class:`ToolFormat` and calling :func:`register_tool_format`; pick
one per env with ``envs.ToolEnv(tool_format=NAME)``.

    >>> fmt = get_tool_format("qwen3_coder")
    >>> text = fmt.format_call("add", {"a": 2, "b": 3})
    >>> print(text)
    <tool_call>
    <function=add>
    <parameter=a>
    2
    </parameter>
    <parameter=b>
    3
    </parameter>
    </function>
    </tool_call>
    >>> schema = {"add": {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}
    >>> fmt.parse(text, schema)[0].arguments
    {'a': 2, 'b': 3}
    >>> get_tool_format("hermes").parse('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')[0]
    ToolCall(raw='{"name": "f", "arguments": {"x": 1}}', name='f', arguments={'x': 1}, error=None)
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .text import did_you_mean

#: ``{tool name: JSON schema of its parameters}``: what a parser may use to type argument values.
Parameters = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ToolCall:
    """One tool call found in model text: the parsed call, or why it could not be parsed."""

    raw: str
    name: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None


class ToolFormat:
    """A tool-call format: where calls are in the text, how one is parsed and how one is written.

    Subclasses set ``name`` and implement :meth:`parse_call`, :meth:`format_call` and
    :meth:`instructions`; the tags default to ``<tool_call>`` / ``</tool_call>``, which both
    shipped formats use (the close tag is the stop sequence: generation ends after a call).
    """

    name: str = ""
    call_open: str = "<tool_call>"
    call_close: str = "</tool_call>"

    @property
    def stop_sequences(self) -> list[str]:
        """Strings that end the model's turn after a call (the rollout stops generation there)."""
        return [self.call_close]

    def call_bodies(self, text: str) -> list[str]:
        """The text inside every call tag, in order; an unclosed last call (generation stopped
        before the close tag, e.g. at the token budget) counts too."""
        pattern = re.escape(self.call_open) + r"(.*?)(?:" + re.escape(self.call_close) + r"|\Z)"
        return [match.group(1) for match in re.finditer(pattern, text, flags=re.DOTALL)]

    def parse(self, text: str, parameters: Parameters | None = None) -> list[ToolCall]:
        """Every call in ``text``; a malformed one comes back with ``error`` set (never raises)."""
        return [self.parse_call(body, parameters or {}) for body in self.call_bodies(text)]

    def text_before_calls(self, text: str) -> str:
        """The model's prose before its first call (where a ``\\boxed{}`` answer counts)."""
        return text.split(self.call_open, 1)[0]

    def parse_call(self, body: str, parameters: Parameters) -> ToolCall:
        """One call from the text between the tags."""
        raise NotImplementedError

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        """The text of one call, tags included, exactly as the parser reads it (one-shot examples)."""
        raise NotImplementedError

    def instructions(self) -> str:
        """How to call a tool, in words, for a system prompt (used when the chat template does not
        render tools itself)."""
        raise NotImplementedError

    def system_prompt(self, schemas: Sequence[Mapping[str, Any]]) -> str:
        """The tool section of a system message: :meth:`instructions` and one JSON schema a line."""
        listing = "\n".join(json.dumps(schema, ensure_ascii=False) for schema in schemas)
        return f"{self.instructions()}\n\nTools:\n{listing}"

    def format_responses(self, texts: Sequence[str]) -> str:
        """One observation message holding the results of a turn's calls, in call order (used
        when the chat template does not render ``tool`` messages itself)."""
        return "\n".join(f"<tool_response>\n{text}\n</tool_response>" for text in texts)


class HermesFormat(ToolFormat):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"

    def parse_call(self, body: str, parameters: Parameters) -> ToolCall:
        raw = body.strip()
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError as exc:
            return ToolCall(
                raw, error=f"the tool call is not valid JSON: {exc.msg} at column {exc.colno}"
            )
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return ToolCall(
                raw, error='a tool call must be {"name": <tool name>, "arguments": {...}}'
            )
        arguments = payload.get("arguments", payload.get("parameters", {}))
        if isinstance(arguments, str):  # some models double-encode the arguments
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            return ToolCall(raw, name=payload["name"], error="'arguments' must be a JSON object")
        return ToolCall(raw, name=payload["name"], arguments=arguments)

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        payload = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
        return f"{self.call_open}\n{payload}\n{self.call_close}"

    def instructions(self) -> str:
        return (
            "You can call the following tools. To call one, write\n"
            '<tool_call>{"name": <tool name>, "arguments": {<arguments as JSON>}}</tool_call>\n'
            "and stop; the result comes back in <tool_response></tool_response>."
        )


_FUNCTION_RE = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|\Z)", re.DOTALL)
_PARAMETER_RE = re.compile(
    r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.DOTALL
)


class Qwen3CoderFormat(ToolFormat):
    """``<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``
    (Qwen3-Coder). One newline after the opening and before the closing parameter tag belongs
    to the markup; a value may span lines."""

    name = "qwen3_coder"

    def parse_call(self, body: str, parameters: Parameters) -> ToolCall:
        raw = body.strip()
        function = _FUNCTION_RE.search(body)
        if function is None:
            return ToolCall(
                raw,
                error="a tool call must hold <function=TOOL NAME> with one "
                "<parameter=ARGUMENT NAME>VALUE</parameter> block per argument",
            )
        name = function.group(1).strip()
        properties = (parameters.get(name) or {}).get("properties") or {}
        arguments: dict[str, Any] = {}
        for match in _PARAMETER_RE.finditer(function.group(2)):
            key = match.group(1).strip()
            if key in arguments:
                return ToolCall(raw, name=name, error=f"parameter {key!r} is given twice")
            arguments[key] = _typed_value(
                _strip_markup_newlines(match.group(2)), properties.get(key) or {}
            )
        return ToolCall(raw, name=name, arguments=arguments)

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        blocks = "".join(
            f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}\n</parameter>\n"
            for key, value in arguments.items()
        )
        return f"{self.call_open}\n<function={name}>\n{blocks}</function>\n{self.call_close}"

    def instructions(self) -> str:
        return (
            "You can call the following tools. To call one, write\n"
            "<tool_call>\n<function=TOOL NAME>\n<parameter=ARGUMENT NAME>\nVALUE\n</parameter>\n"
            "</function>\n</tool_call>\n"
            "with one <parameter> block per argument, and stop; the result comes back in "
            "<tool_response></tool_response>."
        )


def _strip_markup_newlines(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _typed_value(text: str, schema: Mapping[str, Any]) -> Any:
    """An XML parameter's text as the schema's type: strings (and enum members) as written, any
    other type read as JSON; text that is not JSON stays text, and the tool's argument check
    then names the type it wanted."""
    if schema.get("type") == "string" or text in (schema.get("enum") or ()):
        return text
    if schema.get("type") == "boolean" and text.strip() in ("True", "False"):
        return text.strip() == "True"  # how Jinja's ``|string`` writes a Python bool
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ----------------------------------------------------------------------------- registry

_FORMATS: dict[str, ToolFormat] = {}


def register_tool_format(fmt: ToolFormat, *, force: bool = False) -> None:
    """Make ``fmt`` selectable by its name (``ToolEnv(tool_format=fmt.name)``).

    Registering a name again with another format is an error unless ``force=True``.
    """
    if not isinstance(fmt, ToolFormat) or not fmt.name:
        raise TypeError(f"{fmt!r} is not a named ToolFormat instance")
    existing = _FORMATS.get(fmt.name)
    if existing is not None and existing is not fmt and not force:
        raise ValueError(
            f"tool format {fmt.name!r} is already registered ({type(existing).__name__}); "
            "pass force=True to replace it"
        )
    _FORMATS[fmt.name] = fmt


def get_tool_format(name: str | ToolFormat) -> ToolFormat:
    """The registered format called ``name`` (a :class:`ToolFormat` instance passes through)."""
    if isinstance(name, ToolFormat):
        return name
    if name not in _FORMATS:
        raise ValueError(
            f"unknown tool format {name!r}; registered: {sorted(_FORMATS)}."
            f"{did_you_mean(str(name), _FORMATS)}"
        )
    return _FORMATS[name]


def tool_formats() -> list[str]:
    """The names of the registered tool-call formats."""
    return sorted(_FORMATS)


register_tool_format(HermesFormat())
register_tool_format(Qwen3CoderFormat())
