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

A tool that needs the episode (the problem, per-episode state such as a sandbox session) declares
a parameter annotated :class:`ToolContext`; the env fills it and the model never sees it:

    >>> @envs.tool
    ... def remember(note: str, ctx: envs.ToolContext) -> int:
    ...     '''Store a note for this episode; returns how many are stored.
    ...
    ...     Args:
    ...         note: the note.
    ...     '''
    ...     ctx.state.setdefault("notes", []).append(note)
    ...     return len(ctx.state["notes"])
    >>> list(remember.schema()["function"]["parameters"]["properties"])
    ['note']

The call format is a :class:`envs.ToolFormat` (``tool_format="hermes"`` or ``"qwen3_coder"``,
envs/tool_formats.py). Where the schemas go is ``tool_prompt``: through the chat template's own
``tools=`` rendering when it has one, else in the env's system message (see
:meth:`ToolEnv.configure_tool_prompt`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from .datasets import Problem
from .grading import extract_boxed
from .prompts import Message, build_messages, format_question
from .text import truncate_middle
from .tool_formats import ToolCall, ToolFormat, get_tool_format


class ToolCallError(ValueError):
    """A tool call the model wrote cannot be executed; the message is shown to the model."""


@dataclass
class ToolContext:
    """The episode, as a tool sees it through a parameter annotated ``ToolContext``.

    Verifiers' ``StatefulToolEnv`` hides arguments from the schema (``args_to_skip``) and fills
    them in ``update_tool_args``; here the annotation does both: the parameter is left out of
    the schema, and every call gets this object. Per-episode resources go in ``state``: fill
    it in :meth:`ToolEnv.setup_state` (called by ``reset``), release them in
    :meth:`ToolEnv.cleanup_state` (called when the episode ends, and on the next reset/close).

    Attributes:
        env: the environment running the call.
        problem: the episode's problem (``problem.answer`` too: keep it from the model).
        state: the episode's own dict, fresh at every reset, shared by all its calls. Async calls
            of one turn run concurrently and may interleave at ``await``.
        turn: the assistant turn that made the call (1 for the first).
    """

    env: ToolEnv
    problem: Problem
    state: dict[str, Any]
    turn: int


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
        context_parameter: the name of its :class:`ToolContext` parameter (filled by the env,
            absent from ``parameters``), or None.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    context_parameter: str | None = None

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

    def call(self, arguments: Any, context: ToolContext | None = None) -> Any:
        """Validate ``arguments`` and run the tool; ``context`` fills its ToolContext parameter."""
        values = self.validate(arguments)
        if self.context_parameter is not None:
            if context is None:
                raise TypeError(
                    f"tool {self.name!r} takes a ToolContext ({self.context_parameter!r}); "
                    "call it through a ToolEnv or pass context="
                )
            values[self.context_parameter] = context
        return self.function(**values)


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
    description and per-argument help come from the docstring (Google style ``Args:``). One
    parameter may be annotated :class:`ToolContext`: the env passes the episode's context there,
    and it stays out of the schema (the model can neither see nor set it).
    """

    def build(fn: Callable[..., Any]) -> Tool:
        where = f"@tool {fn.__qualname__}"
        hints = typing.get_type_hints(fn)
        doc_description, doc_args = _parse_docstring(fn.__doc__ or "")
        properties: dict[str, Any] = {}
        required: list[str] = []
        context_parameter = None
        for parameter in inspect.signature(fn).parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TypeError(f"{where}: *args/**kwargs cannot be described to the model")
            if parameter.name not in hints:
                raise TypeError(f"{where}: parameter {parameter.name!r} needs a type annotation")
            if hints[parameter.name] is ToolContext:
                if context_parameter is not None:
                    raise TypeError(f"{where}: more than one ToolContext parameter")
                context_parameter = parameter.name
                continue
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
            context_parameter=context_parameter,
        )

    return build(function) if function is not None else build


# ----------------------------------------------------------------------------- calls in text

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def parse_tool_calls(
    text: str, tool_format: str | ToolFormat = "hermes", tools: Sequence[Tool] = ()
) -> list[ToolCall]:
    """Every tool call in ``text``, in order, in ``tool_format`` (see envs/tool_formats.py).

    An unclosed last call (generation ended before ``</tool_call>``) is parsed too. Malformed
    calls come back with ``error`` set instead of raising. ``tools`` give the argument types
    to formats whose values are text (``qwen3_coder``).

    >>> parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')[0].arguments
    {'x': 1}
    >>> parse_tool_calls('<tool_call>{"name": f}</tool_call>')[0].error
    'the tool call is not valid JSON: Expecting value at column 10'
    """
    return get_tool_format(tool_format).parse(text, {t.name: t.parameters for t in tools})


# ----------------------------------------------------------------------------- one-shot example


@dataclass(frozen=True)
class ToolExample:
    """A solved example episode shown before the question (``ToolEnv(one_shot=...)``).

    The env writes it in its own call format: the question, ``thought`` then one call of
    ``tool`` with ``arguments``, the tool's result, then ``The answer is \\boxed{answer}.`` A small
    model that has never seen the format copies it from here (docs/environments.md has the
    measurement on the 135M default: a ``thought`` before the call made the difference).

    Attributes:
        question: the example question (the env's instruction is prepended, as for real ones).
        tool: the name of one of the env's tools.
        arguments: the call's arguments (checked against the tool's schema).
        answer: the final answer written in ``\\boxed{}``.
        result: the tool's output text; None runs the tool once when the env is built (give it
            for tools that need a :class:`ToolContext`).
        thought: what the assistant writes before its call (e.g. "I will use the convert
            tool."); "" for none.
    """

    question: str
    tool: str
    arguments: dict[str, Any]
    answer: str
    result: str | None = None
    thought: str = ""


# ----------------------------------------------------------------------------- the env base

#: The system message's opening when ``system_prompt`` is not given (the tools follow it).
DEFAULT_TOOL_SYSTEM_PROMPT = "When you know the final answer, write it within \\boxed{}."
TOOL_PROMPTS = ("auto", "template", "system")


class ToolEnv(TextEnv):
    """Multi-turn environment whose actions call function tools (see the module docstring).

    Subclass it and set ``tools`` (a list of :class:`Tool`), or pass ``tools=`` to the
    constructor. Each turn: a ``\\boxed{}`` answer written before the first tool call ends the
    episode and is graded (:meth:`grade_answer`, override it for non-maths answers); otherwise
    every call in the text is run and the results (or errors) are sent back; a turn with
    neither is a void turn. After ``max_tool_errors`` turns in a row in which at least one call
    failed (default 3) the episode ends with ``finish_reason="tool_error"``.

    Where the tool schemas go (``tool_prompt``):

    * ``"template"``: the chat template renders them (``apply_chat_template(tools=...)``) with
      its own instructions; observations are one ``tool`` message per call, which the template
      wraps; the one-shot example's call is an assistant ``tool_calls`` entry the template
      writes in its own format;
    * ``"system"``: the env's system message lists them with the format's instructions
      (:meth:`ToolFormat.instructions`); observations are one message holding
      ``<tool_response>`` blocks, with role ``observation_role``;
    * ``"auto"`` (default): ``"template"`` when the rollout reports that the tokenizer's template
      renders tools (:meth:`configure_tool_prompt`), else ``"system"``. An env stepped by hand
      (no rollout) uses ``"system"``.

    Args (besides every :class:`envs.TextEnv` option):
        tools: the tools (default: the class attribute ``tools``).
        tool_format: a registered :class:`ToolFormat` name (``"hermes"``, ``"qwen3_coder"``)
            or instance; it must be the format the chat template asks for.
        tool_prompt: ``"auto"``, ``"template"`` or ``"system"`` (above).
        system_prompt: the system message's opening (default
            :data:`DEFAULT_TOOL_SYSTEM_PROMPT`); the tool section follows it (``"system"``) or
            the template adds its own (``"template"``).
        one_shot: False (default); a :class:`ToolExample`; True for the class attribute
            ``example``; or a list of messages used as they are.
        max_calls_per_turn: calls beyond this many in one turn are reported as errors.
        max_tool_errors: consecutive turns with a failed call that end the episode (None: never).
        tool_timeout_s: per-call limit for async tools (None: wait forever).
    """

    tools: Sequence[Tool] = ()
    #: The example used for ``one_shot=True``.
    example: ToolExample | None = None
    default_max_turns = 5

    def __init__(
        self,
        dataset: str = "gsm8k_test",
        split: str | None = None,
        *,
        tools: Sequence[Tool] | None = None,
        tool_format: str | ToolFormat = "hermes",
        tool_prompt: str = "auto",
        one_shot: bool | ToolExample | Sequence[Message] | None = False,
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
        self.tool_format = get_tool_format(tool_format)
        if tool_prompt not in TOOL_PROMPTS:
            raise ValueError(f"tool_prompt must be one of {TOOL_PROMPTS}, got {tool_prompt!r}")
        self.tool_prompt = tool_prompt
        #: True when the chat template renders the schemas (resolved ``tool_prompt``).
        self.tools_in_template = tool_prompt == "template"
        self.stop_sequences = list(self.tool_format.stop_sequences)
        self._example, self._example_result = self._resolve_example(one_shot)
        self._raw_one_shot = (
            [dict(m) for m in one_shot]
            if one_shot and self._example is None and one_shot is not True
            else []
        )
        self.one_shot = self.default_one_shot()
        #: The episode's state (``ToolContext.state``); None between episodes.
        self.episode_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the prompt

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools' JSON schemas (the ``tools=`` argument of a chat template)."""
        return [t.schema() for t in self.tools]

    def configure_tool_prompt(self, template_renders_tools: bool) -> list[dict[str, Any]] | None:
        """Resolve ``tool_prompt`` for a chat template; the rollout calls it before ``reset``.

        Args:
            template_renders_tools: whether the tokenizer's chat template renders ``tools=``
                (`alp_agents.rollout.chat.template_renders_tools`).

        Returns:
            The ``tools=`` argument for the template, or None when the schemas are in the
            env's own system message (``"system"``, or ``"auto"`` with a template that ignores
            tools, such as SmolLM2's).

        Raises:
            ValueError: ``tool_prompt="template"`` with a template that does not render tools.
        """
        if self.tool_prompt == "template" and not template_renders_tools:
            raise ValueError(
                f"{type(self).__name__}(tool_prompt='template'): this chat template does not "
                "render tools= (it ignores them); use tool_prompt='auto' or 'system'"
            )
        self.tools_in_template = self.tool_prompt == "template" or (
            self.tool_prompt == "auto" and template_renders_tools
        )
        self.one_shot = self.default_one_shot()
        return self.tool_schemas() if self.tools_in_template else None

    def tool_system_prompt(self) -> str:
        """The system message: the opening, then (unless the template renders the tools) the
        format's instructions and the tools' JSON schemas."""
        opening = (
            self.system_prompt if self.system_prompt is not None else DEFAULT_TOOL_SYSTEM_PROMPT
        )
        if self.tools_in_template:
            return opening
        tools = self.tool_format.system_prompt(self.tool_schemas())
        return f"{opening}\n\n{tools}" if opening else tools

    def initial_messages(self, problem: Problem) -> list[Message]:
        return build_messages(
            problem.question,
            self.instruction,
            system_prompt=self.tool_system_prompt(),
            one_shot=self.one_shot,
            template=self.question_template,
        )

    def default_one_shot(self) -> list[Message]:
        """The one-shot conversation in the current call format (see :class:`ToolExample`)."""
        example = self._example
        if example is None:
            return list(self._raw_one_shot)
        question = format_question(example.question, self.instruction, self.question_template)
        if self.tools_in_template:
            call = {
                "type": "function",
                "function": {"name": example.tool, "arguments": dict(example.arguments)},
            }
            exchange = [
                {"role": "assistant", "content": example.thought, "tool_calls": [call]},
                {"role": "tool", "content": self._example_result},
            ]
        else:
            exchange = [
                {
                    "role": "assistant",
                    "content": example.thought
                    + self.tool_format.format_call(example.tool, example.arguments),
                },
                self.observation_message(self.tool_format.format_responses([self._example_result])),
            ]
        answer = {"role": "assistant", "content": f"The answer is \\boxed{{{example.answer}}}."}
        return [{"role": "user", "content": question}, *exchange, answer]

    def _resolve_example(self, one_shot: Any) -> tuple[ToolExample | None, str]:
        if one_shot is True:
            if type(self).example is None:
                raise ValueError(
                    f"{type(self).__name__}(one_shot=True) needs an example: set the class "
                    "attribute `example = envs.ToolExample(...)` or pass one_shot=envs.ToolExample(...)"
                )
            one_shot = type(self).example
        if not isinstance(one_shot, ToolExample):
            return None, ""
        where = f"{type(self).__name__} one-shot example"
        chosen = self.tools_by_name.get(one_shot.tool)
        if chosen is None:
            raise ValueError(
                f"{where}: unknown tool {one_shot.tool!r}; tools: {sorted(self.tools_by_name)}"
            )
        try:
            chosen.validate(one_shot.arguments)
        except ToolCallError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if one_shot.result is not None:
            return one_shot, one_shot.result
        if chosen.context_parameter is not None:
            raise ValueError(f"{where}: {one_shot.tool!r} needs a ToolContext; give result=")

        async def run() -> Any:
            value = chosen.call(one_shot.arguments)
            return await value if inspect.isawaitable(value) else value

        return one_shot, self.format_result(_run_to_completion(run))

    # ------------------------------------------------------------------ episodes

    def setup_state(self, state: dict[str, Any]) -> None:
        """Fill a new episode's ``state`` (``ToolContext.state``), e.g. open a sandbox session.

        Called by ``reset`` once the problem is chosen (``self.problem``); the default does
        nothing.
        """

    def cleanup_state(self, state: dict[str, Any]) -> None:
        """Release what :meth:`setup_state` acquired; called once per episode when it ends (or
        on the next ``reset`` / ``close`` if it was cut short). The default does nothing."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        observation, info = super().reset(seed=seed, options=options)
        self.episode_state = {}
        self.setup_state(self.episode_state)
        return observation, info

    def end_episode(self) -> None:
        state, self.episode_state = self.episode_state, None
        if state is not None:
            self.cleanup_state(state)

    def response_is_complete(self, text: str) -> bool:
        return self.tool_format.call_close in text

    def take_turn(self, action: str) -> TurnOutcome:
        calls = self.tool_format.parse(action, {t.name: t.parameters for t in self.tools})
        before_first_call = self.tool_format.text_before_calls(action)
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
        if self.tools_in_template:
            messages = [{"role": "tool", "content": text} for text in texts]
        else:
            messages = [self.observation_message(self.tool_format.format_responses(texts))]
        return TurnOutcome(
            messages=messages,
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
        if self.problem is None or self.episode_state is None:
            raise RuntimeError("run_calls needs an episode: call reset() first")
        context = ToolContext(
            env=self, problem=self.problem, state=self.episode_state, turn=self.turn
        )

        async def turn() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(self._acall(call, context) for call in calls)))

        return _run_to_completion(turn)

    async def _acall(self, call: ToolCall, context: ToolContext) -> dict[str, Any]:
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
            value = chosen.call(call.arguments, context)
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
