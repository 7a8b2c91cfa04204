"""Per-sample records: one line of ``samples.jsonl`` per episode, built from its trajectory.

Everything a record holds comes from the `Trajectory` the rollout returned: the transcript,
the typed step records (tool calls with their status and output, the grade with the extracted
answer and its detail) and the counts. Nothing reads the environment back.

``samples.jsonl`` follows the project's JSONL policy (`alp_agents.common.read_jsonl`): a
cut-off last line (the process died mid-write) is dropped with a warning and cut from the file,
so that appended records start on a fresh line; a bad line anywhere else is corruption.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alp_agents.common.jsonl import append_jsonl, read_jsonl
from alp_agents.evaluation.metrics import CORRECT, UNVERIFIABLE, WRONG
from alp_agents.evaluation.results import EvaluationError
from alp_agents.reporting.console import say
from alp_agents.rollout.trajectory import INFRA_FAILURE_REASONS, ToolCallRecord, Trajectory

TOOL_TEXT_CHARS = 2000
"""Tool output kept per call in a record (head and tail); the trajectory keeps all of it."""


def sample_grade(grade_status: str, finish_reason: str | None) -> str:
    """The evaluation grade of an episode: correct | wrong | unverifiable.

    An episode that ended without a gradable answer (``grade_status == "none"``) is wrong,
    unless OUR infrastructure ended it (``sandbox_error``): then nobody knows, and it is
    unverifiable rather than a silent zero.
    """
    if finish_reason in INFRA_FAILURE_REASONS:
        return CORRECT if grade_status == CORRECT else UNVERIFIABLE
    if grade_status in (CORRECT, WRONG, UNVERIFIABLE):
        return grade_status
    return WRONG


def sample_record(problem: Any, sample_index: int, trajectory: Trajectory) -> dict[str, Any]:
    """One JSON-able line of ``samples.jsonl``: the episode as a human wants to read it.

    ``tool_results`` lists every tool call (code or arguments, status, the observation the model
    saw, stdout / stderr clipped to `TOOL_TEXT_CHARS`), including a final call whose output held
    the answer and so produced no observation message; ``turn`` there is the env's 1-based turn.
    ``score`` is the grade's credit in [0, 1] (None without a grade) and ``rewards`` the env's
    rubric values summed over the episode by name (``{}`` for an env without a rubric).
    """
    messages = list(trajectory.messages)
    initial = trajectory.metrics.get("initial_messages")
    if initial is None:  # a trajectory from elsewhere: everything before the first reply
        initial = next(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages)
        )
    metadata = dict(getattr(problem, "metadata", None) or {})
    grade = trajectory.grade
    return {
        "problem_id": str(problem.id),
        "sample_index": sample_index,
        "source": getattr(problem, "source", None),
        "level": metadata.get("level"),
        "question": problem.question,
        "reference": problem.answer,
        "extracted_answer": None if grade is None else grade.extracted,
        "grade": sample_grade(trajectory.grade_status, trajectory.finish_reason),
        "grade_detail": None if grade is None else grade.detail,
        "reward": float(trajectory.reward),
        "score": None if grade is None else grade.score,
        "rewards": trajectory.reward_components,
        "finish_reason": trajectory.finish_reason,
        "num_turns": int(trajectory.num_turns),
        "num_tool_calls": int(trajectory.num_tool_calls),
        "num_tool_errors": trajectory.num_tool_errors,
        "num_void_turns": int(trajectory.num_void_turns),
        "response_tokens": trajectory.num_generated_tokens,
        "prompt": messages[:initial],
        "transcript": messages,
        "tool_results": [
            _tool_result(step.turn + 1, call)
            for step in trajectory.steps
            for call in step.tool_calls
        ],
    }


def _tool_result(turn: int, call: ToolCallRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"turn": turn, "name": call.name, "status": call.status}
    if call.arguments is not None:
        out["arguments"] = call.arguments
    out.update(
        code=call.code,
        observation=call.observation,
        stdout=_clip(call.output),
        stderr=_clip(call.error),
    )
    return out


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= TOOL_TEXT_CHARS:
        return text
    half = TOOL_TEXT_CHARS // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} characters cut]...\n{text[-half:]}"


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``samples.jsonl``; a torn last line (the process died mid-write) is dropped.

    The torn line is cut from the file (the lines before it stay byte for byte), so that
    appended records start on a fresh line. Raises `EvaluationError` naming the line for
    corruption anywhere else.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            records = read_jsonl(path)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from exc
    text = path.read_text(encoding="utf-8")
    if caught:
        say(str(caught[0].message), prefix="[evaluate] ")
        _replace_text(path, text[: text.rstrip("\n").rfind("\n") + 1])
    elif text and not text.endswith("\n"):
        _replace_text(path, text + "\n")
    return records


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def append_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Append records to ``samples.jsonl`` as they finish (flushed: a crash loses at most one)."""
    append_jsonl(path, records, ensure_ascii=False)


def complete_problem_ids(records: list[dict[str, Any]], n: int) -> set[str]:
    """Problems whose samples ``0..n-1`` are all in ``records``."""
    seen: dict[str, set[int]] = {}
    for r in records:
        if r["sample_index"] < n:
            seen.setdefault(str(r["problem_id"]), set()).add(int(r["sample_index"]))
    return {pid for pid, indices in seen.items() if len(indices) == n}
