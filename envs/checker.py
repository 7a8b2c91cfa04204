"""``envs.check_env``: the conformance kit for environment authors.

Runs gymnasium's own checker (spaces, reset/step return types, seeding, determinism, no shared
return objects) and the text-environment contract the rollout and trainer rely on
(docs/architecture.md): message shapes, the ``info`` keys, ``stop_sequences``, seeded problem
choice, pinning a problem by id, the finish reasons, ``[]`` messages at the end, the reward
(the grade's score at the end, or the rubric's weighted sum of ``info["rewards"]``), and a gymnasium-style error for ``step()`` after the end.

    >>> import envs
    >>> report = envs.check_env(envs.make("alp/Math-v0", dataset="aime24"))
    >>> report.ok
    True

Pass ``actions=[...]`` (assistant texts) to drive a full episode of your own through the checks,
e.g. a tool call followed by an answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
from gymnasium.utils.env_checker import check_env as gymnasium_check_env

from .core import FINISH_REASONS, INFO_KEYS
from .grading import Grade
from .rewards import Rubric, step_reward

VOID_ACTION = "I am not sure how to solve this."


class EnvCheckError(AssertionError):
    """The environment broke the contract; the message lists every failed check."""


@dataclass
class CheckReport:
    """Which checks ran, which failed (``failures``: check name -> reason)."""

    passed: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{len(self.passed)} checks passed, {len(self.failures)} failed"]
        lines += [f"  FAIL {name}: {reason}" for name, reason in self.failures.items()]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def check_env(
    env: gymnasium.Env,
    *,
    seed: int = 0,
    actions: Sequence[str] | None = None,
    gymnasium_checks: bool = True,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Check ``env`` against the gymnasium API and the text-environment contract.

    Args:
        env: the environment (as returned by ``envs.make``; it is reset several times).
        seed: the seed the determinism checks use.
        actions: assistant texts for one scripted episode (default: a single void turn).
        gymnasium_checks: also run ``gymnasium.utils.env_checker.check_env``.
        raise_on_failure: raise :class:`EnvCheckError` listing every failure (else just report).

    Returns:
        The :class:`CheckReport`.
    """
    report = CheckReport()

    def check(name: str, fn: Callable[[], Any]) -> Any:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = fn()
            report.warnings += [
                f"{name}: {w.message}" for w in caught if "render fps" not in str(w.message)
            ]
        except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
            report.failures[name] = f"{type(exc).__name__}: {exc}"
            return None
        report.passed.append(name)
        return value

    check("is a gymnasium.Env with spaces", lambda: _check_class(env))
    check("stop_sequences is a list of str", lambda: _check_stop_sequences(env))
    first = check("reset contract", lambda: _check_reset(env, seed))
    if first is not None:
        check("seeded reset is deterministic", lambda: _check_seeding(env, seed))
        check("options problem_id pins the problem", lambda: _check_pinning(env, first))
        check("info is a fresh copy", lambda: _check_fresh_copies(env, seed))
        check(
            "step contract over one episode",
            lambda: _check_episode(env, seed, list(actions or [VOID_ACTION])),
        )
        check("step after the end raises", lambda: _check_step_after_end(env, seed))
        check("step before reset raises", lambda: _check_step_before_reset(env))
    if gymnasium_checks:
        check(
            "gymnasium.utils.env_checker.check_env",
            lambda: gymnasium_check_env(env, skip_close_check=True),
        )
    if raise_on_failure and report.failures:
        raise EnvCheckError(
            f"{type(env.unwrapped).__name__} failed the environment checks:\n{report}"
        )
    return report


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_class(env: gymnasium.Env) -> None:
    _require(isinstance(env, gymnasium.Env), f"not a gymnasium.Env: {type(env).__name__}")
    _require(env.unwrapped is env, "envs.make must return the environment itself, not a wrapper")
    for name in ("observation_space", "action_space"):
        space = getattr(env, name, None)
        _require(isinstance(space, gymnasium.spaces.Space), f"{name} is not a gymnasium Space")
        _require(space.contains("any text ∑ ✓"), f"{name} must contain arbitrary text")


