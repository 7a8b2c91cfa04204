"""Function tools: ``@envs.tool`` and the :class:`ToolEnv` base class.

A tool is a typed, documented Python function. The decorator reads its signature and its
Google-style docstring and produces the JSON schema that goes into the prompt (the OpenAI /
Hugging Face chat-template "function" format):

    >>> import envs
    >>> @envs.tool
    ... def add(a: int, b: int = 0) -> int:
    ...     '''Add two integers.
    ...
    ...     Args:
    ...         a: the first number.
    ...         b: the second number.
    ...     '''
    ...     return a + b
    >>> add.schema()["function"]["parameters"]["required"]
    ['a']
    >>> add(a=2, b=3)
    5
    >>> add.call({"a": "two"})
    Traceback (most recent call last):
    ...
    envs.tools.ToolCallError: add: argument 'a' must be an integer, got str 'two'

:class:`ToolEnv` runs an episode where the model calls tools with Hermes/Qwen-style tags,
``<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>``, gets the result back
in ``<tool_response>...</tool_response>`` and finishes with ``\\boxed{answer}``. A malformed call
(bad JSON, unknown tool, wrong arguments, the tool raising) becomes an error observation the
model can react to; it never crashes the episode. See docs/examples/unit_converter/.

Tools may be ``async def``: the calls of one turn that go to async tools run concurrently, each
bounded by ``tool_timeout_s`` (a call past it becomes an error observation); plain functions run
one after the other on the env's thread, as written (a running function cannot be interrupted,
so the timeout does not apply to them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .core import TextEnv, TurnOutcome
from .grading import extract_boxed
from .text import truncate_middle


class ToolCallError(ValueError):
    """A tool call the model wrote cannot be executed; the message is shown to the model."""


# ----------------------------------------------------------------------------- schemas

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}


def _json_schema(annotation: Any, where: str) -> dict[str, Any]:
    """JSON schema of a type annotation (int, float, str, bool, list[X], dict, Literal, Enum, X | None)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"enum": [member.value for member in annotation]}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _json_schema(options[0], where)
        return {"anyOf": [_json_schema(a, where) for a in options]}
    if annotation in (list, tuple, set) or origin in (list, tuple, set, Sequence):
        schema: dict[str, Any] = {"type": "array"}
        if args:
            schema["items"] = _json_schema(args[0], where)
        return schema
    if annotation is dict or origin is dict:
        return {"type": "object"}
    raise TypeError(
        f"{where}: cannot describe type {annotation!r} as JSON schema (use int, float, str, bool, list, dict, Literal)"
    )


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    parts = re.split(r"^(?:Args|Arguments|Parameters):[ \t]*$", doc, maxsplit=1, flags=re.MULTILINE)
    description = parts[0].strip()
    arguments: dict[str, str] = {}
    if len(parts) == 2:
        lines = []
        for line in parts[1].splitlines():
            if line.strip() and not line[0].isspace():  # the next section (Returns:, Raises:...)
                break
            if line.strip():
                lines.append(line)
        base = min((len(line) - len(line.lstrip()) for line in lines), default=0)
        current = None
        for line in lines:
            indent = len(line) - len(line.lstrip())
            match = re.match(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line.strip())
            if indent == base and match:
                current = match.group(1)
                arguments[current] = match.group(2).strip()
            elif current is not None:
                arguments[current] = (arguments[current] + " " + line.strip()).strip()
    return description, arguments


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with its JSON schema.

    Attributes:
        name: the name the model uses.
        description: what it does (the docstring's first part).
        parameters: JSON schema of the arguments (``{"type": "object", "properties": ..., "required": ...}``).
        function: the Python function.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]

    def schema(self) -> dict[str, Any]:
        """The OpenAI / chat-template "function" tool description."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    @property
    def is_async(self) -> bool:
        """True for an ``async def`` tool: calling it returns a coroutine to await."""
        return inspect.iscoroutinefunction(self.function)

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check (and coerce int -> float) the model's arguments; raises ToolCallError."""
        if not isinstance(arguments, dict):
            raise ToolCallError(
                f"{self.name}: 'arguments' must be a JSON object, got {type(arguments).__name__}"
            )
        properties = self.parameters["properties"]
        unknown = sorted(set(arguments) - set(properties))
        if unknown:
            raise ToolCallError(
                f"{self.name}: unknown argument(s) {unknown}; expected {sorted(properties)}"
            )
        missing = [name for name in self.parameters["required"] if name not in arguments]
        if missing:
            raise ToolCallError(f"{self.name}: missing required argument(s) {missing}")
        return {
            name: _check_value(value, properties[name], f"{self.name}: argument {name!r}")
            for name, value in arguments.items()
        }

    def call(self, arguments: Any) -> Any:
        """Validate ``arguments`` and run the tool."""
        return self.function(**self.validate(arguments))


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _check_value(value: Any, schema: dict[str, Any], where: str) -> Any:
    if "enum" in schema:
        if value not in schema["enum"]:
            raise ToolCallError(f"{where} must be one of {schema['enum']}, got {value!r}")
        return value
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                return _check_value(value, option, where)
            except ToolCallError:
                continue
        raise ToolCallError(f"{where} has the wrong type: {type(value).__name__} {value!r}")
    kind = schema.get("type")
    ok = {
        None: True,
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
        "null": value is None,
    }[kind]
    if not ok:
        raise ToolCallError(
            f"{where} must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
        )
    if kind == "number":
        return float(value)
    if kind == "array" and "items" in schema:
        return [_check_value(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
):
    """Turn a typed, documented function into a :class:`Tool` (usable bare or with options).

    Every parameter needs a type annotation; parameters without a default are required. The
    description and per-argument help come from the docstring (Google style ``Args:``).
    """

    def build(fn: Callable[..., Any]) -> Tool:
        where = f"@tool {fn.__qualname__}"
        hints = typing.get_type_hints(fn)
        doc_description, doc_args = _parse_docstring(fn.__doc__ or "")
        properties: dict[str, Any] = {}
        required: list[str] = []
        for parameter in inspect.signature(fn).parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TypeError(f"{where}: *args/**kwargs cannot be described to the model")
            if parameter.name not in hints:
                raise TypeError(f"{where}: parameter {parameter.name!r} needs a type annotation")
            schema = _json_schema(hints[parameter.name], where)
            if parameter.name in doc_args:
                schema["description"] = doc_args[parameter.name]
            if parameter.default is parameter.empty:
                required.append(parameter.name)
            properties[parameter.name] = schema
        text = description if description is not None else doc_description
        if not text:
            raise TypeError(f"{where}: a tool needs a description (a docstring or description=...)")
        return Tool(
            name=name or fn.__name__,
            description=text,
            parameters={"type": "object", "properties": properties, "required": required},
            function=fn,
        )

    return build(function) if function is not None else build


# ----------------------------------------------------------------------------- calls in text

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL
)


