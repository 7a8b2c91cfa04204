"""Rubrics: weighted reward functions, scored by the environment after every step.

Without a rubric an episode's reward is its grade's score at the end (1.0 iff correct: the
binary outcome reward of the paper). A rubric replaces that with a weighted sum of named reward
functions, each recorded on its own so that training logs ``reward/<name>`` beside
``reward/mean`` and credit assignment can see which turn earned what:

* an **outcome** function (``per_turn=False``) is called once, on the step that ends the
  episode, and scores the whole episode (correctness, answer format, length);
* a **per-turn** function (``per_turn=True``) is called after every step and scores that turn
  (a successful tool call); its values are the per-turn rewards.

The env's step reward is ``sum(weight * value)`` over the functions scored at that step, so the
episode's return (the sum of its step rewards) is ``sum(weight * value)`` over every value. The
environment owns the bookkeeping (``envs.TextEnv``): an env opts in with ``rubric=`` on its
constructor or a ``rubric`` class attribute, and ``info["rewards"]`` carries the step's
unweighted values by name.

    >>> import envs
    >>> from envs import rewards
    >>> rubric = envs.Rubric([rewards.correctness(), rewards.answer_format(weight=0.1)])
    >>> env = envs.make("alp/Math-v0", dataset="aime24", rubric=rubric)
    >>> _ = env.reset(options={"problem_id": "aime2024-I-1"})
    >>> _, reward, *_, info = env.step("The answer is \\\\boxed{203}.")
    >>> info["rewards"], reward                 # wrong, but a boxed answer: format credit only
    ({'correctness': 0.0, 'format': 1.0}, 0.1)

Built-ins: :func:`correctness`, :func:`answer_format`, :func:`tool_use`, :func:`length`. Your
own is a :class:`RewardFunc` around any function of a :class:`RewardInput`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .datasets import Problem
from .grading import Grade
from .prompts import Message

RESERVED_NAMES: tuple[str, ...] = ("mean",)
"""Names a reward function may not take: ``reward/mean`` is the total reward's metric."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class RewardInput:
    """What a reward function sees after one step (built by the env from copies of its state:
    changing them changes nothing in the episode).

    Attributes:
        problem: the episode's problem (``problem.answer`` is the reference).
        turn: 0-based index of the turn just taken.
        action: the assistant's text of this turn.
        tool_results: this turn's tool calls, as in ``info["tool_results"]`` (``name`` and
            ``status``, ``"ok"`` on success, at least).
        actions: every assistant text of the episode so far, this turn's last.
        turn_tool_results: the tool results of every turn so far, this turn's last.
        messages: the whole conversation so far, this turn's observation included.
        finish_reason: None while the episode goes on, else why it ended.
        grade: the grade, on the step that ends the episode (else None).
    """

    problem: Problem
    turn: int
    action: str
    tool_results: tuple[dict[str, Any], ...]
    actions: tuple[str, ...]
    turn_tool_results: tuple[tuple[dict[str, Any], ...], ...]
    messages: tuple[Message, ...]
    finish_reason: str | None = None
    grade: Grade | None = None

    @property
    def done(self) -> bool:
        """True on the step that ends the episode."""
        return self.finish_reason is not None


RewardFn = Callable[[RewardInput], float]


@dataclass(frozen=True)
class RewardFunc:
    """One named, weighted reward function of a :class:`Rubric`.

    Attributes:
        name: the key in ``info["rewards"]``, in the trajectory's step records and in the
            ``reward/<name>`` metric (letters, digits, ``_ . -``; not ``mean``).
        fn: ``fn(RewardInput) -> float``, a finite number (it may be negative: a penalty).
        weight: its factor in the step reward.
        per_turn: True: scored after every step (a per-turn reward); False: once, on the step
            that ends the episode (an outcome reward).
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    per_turn: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"reward function name must be letters, digits, '_', '.' or '-', got {self.name!r}"
            )
        if self.name in RESERVED_NAMES:
            raise ValueError(
                f"reward function name {self.name!r} is reserved (reward/{self.name} is the total)"
            )
        if not callable(self.fn):
            raise TypeError(f"reward function {self.name!r}: fn must be callable, got {self.fn!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float):
            raise TypeError(f"reward function {self.name!r}: weight must be a number")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward function {self.name!r}: weight must be finite")

    def applies(self, inp: RewardInput) -> bool:
        """Whether this function is scored at this step."""
        return self.per_turn or inp.done

    def score(self, inp: RewardInput) -> float:
        """``fn(inp)`` as a float; a non-number or a non-finite value is an error naming us."""
        value = self.fn(inp)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"reward function {self.name!r} returned {type(value).__name__}, not a number"
            )
        if not math.isfinite(value):
            raise ValueError(f"reward function {self.name!r} returned {value!r}")
        return float(value)


class Rubric:
    """Named reward functions with weights; the env's step reward is their weighted sum.

    Args:
        funcs: the :class:`RewardFunc` s (at least one; names unique).

    >>> from envs import rewards
    >>> rubric = Rubric([rewards.correctness(), rewards.length(target_chars=100, weight=0.5)])
    >>> rubric.weights
    {'correctness': 1.0, 'length': 0.5}
    >>> rubric.total({"correctness": 1.0, "length": -0.5})
    0.75
    """

    def __init__(self, funcs: Sequence[RewardFunc]) -> None:
        funcs = list(funcs)
        if not funcs:
            raise ValueError("a Rubric needs at least one RewardFunc")
        for func in funcs:
            if not isinstance(func, RewardFunc):
                raise TypeError(
                    f"{func!r} is not an envs.RewardFunc; wrap it: envs.RewardFunc('name', fn)"
                )
        names = [f.name for f in funcs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate reward function names {dupes}")
        self.funcs: tuple[RewardFunc, ...] = tuple(funcs)

    @property
    def weights(self) -> dict[str, float]:
        """``{name: weight}`` in the rubric's order."""
        return {f.name: float(f.weight) for f in self.funcs}

    def score(self, inp: RewardInput) -> dict[str, float]:
        """The unweighted values of the functions that apply at this step, by name."""
        return {f.name: f.score(inp) for f in self.funcs if f.applies(inp)}

    def total(self, values: Mapping[str, float]) -> float:
        """``sum(weight * value)``; a name not in the rubric is an error."""
        weights = self.weights
        unknown = sorted(set(values) - set(weights))
        if unknown:
            raise KeyError(f"reward(s) {unknown} not in the rubric {list(weights)}")
        return float(sum(weights[name] * value for name, value in values.items()))

    def __repr__(self) -> str:
        terms = ", ".join(
            f"{f.name}{'[turn]' if f.per_turn else ''}*{f.weight:g}" for f in self.funcs
        )
        return f"Rubric({terms})"


