"""TextEnv: the gymnasium.Env base class every text environment here derives from.

An episode is a chat. ``reset`` picks a problem and returns the initial messages; each ``step``
takes the assistant's text, lets the subclass act on it (:meth:`TextEnv.take_turn`: run a tool,
accept an answer...) and returns the NEW messages to append (observations), or ``[]`` when the
episode ends, with the grade and a finish reason. The base class owns everything that must be
the same in every environment: problem choice and seeding, turn counting, ``max_turns``,
grading, the ``info`` layout, and the errors for misuse.

Writing an environment = subclassing and implementing ``take_turn`` (and usually
``initial_messages``); see :class:`envs.ToolEnv` for function tools and docs/environments.md.

    >>> import envs
    >>> env = envs.make("alp/Math-v0", dataset="aime24")
    >>> obs, info = env.reset(seed=0, options={"problem_id": "aime2024-I-1"})
    >>> info["messages"][-1]["role"], info["problem_id"]
    ('user', 'aime2024-I-1')
    >>> obs, reward, terminated, truncated, info = env.step("The answer is \\\\boxed{204}.")
    >>> reward, terminated, info["finish_reason"], info["grade"].status
    (1.0, True, 'answer', 'correct')
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
from gymnasium import spaces

from .datasets import DatasetError, Problem, load_dataset, problem_from_record
from .grading import DEFAULT_TIMEOUT_S, EXTRACTIONS, Grade, grade
from .prompts import DEFAULT_QUESTION_TEMPLATE, Message, build_messages
from .rewards import RewardInput, Rubric, step_reward
from .text import did_you_mean

FINISH_REASONS: tuple[str, ...] = (
    "answer",
    "max_turns",
    "void_turn",
    "tool_error",
    "sandbox_error",
)
INFO_KEYS: tuple[str, ...] = (
    "messages",
    "problem_id",
    "source",
    "grade",
    "finish_reason",
    "turn",
    "tool_calls",
    "tool_results",
    "rewards",
)


class TextSpace(spaces.Text):
    """Any Python ``str`` of at most ``max_length`` characters.

    gymnasium's :class:`~gymnasium.spaces.Text` only contains strings over a fixed charset; model
    text is arbitrary Unicode, so membership here only checks type and length. ``sample()``
    draws short alphanumeric strings (used by gymnasium's checker as a nonsense action).
    """

    def __init__(
        self, max_length: int = 1_000_000, min_length: int = 0, seed: int | None = None
    ) -> None:
        super().__init__(max_length=max_length, min_length=min_length, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def sample(self, mask=None, probability=None) -> str:
        if mask is None and probability is None:
            length = int(self.np_random.integers(self.min_length, min(self.max_length, 64) + 1))
            mask = (length, None)
        return super().sample(mask=mask, probability=probability)

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"


@dataclass
class TurnOutcome:
    """What a subclass's :meth:`TextEnv.take_turn` reports about one assistant turn.

    Attributes:
        messages: observation messages to append if the episode goes on.
        tool_results: one dict per tool call made this turn (``name`` and ``status`` at least).
        finish_reason: None to continue, else one of FINISH_REASONS.
        answer_text: with ``finish_reason="answer"``: the text the answer is extracted from.
        grade: a grade decided by the subclass (e.g. unverifiable on a sandbox error).
        tool_error: True when this turn's tool call failed (malformed call, tool exception).
    """

    messages: list[Message] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    answer_text: str | None = None
    grade: Grade | None = None
    tool_error: bool = False


class TextEnv(gymnasium.Env):
    """A chat environment over a problem set (see the module docstring).

    Args:
        dataset: a bundled dataset name, procedural generator name or JSONL path
            (see :func:`envs.load_dataset`).
        split: the dataset split ("train"/"test" for procedural and paired sets).
        dataset_options: keyword options for a procedural generator (e.g. ``{"n": 200, "level": "easy"}``).
        problems: a list of :class:`Problem` (or dicts) to use instead of ``dataset``.
        max_turns: assistant turns before the episode is cut (``finish_reason="max_turns"``,
            ``truncated=True``).
        instruction: text prepended to every question (None: the class default; "" for none).
        system_prompt: optional system message.
        one_shot: True for the class's built-in example, False/None for none, or a list of
            messages to place before the question.
        question_template: how instruction and question are joined (``{instruction}``, ``{question}``).
        observation_role: role of observation messages ("user" by default; e.g. "tool").
        max_observation_chars: observation text budget, head + tail kept with a visible marker.
        max_observation_tokens: the budget in policy tokens, applied by the rollout (which owns
            the tokenizer); stored here so one config carries both.
        answer_extraction: "boxed" (default), "boxed_or_number" (GSM8K-style fallback) or "raw".
        grade_timeout_s: hard limit for one verification (exceeded -> unverifiable).
        max_tool_errors: end the episode with ``finish_reason="tool_error"`` after this many
            consecutive TURNS whose tool calls failed (``TurnOutcome.tool_error``: for ToolEnv,
            at least one call of the turn failed; None: never).
        rubric: weighted reward functions (:class:`envs.Rubric`) scored after every step; the
            step reward is their weighted sum and ``info["rewards"]`` their values. None: the
            class attribute ``rubric``; when that is None too, the reward is the grade's score
            at the end (1.0 iff correct), the paper's binary outcome reward.
        render_mode: None or "ansi" (``render()`` returns the transcript).
    """

    metadata = {"render_modes": ["ansi"]}
    #: Used when ``instruction=None`` is passed.
    default_instruction: str | None = None
    #: Used when ``max_turns`` is not passed.
    default_max_turns: int = 1
    #: Used when ``rubric`` is not passed (None: the binary outcome reward).
    rubric: Rubric | None = None

    def __init__(
        self,
        dataset: str = "gsm8k_test",
        split: str | None = None,
        *,
        dataset_options: dict[str, Any] | None = None,
        problems: Sequence[Problem | dict] | None = None,
        max_turns: int | None = None,
        instruction: str | None = None,
        system_prompt: str | None = None,
        one_shot: bool | Sequence[Message] | None = False,
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
        observation_role: str = "user",
        max_observation_chars: int | None = 512,
        max_observation_tokens: int | None = 256,
        answer_extraction: str = "boxed",
        grade_timeout_s: float = DEFAULT_TIMEOUT_S,
        max_tool_errors: int | None = None,
        rubric: Rubric | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        if answer_extraction not in EXTRACTIONS:
            raise ValueError(
                f"answer_extraction must be one of {EXTRACTIONS}, got {answer_extraction!r}"
            )
        max_turns = self.default_max_turns if max_turns is None else int(max_turns)
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if max_observation_chars is not None and max_observation_chars < 0:
            raise ValueError(
                f"max_observation_chars must be >= 0 or None, got {max_observation_chars}"
            )
        self.render_mode = render_mode
        self.dataset_name = str(dataset) if problems is None else "<problems>"
        self.split = split
        self.problems: list[Problem] = self._load_problems(
            dataset, split, dataset_options, problems
        )
        self._index = {problem.id: i for i, problem in enumerate(self.problems)}
        self.max_turns = max_turns
        self.instruction = self.default_instruction if instruction is None else instruction
        self.system_prompt = system_prompt
        self.question_template = question_template
        self.observation_role = observation_role
        self.max_observation_chars = max_observation_chars
        self.max_observation_tokens = max_observation_tokens
        self.answer_extraction = answer_extraction
        self.grade_timeout_s = grade_timeout_s
        self.max_tool_errors = max_tool_errors
        rubric = type(self).rubric if rubric is None else rubric
        if rubric is not None and not isinstance(rubric, Rubric):
            raise TypeError(f"rubric must be an envs.Rubric or None, got {type(rubric).__name__}")
        self.rubric = rubric
        if one_shot is True:
            self.one_shot: list[Message] = self.default_one_shot()
        elif not one_shot:
            self.one_shot = []
        else:
            self.one_shot = [dict(m) for m in one_shot]
        #: Strings the policy's generation must stop at (see docs/environments.md).
        self.stop_sequences: list[str] = []
        self.observation_space = TextSpace()
        self.action_space = TextSpace()
        self.problem: Problem | None = None
        self.transcript: list[Message] = []
        self.turn = 0
        self.tool_calls = 0
        self.finish_reason: str | None = None
        self._consecutive_tool_errors = 0
        self._actions: list[str] = []
        self._turn_tool_results: list[tuple[dict[str, Any], ...]] = []

    # ------------------------------------------------------------------ hooks for subclasses

    def default_one_shot(self) -> list[Message]:
        """The built-in example used for ``one_shot=True`` (none in the base class)."""
        return []

    def initial_messages(self, problem: Problem) -> list[Message]:
        """The chat that starts an episode on ``problem``."""
        return build_messages(
            problem.question,
            self.instruction,
            system_prompt=self.system_prompt,
            one_shot=self.one_shot,
            template=self.question_template,
        )

    def take_turn(self, action: str) -> TurnOutcome:
        """Act on one assistant message. Subclasses implement this."""
        raise NotImplementedError

    def grade_answer(self, text: str) -> Grade:
        """Grade ``text`` against the current problem's answer (override for other answer kinds)."""
        assert self.problem is not None
        return grade(
            text,
            self.problem.answer,
            extract=self.answer_extraction,
            timeout_s=self.grade_timeout_s,
        )

    def end_episode(self) -> None:
        """Release per-episode resources (e.g. a sandbox session); called at the end and on reset."""

    def response_is_complete(self, text: str) -> bool:
        """True when ``text`` has reached a point where generation must stop (see stop_sequences).

        The rollout may generate on after a stop string matched inside something that is not
        the end of a turn; the default is "any stop sequence occurs in the text".
        """
        return any(stop in text for stop in self.stop_sequences)

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start an episode. ``options``: ``problem_id`` (pin a problem by id), ``problem_index``
        (by position) or ``problem`` (a Problem or dict not in the dataset).

        Returns ``(observation, info)``: the observation is the text of the last initial
        message; ``info["messages"]`` holds the whole initial chat.
        """
        super().reset(seed=seed)
        self.end_episode()
        options = dict(options or {})
        self.problem = self._choose_problem(options)
        self.turn = 0
        self.tool_calls = 0
        self.finish_reason = None
        self._consecutive_tool_errors = 0
        self._actions = []
        self._turn_tool_results = []
        self.transcript = [dict(m) for m in self.initial_messages(self.problem)]
        if not self.transcript:
            raise RuntimeError(f"{type(self).__name__}.initial_messages returned no messages")
        info = self._info(copy.deepcopy(self.transcript), None, [], {})
        return self.transcript[-1]["content"], info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Take the assistant's text; returns ``(obs, reward, terminated, truncated, info)``.

        ``info["messages"]`` are the new messages to append after the assistant turn ([] when
        the episode has ended); ``obs`` is the text of the last of them ("" at the end).
        """
        if self.problem is None:
            raise gymnasium.error.ResetNeeded("Cannot call env.step() before calling env.reset()")
        if self.finish_reason is not None:
            raise gymnasium.error.ResetNeeded(
                f"Cannot call env.step() after the episode ended (finish_reason={self.finish_reason!r}); "
                "call env.reset() first"
            )
        if not isinstance(action, str):
            raise TypeError(
                f"action must be the assistant's text (str), got {type(action).__name__}"
            )
        self.turn += 1
        self.transcript.append({"role": "assistant", "content": action})
        outcome = self.take_turn(action)
        self.tool_calls += len(outcome.tool_results)
        self._actions.append(action)
        self._turn_tool_results.append(tuple(copy.deepcopy(list(outcome.tool_results))))
        self._consecutive_tool_errors = (
            self._consecutive_tool_errors + 1 if outcome.tool_error else 0
        )

        finish, truncated = outcome.finish_reason, False
        if finish is not None and finish not in FINISH_REASONS:
            raise ValueError(
                f"{type(self).__name__}.take_turn returned unknown finish_reason {finish!r}"
            )
        if (
            finish is None
            and self.max_tool_errors is not None
            and self._consecutive_tool_errors >= self.max_tool_errors
        ):
            finish = "tool_error"
        if finish is None and self.turn >= self.max_turns:
            finish, truncated = "max_turns", True

        result_grade: Grade | None = None
        messages: list[Message] = []
        if finish is None:
            messages = [dict(m) for m in outcome.messages]
        else:
            result_grade = outcome.grade or self._final_grade(finish, outcome.answer_text)
        self.finish_reason = finish
        self.transcript.extend(copy.deepcopy(messages))
        if finish is not None:
            self.end_episode()
        values = self._score_step(action, result_grade)
        reward = step_reward(self.rubric, result_grade, values)
        obs = messages[-1]["content"] if messages else ""
        info = self._info(messages, result_grade, outcome.tool_results, values)
        return obs, float(reward), finish is not None and not truncated, truncated, info

    def render(self) -> str | None:
        """The transcript so far as text (render_mode "ansi")."""
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in self.transcript)

    def close(self) -> None:
        self.end_episode()
        super().close()

    # ------------------------------------------------------------------ helpers

    @property
    def messages(self) -> list[Message]:
        """The whole conversation so far (a copy)."""
        return copy.deepcopy(self.transcript)

    def observation_message(self, content: str) -> Message:
        """An observation message with this env's observation role."""
        return {"role": self.observation_role, "content": content}

    def _score_step(self, action: str, result_grade: Grade | None) -> dict[str, float]:
        """The rubric's values for the step just taken ({} without a rubric)."""
        if self.rubric is None:
            return {}
        assert self.problem is not None
        return self.rubric.score(
            RewardInput(
                problem=self.problem,
                turn=self.turn - 1,
                action=action,
                tool_results=self._turn_tool_results[-1],
                actions=tuple(self._actions),
                turn_tool_results=tuple(self._turn_tool_results),
                messages=tuple(copy.deepcopy(self.transcript)),
                finish_reason=self.finish_reason,
                grade=result_grade,
            )
        )

    def _final_grade(self, finish: str, answer_text: str | None) -> Grade:
        assert self.problem is not None
        if finish == "answer" and answer_text is not None:
            return self.grade_answer(answer_text)
        return Grade("wrong", None, self.problem.answer, f"no answer ({finish})")

    def _info(
        self,
        messages: list[Message],
        result_grade: Grade | None,
        tool_results: list[dict],
        rewards: dict[str, float],
    ) -> dict[str, Any]:
        assert self.problem is not None
        return {
            "messages": messages,
            "problem_id": self.problem.id,
            "source": self.problem.source,
            "grade": result_grade,
            "finish_reason": self.finish_reason,
            "turn": self.turn,
            "tool_calls": self.tool_calls,
            "tool_results": copy.deepcopy(list(tool_results)),
            "rewards": dict(rewards),
        }

    def _choose_problem(self, options: dict[str, Any]) -> Problem:
        unknown = set(options) - {"problem_id", "problem_index", "problem"}
        if unknown:
            raise ValueError(
                f"unknown reset option(s) {sorted(unknown)}; known: problem_id, problem_index, problem"
            )
        if "problem" in options:
            given = options["problem"]
            return (
                given
                if isinstance(given, Problem)
                else problem_from_record(dict(given), where="options['problem']")
            )
        if "problem_id" in options:
            pid = str(options["problem_id"])
            if pid not in self._index:
                raise KeyError(
                    f"problem_id {pid!r} is not in dataset {self.dataset_name!r} "
                    f"({len(self.problems)} problems).{did_you_mean(pid, self._index)}"
                )
            return self.problems[self._index[pid]]
        if "problem_index" in options:
            index = int(options["problem_index"])
            if not 0 <= index < len(self.problems):
                raise IndexError(
                    f"problem_index {index} out of range for {len(self.problems)} problems"
                )
            return self.problems[index]
        return self.problems[int(self.np_random.integers(len(self.problems)))]

    @staticmethod
    def _load_problems(dataset, split, dataset_options, problems) -> list[Problem]:
        if problems is not None:
            loaded = [
                p
                if isinstance(p, Problem)
                else problem_from_record(dict(p), where=f"problems[{i}]")
                for i, p in enumerate(problems)
            ]
        else:
            loaded = load_dataset(dataset, split=split, **(dataset_options or {}))
        if not loaded:
            raise DatasetError(f"dataset {dataset!r} (split={split!r}) has no problems")
        ids = [p.id for p in loaded]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DatasetError(f"duplicate problem ids: {dupes}")
        return loaded

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dataset={self.dataset_name!r}, split={self.split!r}, problems={len(self.problems)}, max_turns={self.max_turns})"