def _check_stop_sequences(env: gymnasium.Env) -> None:
    stops = getattr(env, "stop_sequences", None)
    _require(
        isinstance(stops, list) and all(isinstance(s, str) and s for s in stops),
        f"stop_sequences must be a list of non-empty str, got {stops!r}",
    )


def _check_messages(messages: Any, where: str, allow_empty: bool) -> None:
    _require(
        isinstance(messages, list),
        f"{where}: messages must be a list, got {type(messages).__name__}",
    )
    _require(allow_empty or messages, f"{where}: messages must not be empty")
    for i, message in enumerate(messages):
        _require(
            isinstance(message, dict) and set(message) >= {"role", "content"},
            f"{where}: message {i} must be a dict with 'role' and 'content', got {message!r}",
        )
        _require(
            isinstance(message["role"], str) and isinstance(message["content"], str),
            f"{where}: message {i} role and content must be str",
        )
        _require(
            allow_empty is False or message["role"] != "assistant",
            f"{where}: step must not write assistant messages (the policy writes those)",
        )


def _check_info(info: Any, where: str) -> None:
    _require(isinstance(info, dict), f"{where}: info must be a dict")
    missing = [k for k in INFO_KEYS if k not in info]
    _require(not missing, f"{where}: info lacks {missing}")
    _require(isinstance(info["problem_id"], str), f"{where}: problem_id must be str")
    _require(
        isinstance(info["turn"], int) and isinstance(info["tool_calls"], int),
        f"{where}: turn/tool_calls must be int",
    )
    _require(
        isinstance(info["tool_results"], list)
        and all(isinstance(r, dict) for r in info["tool_results"]),
        f"{where}: tool_results must be a list of dicts",
    )
    _require(
        info["grade"] is None or isinstance(info["grade"], Grade),
        f"{where}: grade must be an envs.Grade or None",
    )
    _require(
        isinstance(info["rewards"], dict)
        and all(isinstance(k, str) and isinstance(v, float) for k, v in info["rewards"].items()),
        f"{where}: rewards must be a dict of name -> float",
    )
    _require(
        info["finish_reason"] is None or info["finish_reason"] in FINISH_REASONS,
        f"{where}: finish_reason {info['finish_reason']!r} not in {FINISH_REASONS}",
    )


def _check_reset(env: gymnasium.Env, seed: int) -> dict:
    result = env.reset(seed=seed)
    _require(isinstance(result, tuple) and len(result) == 2, "reset must return (obs, info)")
    obs, info = result
    _check_info(info, "reset")
    _check_messages(info["messages"], "reset", allow_empty=False)
    _require(
        info["messages"][-1]["role"] == "user"
        or info["messages"][-1]["role"] == getattr(env, "observation_role", "user"),
        "reset: the last initial message must be the question (role user)",
    )
    _require(
        obs == info["messages"][-1]["content"], "reset: obs must be the text of the last message"
    )
    _require(
        info["turn"] == 0
        and info["tool_calls"] == 0
        and info["tool_results"] == []
        and info["rewards"] == {},
        "reset: counters must start at 0 (and no rewards yet)",
    )
    _require(
        info["grade"] is None and info["finish_reason"] is None,
        "reset: no grade or finish_reason yet",
    )
    return info


def _check_seeding(env: gymnasium.Env, seed: int) -> None:
    def sequence() -> list[tuple[str, str]]:
        out = []
        for i in range(3):
            _, info = env.reset(seed=seed) if i == 0 else env.reset()
            out.append((info["problem_id"], info["messages"][-1]["content"]))
        return out

    first, second = sequence(), sequence()
    _require(first == second, f"reset(seed={seed}) then reset() gave {first} and then {second}")


def _check_pinning(env: gymnasium.Env, first_info: dict) -> None:
    problems = getattr(env, "problems", None)
    target = problems[-1].id if problems else first_info["problem_id"]
    _, info = env.reset(options={"problem_id": target})
    _require(
        info["problem_id"] == target, f"options problem_id={target!r} gave {info['problem_id']!r}"
    )
    _, info = env.reset(seed=123, options={"problem_id": target})
    _require(info["problem_id"] == target, "problem_id must win over the seed")