@dataclass(frozen=True)
class ToolCall:
    """One ``<tool_call>`` found in model text: the parsed call, or why it could not be parsed."""

    raw: str
    name: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in ``text``, in order.

    An unclosed last call (generation ended before ``</tool_call>``) is parsed too. Malformed
    calls come back with ``error`` set instead of raising.

    >>> parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')[0].arguments
    {'x': 1}
    >>> parse_tool_calls('<tool_call>{"name": f}</tool_call>')[0].error
    'the tool call is not valid JSON: Expecting value at column 10'
    """
    calls = []
    for match in _CALL_RE.finditer(text):
        raw = match.group(1).strip()
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError as exc:
            calls.append(
                ToolCall(
                    raw, error=f"the tool call is not valid JSON: {exc.msg} at column {exc.colno}"
                )
            )
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            calls.append(
                ToolCall(raw, error='a tool call must be {"name": <tool name>, "arguments": {...}}')
            )
            continue
        arguments = payload.get("arguments", payload.get("parameters", {}))
        if isinstance(arguments, str):  # some models double-encode the arguments
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            calls.append(
                ToolCall(raw, name=payload["name"], error="'arguments' must be a JSON object")
            )
            continue
        calls.append(ToolCall(raw, name=payload["name"], arguments=arguments))
    return calls


# ----------------------------------------------------------------------------- the env base

TOOL_SYSTEM_PROMPT = (
    "You can call the following tools. To call one, write\n"
    '<tool_call>{{"name": <tool name>, "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "and stop; the result comes back in <tool_response></tool_response>. "
    "When you know the final answer, write it within \\boxed{{}}.\n\n"
    "Tools:\n{tools}"
)


class ToolEnv(TextEnv):
    """Multi-turn environment whose actions call function tools (see the module docstring).

    Subclass it and set ``tools`` (a list of :class:`Tool`), or pass ``tools=`` to the
    constructor. Each turn: a ``\\boxed{}`` answer ends the episode and is graded
    (:meth:`grade_answer`, override it for non-maths answers); otherwise every
    ``<tool_call>`` in the text is run and its result (or the error) is sent back in one
    observation message; a turn with neither is a void turn. After ``max_tool_errors``
    consecutive failing turns (default 3) the episode ends with ``finish_reason="tool_error"``.

    Args (besides every :class:`envs.TextEnv` option):
        tools: the tools (default: the class attribute ``tools``).
        max_calls_per_turn: calls beyond this many in one turn are reported as errors.
    """

    tools: Sequence[Tool] = ()
    default_max_turns = 5

    def __init__(
        self,
        dataset: str = "gsm8k_test",
        split: str | None = None,
        *,
        tools: Sequence[Tool] | None = None,
        max_calls_per_turn: int = 4,
        max_tool_errors: int | None = 3,
        tool_timeout_s: float | None = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, split, max_tool_errors=max_tool_errors, **kwargs)
        self.tools = list(tools if tools is not None else type(self).tools)
        if not self.tools:
            raise ValueError(
                f"{type(self).__name__} has no tools: set the class attribute or pass tools=[...]"
            )
        for t in self.tools:
            if not isinstance(t, Tool):
                raise TypeError(f"{t!r} is not a Tool; decorate the function with @envs.tool")
        self.tools_by_name = {t.name: t for t in self.tools}
        self.max_calls_per_turn = max_calls_per_turn
        if tool_timeout_s is not None and tool_timeout_s <= 0:
            raise ValueError(f"tool_timeout_s must be > 0 or None, got {tool_timeout_s}")
        self.tool_timeout_s = tool_timeout_s
        self.stop_sequences = [TOOL_CALL_CLOSE]
        if self.system_prompt is None:
            self.system_prompt = self.tool_system_prompt()

    def tool_system_prompt(self) -> str:
        """The system message describing the tools (their JSON schemas) and the call format."""
        listing = "\n".join(json.dumps(t.schema(), ensure_ascii=False) for t in self.tools)
        return TOOL_SYSTEM_PROMPT.format(tools=listing)

    def response_is_complete(self, text: str) -> bool:
        return TOOL_CALL_CLOSE in text

    def take_turn(self, action: str) -> TurnOutcome:
        calls = parse_tool_calls(action)
        before_first_call = action.split(TOOL_CALL_OPEN, 1)[0]
        if extract_boxed(before_first_call if calls else action) is not None:
            return TurnOutcome(finish_reason="answer", answer_text=action)
        if not calls:
            return TurnOutcome(finish_reason="void_turn")
        results = self.run_calls(calls[: self.max_calls_per_turn])
        results += [
            {
                "name": call.name,
                "arguments": call.arguments,
                "status": "error",
                "error": f"at most {self.max_calls_per_turn} tool calls per turn",
            }
            for call in calls[self.max_calls_per_turn :]
        ]
        texts = [
            f"Error: {result['error']}" if result["status"] == "error" else result["output"]
            for result in results
        ]
        content = "\n".join(f"<tool_response>\n{text}\n</tool_response>" for text in texts)
        return TurnOutcome(
            messages=[self.observation_message(content)],
            tool_results=results,
            tool_error=any(r["status"] == "error" for r in results),
        )

    def run_call(self, call: ToolCall) -> dict[str, Any]:
        """Execute one parsed call; errors become ``{"status": "error", "error": ...}``."""
        return self.run_calls([call])[0]

    def run_calls(self, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Execute one turn's calls, results in call order.

        Calls to async tools run concurrently (each within ``tool_timeout_s``); calls to plain
        functions run in order on this thread.
        """

        async def turn() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(self._acall(call) for call in calls)))

        return _run_to_completion(turn)

    async def _acall(self, call: ToolCall) -> dict[str, Any]:
        result: dict[str, Any] = {"name": call.name, "arguments": call.arguments, "raw": call.raw}
        if call.error is not None:
            return {**result, "status": "error", "error": call.error}
        chosen = self.tools_by_name.get(call.name)
        if chosen is None:
            return {
                **result,
                "status": "error",
                "error": f"unknown tool {call.name!r}; available: {sorted(self.tools_by_name)}",
            }
        try:
            value = chosen.call(call.arguments)
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, timeout=self.tool_timeout_s)
        except ToolCallError as exc:
            return {**result, "status": "error", "error": str(exc)}
        except asyncio.TimeoutError:
            return {
                **result,
                "status": "error",
                "error": f"{call.name} timed out after {self.tool_timeout_s:g} s",
            }
        except Exception as exc:  # noqa: BLE001 - a tool failing on the model's input is an observation
            return {
                **result,
                "status": "error",
                "error": f"{call.name} raised {type(exc).__name__}: {exc}",
            }
        output = truncate_middle(self.format_result(value), self.max_observation_chars)
        return {**result, "status": "ok", "output": output}

    def format_result(self, value: Any) -> str:
        """The text the model sees for a tool's return value (str as is, else JSON)."""
        return (
            value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        )


def _run_to_completion(make: Callable[[], Any]) -> Any:
    """Run the coroutine ``make()`` to its result from synchronous code, also when this thread
    already runs an event loop (a notebook, an async caller): then on a short-lived thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
