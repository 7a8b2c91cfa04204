"""PythonToolEnv (``alp/PythonTool-v0``): multi-turn tool-integrated reasoning on the sandbox.

The loop of the authors' release (docs/environments.md, `alp/PythonTool-v0`):

1. The question comes with an instruction: reason, optionally write a fenced ```python block,
   put the final answer in ``\\boxed{}``.
2. The policy generates until the end of its first complete code block (``stop_sequences``).
3. If the assistant's prose (the text before that block) contains ``\\boxed{}``, the episode ends and that
   answer is graded. Otherwise the block runs in the sandbox; the observation is the last line
   of stderr if there is any, else stdout, cut to ``max_observation_chars`` (head + tail with a
   visible marker), sent back as "Code execution result: ...". If stdout contains ``\\boxed{}``
   the episode ends and that answer is graded.
4. A turn with neither code nor a boxed answer is a void turn: the episode ends
   (``finish_reason="void_turn"``, reward 0; the trainer masks it out of the loss).
5. After ``max_turns`` turns (default 5) the episode is truncated (``finish_reason="max_turns"``).

By default the code of one episode runs in one sandbox SESSION (variables persist across turns,
like a notebook); ``stateful=False`` runs every block in a fresh process, as the release does.
A sandbox infrastructure failure ends the episode with ``finish_reason="sandbox_error"`` and an
``unverifiable`` grade: it is never scored as a wrong answer.

All environments of a process share ONE lazily started :class:`sandbox.LocalSandbox`
(:func:`shared_sandbox`, closed at exit); pass ``sandbox=`` to use your own. ``step`` may be
called from many threads at once, one thread per environment.

    >>> import envs
    >>> env = envs.make("alp/PythonTool-v0", dataset="arith", split="test")
    >>> _, info = env.reset(options={"problem_id": "arith-test-0"})
    >>> env.stop_sequences
    ['```\\n']
    >>> obs, r, term, trunc, info = env.step("```python\\nx = 6 * 7\\nprint(x)\\n```\\n")
    >>> obs
    'Code execution result: 42'
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from sandbox import ExecutionResult, Limits, LocalSandbox, Sandbox, SandboxSession

from .core import TextEnv, TurnOutcome
from .grading import Grade, extract_boxed
from .prompts import CODE_RESULT_TEMPLATE, PYTHON_TOOL_INSTRUCTION, Message, python_tool_one_shot
from .text import find_code_block, last_line, truncate_middle

#: Per-call limits of the authors' release: 3 s, 2 GB, no network.
DEFAULT_LIMITS = Limits(timeout_s=3.0, memory_mb=2048)

_shared: LocalSandbox | None = None
_shared_lock = threading.Lock()


def shared_sandbox() -> LocalSandbox:
    """The process-wide sandbox every PythonToolEnv uses unless given one (started on first use).

    One warm server per CPU core serves all environments; each episode gets its own session
    on it. It is closed when the interpreter exits.
    """
    global _shared
    with _shared_lock:
        if _shared is None or _shared._closed:
            _shared = LocalSandbox(limits=DEFAULT_LIMITS, workers=os.cpu_count() or 1)
            atexit.register(_shared.close)
        return _shared


class PythonToolEnv(TextEnv):
    """Multi-turn maths with a Python interpreter (see the module docstring).

    Args (besides every :class:`envs.TextEnv` option):
        dataset, split: default ``"arith"``, ``"train"``.
        max_turns: default 5 (the release uses 10 for AIME evaluation).
        stateful: True (default) keeps one sandbox session per episode; False runs every block
            in a fresh process (the release's behaviour).
        sandbox: a :class:`sandbox.Sandbox` (``LocalSandbox``, ``DockerSandbox``, ...) to use
            instead of :func:`shared_sandbox`.
        limits: per-call :class:`sandbox.Limits` (default 3 s, 2 GB).
        one_shot: default True: a solved "What is 123 * 456?" conversation precedes the question
            (the default 135M model needs it to write code at all).
        result_template: observation text; ``{output}`` is replaced by the tool output.
        empty_output: what ``{output}`` becomes when the code printed nothing.
    """

    default_instruction = PYTHON_TOOL_INSTRUCTION
    default_max_turns = 5

    def __init__(
        self,
        dataset: str = "arith",
        split: str | None = "train",
        *,
        stateful: bool = True,
        sandbox: Sandbox | None = None,
        limits: Limits | None = None,
        one_shot: Any = True,
        result_template: str = CODE_RESULT_TEMPLATE,
        empty_output: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, split, one_shot=one_shot, **kwargs)
        if "{output}" not in result_template:
            raise ValueError("result_template must contain '{output}'")
        self.stateful = stateful
        self.limits = limits or DEFAULT_LIMITS
        self.result_template = result_template
        self.empty_output = empty_output
        self._sandbox = sandbox
        self._session: SandboxSession | None = None
        # Stop at the end of the first complete code block. The opening fence "```python\n"
        # does not contain "```\n" (a letter follows the backticks), so the first match is
        # the closing fence. A bare "```\n" opening fence also matches: that turn has no
        # complete python block and is a void turn (documented in docs/environments.md).
        self.stop_sequences = ["```\n"]

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = shared_sandbox()
        return self._sandbox

    def default_one_shot(self) -> list[Message]:
        return python_tool_one_shot(self.instruction, self.question_template, self.observation_role)

    def response_is_complete(self, text: str) -> bool:
        """True once ``text`` holds a complete python block (generation must stop there)."""
        return find_code_block(text) is not None

    # ------------------------------------------------------------------ one turn

    def take_turn(self, action: str) -> TurnOutcome:
        block = find_code_block(action)
        prose = action if block is None else action[: block.start]
        if extract_boxed(prose) is not None:  # an answer in the text; code printing one runs
            return TurnOutcome(finish_reason="answer", answer_text=prose)
        if block is None:
            return TurnOutcome(finish_reason="void_turn")
        result = self._execute(block.code)
        observation = self.observation_text(result)
        tool_result = {
            "name": "python",
            "code": block.code,
            "observation": observation,
            **result.to_dict(),
        }
        if result.status == "sandbox_error":
            assert self.problem is not None
            detail = f"sandbox error: {last_line(result.stderr) or 'infrastructure failure'}"
            return TurnOutcome(
                tool_results=[tool_result],
                finish_reason="sandbox_error",
                grade=Grade("unverifiable", None, self.problem.answer, detail),
            )
        if extract_boxed(result.stdout) is not None:
            return TurnOutcome(
                tool_results=[tool_result], finish_reason="answer", answer_text=result.stdout
            )
        return TurnOutcome(
            messages=[self.observation_message(observation)],
            tool_results=[tool_result],
            tool_error=result.status != "ok",
        )

    def observation_text(self, result: ExecutionResult) -> str:
        """Last stderr line if stderr has text, else stdout; truncated head + tail; templated."""
        output = last_line(result.stderr) if result.stderr.strip() else result.stdout.strip("\n")
        if result.status == "timeout" and not output:
            output = f"TimeoutError: execution took longer than {self.limits.timeout_s:g} s"
        output = (
            truncate_middle(output, self.max_observation_chars) if output else self.empty_output
        )
        return self.result_template.format(output=output)

    def _execute(self, code: str) -> ExecutionResult:
        if not self.stateful:
            return self.sandbox.run(code, limits=self.limits)
        if self._session is None:
            self._session = self.sandbox.session(limits=self.limits)
        return self._session.run(code)

    def end_episode(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()