def _check_fresh_copies(env: gymnasium.Env, seed: int) -> None:
    _, info = env.reset(seed=seed)
    info["messages"][-1]["content"] += " (mutated by the caller)"
    info["messages"].append({"role": "user", "content": "x"})
    _, info2 = env.reset(seed=seed)
    _require(
        info2["messages"] != info["messages"],
        "info['messages'] shares objects with the environment's state",
    )


def _check_step(result: Any, where: str, rubric: Rubric | None = None) -> tuple:
    reward_rule = "the rubric's weighted sum" if rubric else "the grade's score, at the end only"
    _require(isinstance(result, tuple) and len(result) == 5, f"{where}: step must return a 5-tuple")
    obs, reward, terminated, truncated, info = result
    _require(isinstance(obs, str), f"{where}: obs must be str")
    _require(
        isinstance(reward, float), f"{where}: reward must be float, got {type(reward).__name__}"
    )
    _require(
        isinstance(terminated, bool) and isinstance(truncated, bool),
        f"{where}: terminated/truncated must be bool",
    )
    _check_info(info, where)
    _check_messages(info["messages"], where, allow_empty=True)
    done = terminated or truncated
    if done:
        _require(
            info["finish_reason"] in FINISH_REASONS,
            f"{where}: an ended episode needs a finish_reason",
        )
        _require(info["messages"] == [], f"{where}: messages must be [] when the episode ends")
        _require(isinstance(info["grade"], Grade), f"{where}: an ended episode needs a grade")
        expected = step_reward(rubric, info["grade"], info["rewards"])
        _require(reward == expected, f"{where}: reward {reward} != {expected} ({reward_rule})")
        _require(
            truncated == (info["finish_reason"] == "max_turns"),
            f"{where}: truncated iff finish_reason == 'max_turns'",
        )
    else:
        _require(
            info["finish_reason"] is None and info["grade"] is None,
            f"{where}: a running episode has no finish_reason/grade",
        )
        _require(info["messages"], f"{where}: a running episode must send observation messages")
        _require(
            obs == info["messages"][-1]["content"],
            f"{where}: obs must be the text of the last new message",
        )
        expected = step_reward(rubric, None, info["rewards"])
        _require(reward == expected, f"{where}: reward {reward} != {expected} ({reward_rule})")
    return obs, reward, terminated, truncated, info


def _check_episode(env: gymnasium.Env, seed: int, actions: list[str]) -> None:
    env.reset(seed=seed)
    max_turns = getattr(env, "max_turns", len(actions))
    tool_calls = 0
    for turn, action in enumerate(
        actions + [VOID_ACTION] * max(0, max_turns - len(actions)), start=1
    ):
        *_, terminated, truncated, info = _check_step(
            env.step(action), f"step {turn}", getattr(env, "rubric", None)
        )
        _require(info["turn"] == turn, f"step {turn}: info['turn'] is {info['turn']}")
        tool_calls += len(info["tool_results"])
        _require(
            info["tool_calls"] == tool_calls,
            f"step {turn}: tool_calls {info['tool_calls']} != {tool_calls} results so far",
        )
        if terminated or truncated:
            return
    raise AssertionError(f"the episode did not end within max_turns={max_turns} steps")


def _check_step_after_end(env: gymnasium.Env, seed: int) -> None:
    env.reset(seed=seed)
    for _ in range(getattr(env, "max_turns", 1) + 1):
        _, _, terminated, truncated, _ = env.step(VOID_ACTION)
        if terminated or truncated:
            break
    try:
        env.step(VOID_ACTION)
    except gymnasium.error.Error:
        return
    raise AssertionError(
        "step() after the episode ended must raise a gymnasium.error.Error (e.g. ResetNeeded)"
    )


def _check_step_before_reset(env: gymnasium.Env) -> None:
    if env.spec is None:  # not made through the registry: nothing to build a fresh copy from
        return
    fresh = env.spec.make()
    try:
        fresh.step(VOID_ACTION)
    except gymnasium.error.Error:
        return
    finally:
        fresh.close()
    raise AssertionError("step() before reset() must raise a gymnasium.error.Error")