def step_reward(rubric: Rubric | None, grade: Grade | None, values: Mapping[str, float]) -> float:
    """The reward ``env.step`` returns: the rubric's weighted sum, or without a rubric the
    grade's score at the end and 0.0 before (the paper's binary outcome reward)."""
    if rubric is not None:
        return rubric.total(values)
    return grade.reward if grade is not None else 0.0


# ----------------------------------------------------------------------------- built-ins


def correctness(weight: float = 1.0) -> RewardFunc:
    """``correctness``: the grade's score at the end (1.0 correct, 0.0 wrong, or the partial
    credit a grader set; 0.0 for an episode that ended without an answer)."""
    return RewardFunc("correctness", _correctness, weight)


def _correctness(inp: RewardInput) -> float:
    return inp.grade.reward if inp.grade is not None else 0.0


def answer_format(weight: float = 0.1) -> RewardFunc:
    """``format``: 1.0 when the episode ended on an answer the grader could extract (a
    ``\\boxed{}`` for the default grader), right or wrong; else 0.0 (no answer, max_turns, a
    void turn). Pays a small model for the answer format before it can get answers right."""
    return RewardFunc("format", _answer_format, weight)


def _answer_format(inp: RewardInput) -> float:
    ok = inp.finish_reason == "answer" and inp.grade is not None and inp.grade.extracted is not None
    return 1.0 if ok else 0.0


def tool_use(weight: float = 0.1, max_rewarded_turns: int | None = 1) -> RewardFunc:
    """``tool_use`` (per turn): the share of this turn's tool calls that succeeded (status
    ``ok``), 0.0 in a turn without calls.

    Only the first ``max_rewarded_turns`` turns with a successful call are paid (None: every
    one), so the model is paid for using the tool, not for calling it until ``max_turns`` runs
    out; a turn whose calls all failed earns 0.0 and does not count towards the limit.
    """
    if max_rewarded_turns is not None and max_rewarded_turns < 1:
        raise ValueError(f"max_rewarded_turns must be >= 1 or None, got {max_rewarded_turns}")

    def score(inp: RewardInput) -> float:
        return _tool_use(inp, max_rewarded_turns)

    return RewardFunc("tool_use", score, weight, per_turn=True)


def _tool_use(inp: RewardInput, max_rewarded_turns: int | None) -> float:
    if not inp.tool_results:
        return 0.0
    paid = sum(1 for results in inp.turn_tool_results[:-1] if _succeeded(results) > 0)
    if max_rewarded_turns is not None and paid >= max_rewarded_turns:
        return 0.0
    return _succeeded(inp.tool_results) / len(inp.tool_results)


def _succeeded(results: Sequence[dict[str, Any]]) -> int:
    return sum(1 for result in results if result.get("status") == "ok")


def length(target_chars: int, weight: float = 0.1) -> RewardFunc:
    """``length``: a penalty for long episodes, in characters of assistant text (the env has no
    tokenizer): 0.0 up to ``target_chars``, falling linearly to -1.0 at twice that and staying
    there. Compliant episodes are not shifted; only the overlong ones lose."""
    if target_chars < 1:
        raise ValueError(f"target_chars must be >= 1, got {target_chars}")

    def score(inp: RewardInput) -> float:
        return length_penalty(sum(len(a) for a in inp.actions), target_chars)

    return RewardFunc("length", score, weight)


def length_penalty(chars: int, target_chars: int) -> float:
    """``-min(1, max(0, chars - target) / target)``.

    >>> length_penalty(80, 100), length_penalty(150, 100), length_penalty(500, 100)
    (0.0, -0.5, -1.0)
    """
    over = max(0, chars - target_chars)
    return -min(1.0, over / target_chars) if over else 0.0
