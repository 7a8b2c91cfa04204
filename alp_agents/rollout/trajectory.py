"""Trajectory: the token-exact record of one episode, the contract between rollout and learner.

One `Trajectory` is one episode of an environment. ``prompt_ids`` is the rendered initial chat
prompt (ending with the chat template's generation prompt); ``response_ids`` interleave, turn by
turn, the tokens the model sampled (``loss_mask`` 1) with template and observation tokens
(``loss_mask`` 0). Per response token:

* ``loss_mask[i]`` is 1 exactly on a token the inference engine sampled (including an end-of-turn
  token the model sampled itself), 0 on template tokens (e.g. the newline after ``<|im_end|>``)
  and on observation tokens (tool output, the next generation prompt);
* ``infer_logprobs[i]`` is the engine's log-prob of that sampled token (see
  `alp_agents.rollout.engines` for the convention), 0.0 where the mask is 0;
* ``turn_index[i]`` is the 0-based assistant turn the token belongs to: the turn's sampled
  tokens first, then the template and observation tokens that answer it.

So the context the engine saw at turn ``k`` is ``prompt_ids + response_ids[:turn_start(k)]``
(`Trajectory.context_at_turn`): nothing is ever decoded and re-tokenised.

Besides tokens, a trajectory keeps what happened in each env step as typed records
(``steps``: one `StepRecord` per assistant turn with the action text, the tool calls and their
results as `ToolCallRecord`, the observation messages, the step's reward with its rubric values
by name, and, on the last step, the `GradeRecord`). ``reward`` is the episode's return, the sum
of its steps' rewards (`Trajectory.turn_rewards` are the per-turn terms, for credit assignment;
`Trajectory.reward_components` the rubric's values summed over the episode, by name).
The rollout fills them from ``env.step``'s info in one place (`tool_call_record` and `grade_record`, called by the agent loop), so that
evaluation, the learner's statistics and a human reading a JSONL file all read the same typed
data, and nothing needs to wrap an env to see its infos.

`collate` pads a batch to tensors for the learner and `save_jsonl` / `load_jsonl` store batches
losslessly for inspection, replay and debugging.

Example::

    >>> t = Trajectory(prompt_ids=[1, 5, 6], response_ids=[7, 8, 2, 9, 1],
    ...                loss_mask=[1, 1, 1, 0, 0], infer_logprobs=[-0.5, -1.0, -0.1, 0.0, 0.0],
    ...                turn_index=[0, 0, 0, 0, 0], reward=1.0, grade_status="correct",
    ...                finish_reason="answer", num_turns=1, group_id=0, problem_id="p0")
    >>> t.validate()
    >>> batch = collate([t], pad_token_id=2)
    >>> batch["input_ids"].tolist(), batch["loss_mask"].tolist()
    ([[1, 5, 6, 7, 8, 2, 9, 1]], [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
"""Bumped when a field changes meaning or is added; `Trajectory.from_dict` refuses newer
versions (2: ``policy_versions``; files of version 1 load with it empty)."""

GRADE_STATUSES = ("correct", "wrong", "unverifiable", "none")
"""``none``: the episode ended without a gradable answer (or the env does not grade)."""

FINISH_REASONS = ("answer", "max_turns", "length", "void_turn", "tool_error", "sandbox_error")
"""Why an episode ended. ``length``: a token budget (response or context) cut it short;
``sandbox_error``: OUR infrastructure failed (never a wrong answer)."""

INFRA_FAILURE_REASONS = ("sandbox_error",)


class TrajectoryError(ValueError):
    """A trajectory breaks an invariant; the message names the invariant and the position."""


# ---------------------------------------------------------------------------- step records


@dataclass
class ToolCallRecord:
    """One tool call of a turn and its result, the same for every environment.

    PythonToolEnv reports ``code``, ``stdout``, ``stderr`` and a sandbox ``status`` (``ok``,
    ``error``, ``timeout``, ``memory``, ``output_limit``, ``killed``, ``sandbox_error``);
    ToolEnv reports ``arguments`` and ``output`` or ``error`` with status ``ok`` / ``error``.
    `tool_call_record` maps both onto these fields; a field an env does not report is None.

    Attributes:
        name: the tool (``"python"`` for PythonToolEnv).
        status: ``"ok"``, or why the call failed (any other value is a failure).
        code: the code that ran (PythonToolEnv).
        arguments: the parsed JSON arguments (ToolEnv).
        output: what the tool returned (stdout; a ToolEnv tool's formatted result).
        error: what went wrong (stderr; a ToolEnv error message).
        observation: the text the model was shown for this call.
    """

    name: str
    status: str
    code: str | None = None
    arguments: dict[str, Any] | None = None
    output: str | None = None
    error: str | None = None
    observation: str | None = None

    @property
    def failed(self) -> bool:
        """The call did not succeed (an exception, a timeout, a limit, a malformed call)."""
        return self.status != "ok"


@dataclass
class GradeRecord:
    """How the episode's answer was graded (the env's `envs.Grade`, as plain data).

    ``score`` is the grade's credit in [0, 1] (None in records saved before grades had one).
    """

    status: str
    extracted: str | None = None
    reference: str | None = None
    detail: str = ""
    score: float | None = None


@dataclass
class StepRecord:
    """One assistant turn as the environment saw it.

    Attributes:
        turn: 0-based turn index (the ``turn_index`` of the turn's tokens).
        action: the decoded text given to ``env.step``.
        tool_calls: the calls the env ran for this action, in order.
        observation: the messages appended after the turn (after observation truncation);
            empty when the episode ended here.
        finish_reason: the env's verdict when the episode ended at this step, else None.
        grade: the grade, on the step that ended a graded episode.
        error: the traceback when ``env.step`` raised (a ``sandbox_error`` episode).
        reward: the reward ``env.step`` returned for this turn (0.0 when it raised; None in
            records saved before per-turn rewards were kept).
        rewards: the env's rubric values for this turn (``info["rewards"]``), unweighted, by
            name; empty for an env without a rubric.
    """

    turn: int
    action: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    observation: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    grade: GradeRecord | None = None
    error: str | None = None
    reward: float | None = None
    rewards: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        values = dict(data)
        values["tool_calls"] = [ToolCallRecord(**c) for c in values.get("tool_calls") or []]
        if values.get("grade") is not None:
            values["grade"] = GradeRecord(**values["grade"])
        return cls(**values)


def tool_call_record(result: dict[str, Any]) -> ToolCallRecord:
    """Normalise one entry of an env's ``info["tool_results"]`` (PythonToolEnv or ToolEnv).

    This is the only place that knows the envs' result keys: PythonToolEnv's sandbox result
    (``code``, ``stdout``, ``stderr``, ``observation``, a sandbox status) and ToolEnv's
    (``arguments``, ``output`` or ``error``, status ``ok`` / ``error``).
    """
    status = str(result.get("status") or "error")
    output = result.get("stdout", result.get("output"))
    error = result.get("stderr", result.get("error"))
    observation = result.get("observation")
    if observation is None and "arguments" in result:  # ToolEnv shows output or the error
        observation = f"Error: {error}" if status == "error" else output
    arguments = result.get("arguments")
    return ToolCallRecord(
        name=str(result.get("name") or "tool"),
        status=status,
        code=result.get("code"),
        arguments=dict(arguments) if isinstance(arguments, dict) else None,
        output=None if output is None else str(output),
        error=None if error in (None, "") else str(error),
        observation=None if observation is None else str(observation),
    )


def grade_record(grade: Any) -> GradeRecord:
    """An `envs.Grade` (status, extracted, reference, detail, score) as a `GradeRecord`."""
    reference = getattr(grade, "reference", None)
    return GradeRecord(
        status=str(grade.status),
        extracted=grade.extracted,
        reference=None if reference is None else str(reference),
        detail=str(grade.detail or ""),
        score=float(grade.score),
    )


@dataclass
class Trajectory:
    """One episode, token-exact. See the module docstring for the meaning of every field."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    infer_logprobs: list[float]
    turn_index: list[int]
    reward: float = 0.0
    grade_status: str = "none"
    finish_reason: str = "answer"
    num_turns: int = 0
    num_tool_calls: int = 0
    num_void_turns: int = 0
    group_id: int = 0
    problem_id: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    """One record per env step (empty for trajectories saved before step records existed)."""
    policy_versions: list[int] = field(default_factory=list)
    """The policy version (optimiser updates applied to the engine's weights) that sampled each
    turn, one per turn; empty where the producer did not say (saved before versions existed).
    With asynchronous rollouts the trainer may be several versions ahead of these; it logs the
    difference as the staleness lag (docs/training.md)."""

    # ------------------------------------------------------------------ derived views
    @property
    def num_tool_errors(self) -> int:
        """Tool calls whose result was a failure (exception, timeout, limit, malformed call)."""
        return sum(call.failed for step in self.steps for call in step.tool_calls)

    @property
    def grade(self) -> GradeRecord | None:
        """The grade with its details (extracted answer, detail); None if never graded."""
        return next((s.grade for s in reversed(self.steps) if s.grade is not None), None)

    @property
    def turn_rewards(self) -> list[float]:
        """The reward of each turn, in order (what credit assignment distributes); 0.0 for a
        step recorded without one. Their sum is ``reward`` (checked by `validate`)."""
        return [0.0 if s.reward is None else float(s.reward) for s in self.steps]

    @property
    def reward_components(self) -> dict[str, float]:
        """The env's rubric values summed over the episode's steps, by name ({} without a
        rubric): ``reward == sum(weight * value)`` over them."""
        out: dict[str, float] = {}
        for step in self.steps:
            for name, value in step.rewards.items():
                out[name] = out.get(name, 0.0) + float(value)
        return out

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        """Every tool call of the episode, in order."""
        return [call for step in self.steps for call in step.tool_calls]

    @property
    def is_infra_failure(self) -> bool:
        """Our infrastructure failed (sandbox error or a grade that could not be verified).

        The learner excludes such episodes entirely (loss AND group statistics): their reward is
        not a real zero."""
        return self.finish_reason in INFRA_FAILURE_REASONS or self.grade_status == "unverifiable"

    @property
    def is_void(self) -> bool:
        """A void turn happened (neither code nor answer): masked out of the loss, but its reward
        still counts in the group statistics (SimpleTIR's filter)."""
        return self.num_void_turns > 0 or self.finish_reason == "void_turn"

    @property
    def num_generated_tokens(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def input_ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.response_ids)

    def turn_start(self, turn: int) -> int:
        """Index into ``response_ids`` of the first token sampled in ``turn``."""
        for i, t in enumerate(self.turn_index):
            if t == turn:
                return i
        raise IndexError(f"turn {turn} not in trajectory with {self.num_turns} turn(s)")

    def context_at_turn(self, turn: int) -> list[int]:
        """The exact ids the engine was given when it sampled ``turn``."""
        return list(self.prompt_ids) + list(self.response_ids[: self.turn_start(turn)])

    def sampled_ids(self, turn: int) -> list[int]:
        """The ids the engine sampled in ``turn``, verbatim."""
        return [
            tok
            for tok, m, t in zip(self.response_ids, self.loss_mask, self.turn_index, strict=True)
            if t == turn and m == 1
        ]

    # ------------------------------------------------------------------ invariants
    def validate(self) -> None:
        """Check every invariant; raise `TrajectoryError` naming the first broken one."""
        where = f"trajectory problem_id={self.problem_id!r} group_id={self.group_id!r}"

        def fail(invariant: str, detail: str) -> None:
            raise TrajectoryError(f"{where}: invariant '{invariant}' broken: {detail}")

        n = len(self.response_ids)
        for name in ("loss_mask", "infer_logprobs", "turn_index"):
            if len(getattr(self, name)) != n:
                fail(
                    "aligned lengths",
                    f"len({name})={len(getattr(self, name))} != len(response_ids)={n}",
                )
        if not self.prompt_ids:
            fail("non-empty prompt", "prompt_ids is empty")
        for name in ("prompt_ids", "response_ids"):
            for i, tok in enumerate(getattr(self, name)):
                if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                    fail("token ids are non-negative ints", f"{name}[{i}]={tok!r}")
        for i, m in enumerate(self.loss_mask):
            if m not in (0, 1) or isinstance(m, float | bool):
                fail("loss_mask is 0/1", f"loss_mask[{i}]={m!r}")
        for i, (m, lp) in enumerate(zip(self.loss_mask, self.infer_logprobs, strict=True)):
            if m == 0 and lp != 0.0:
                fail("infer_logprobs 0.0 where mask 0", f"infer_logprobs[{i}]={lp!r}, mask 0")
            if m == 1 and not (math.isfinite(lp) and lp <= 1e-6):
                fail("infer_logprobs are finite log-probs", f"infer_logprobs[{i}]={lp!r}")
        if self.grade_status not in GRADE_STATUSES:
            fail("grade_status known", f"{self.grade_status!r} not in {GRADE_STATUSES}")
        if self.finish_reason not in FINISH_REASONS:
            fail("finish_reason known", f"{self.finish_reason!r} not in {FINISH_REASONS}")
        if not math.isfinite(self.reward):
            fail("reward finite", f"reward={self.reward!r}")
        for name in ("num_turns", "num_tool_calls", "num_void_turns"):
            if getattr(self, name) < 0:
                fail("counts non-negative", f"{name}={getattr(self, name)}")
        if self.num_void_turns > self.num_turns:
            fail("void turns <= turns", f"{self.num_void_turns} > {self.num_turns}")
        if self.finish_reason == "void_turn" and self.num_void_turns == 0:
            fail("void finish counted", "finish_reason void_turn but num_void_turns=0")
        self._validate_turn_structure(fail)
        if self.policy_versions:
            versions = self.policy_versions
            if len(versions) != self.num_turns:
                fail(
                    "one policy version per turn",
                    f"{len(versions)} version(s), num_turns={self.num_turns}",
                )
            for i, v in enumerate(versions):
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    fail("policy versions are non-negative ints", f"policy_versions[{i}]={v!r}")
            if any(b < a for a, b in zip(versions, versions[1:], strict=False)):
                # Weights only move forward: a later turn is never sampled by an older policy.
                fail("policy versions never decrease", f"policy_versions={versions}")
        if self.steps:
            if [s.turn for s in self.steps] != list(range(len(self.steps))):
                fail("steps numbered 0, 1, ...", f"turns {[s.turn for s in self.steps]}")
            if len(self.steps) != self.num_turns:
                fail("one step per turn", f"{len(self.steps)} steps, num_turns={self.num_turns}")
            self._validate_step_rewards(fail)

    def _validate_step_rewards(self, fail: Any) -> None:
        """Per-turn rewards are finite floats, rubric values finite floats by name, a grade's
        score in [0, 1], and the turn rewards add up to ``reward`` when every step has one."""
        for step in self.steps:
            if step.reward is not None and (
                not isinstance(step.reward, float) or not math.isfinite(step.reward)
            ):
                fail("step rewards are finite floats", f"step {step.turn} reward={step.reward!r}")
            for name, value in step.rewards.items():
                if not isinstance(name, str) or not isinstance(value, float):
                    fail("rubric values are floats by name", f"step {step.turn} {name!r}={value!r}")
                if not math.isfinite(value):
                    fail("rubric values finite", f"step {step.turn} {name!r}={value!r}")
            score = None if step.grade is None else step.grade.score
            if score is not None and not 0.0 <= score <= 1.0:
                fail("grade score in [0, 1]", f"step {step.turn} score={score!r}")
        if all(step.reward is not None for step in self.steps):
            total = math.fsum(self.turn_rewards)
            if not math.isclose(total, self.reward, rel_tol=1e-9, abs_tol=1e-9):
                fail(
                    "reward is the sum of the turn rewards", f"{total!r} != reward={self.reward!r}"
                )

    def _validate_turn_structure(self, fail: Any) -> None:
        """Turns are numbered 0, 1, ... contiguously; each is its sampled tokens (mask 1, at
        least one) followed by the mask-0 template and observation tokens that answer it."""
        prev, in_tail, turns = None, False, 0
        for i, (t, m) in enumerate(zip(self.turn_index, self.loss_mask, strict=True)):
            if t != prev:
                if t != (0 if prev is None else prev + 1):
                    fail("turn_index starts at 0 and increases by 1", f"turn_index[{i}]={t}")
                if m != 1:
                    fail("a turn starts with a sampled token", f"position {i} (turn {t}) mask 0")
                prev, in_tail, turns = t, False, turns + 1
            if m == 0:
                in_tail = True
            elif in_tail:
                fail(
                    "sampled tokens precede template/observation tokens within a turn",
                    f"position {i} (turn {t}) has mask 1 after a mask-0 token",
                )
        if turns != self.num_turns:
            fail(
                "num_turns matches turn_index",
                f"{turns} turn(s) in turn_index, num_turns={self.num_turns}",
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``schema_version``); `from_dict` inverts it exactly."""
        out = {"schema_version": SCHEMA_VERSION}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "trajectory") -> Trajectory:
        """Build from `to_dict` output; unknown or missing fields raise naming ``where``."""
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise TrajectoryError(
                f"{where}: schema_version {version!r} is newer than this code ({SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrajectoryError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise TrajectoryError(f"{where}: missing field(s) {missing}")
        try:
            data["steps"] = [StepRecord.from_dict(step) for step in data.get("steps") or []]
        except (TypeError, AttributeError) as exc:
            raise TrajectoryError(f"{where}: malformed step records: {exc}") from exc
        return cls(**data)


def save_jsonl(path: str | os.PathLike[str], trajectories: Iterable[Trajectory]) -> Path:
    """Write one JSON object per line (floats round-trip exactly through ``repr``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for traj in trajectories:
            fh.write(json.dumps(traj.to_dict(), ensure_ascii=False, allow_nan=True) + "\n")
    return path


def load_jsonl(path: str | os.PathLike[str], *, validate: bool = True) -> list[Trajectory]:
    """Read `save_jsonl` output; errors name the file and line (and the broken field).

    The project's one JSONL policy (`alp_agents.common.read_jsonl`): a cut-off last line (a
    write interrupted mid-line) is dropped with a warning; a bad line anywhere else raises.
    """
    from alp_agents.common.jsonl import read_jsonl

    path = Path(path)
    try:
        rows = read_jsonl(path)
    except ValueError as exc:
        raise TrajectoryError(str(exc)) from exc
    numbers = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if line.strip()]  # fmt: skip
    out = []
    for lineno, data in zip(numbers, rows, strict=False):
        where = f"{path}:{lineno}"
        traj = Trajectory.from_dict(data, where=where)
        if validate:
            try:
                traj.validate()
            except TrajectoryError as exc:
                raise TrajectoryError(f"{where}: {exc}") from exc
        out.append(traj)
    return out


def collate(trajectories: Sequence[Trajectory], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch into ``(B, L)`` tensors over ``prompt_ids + response_ids``.

    Column ``j`` of every ``(B, L)`` tensor describes token ``j`` of ``input_ids``:

    * ``input_ids`` (long, padded with ``pad_token_id``), ``attention_mask`` (long, 1 on real
      tokens), ``loss_mask`` (float32, 1 on sampled tokens, 0 on prompt/observations/padding),
      ``infer_logprobs`` (float32, 0 off the mask), ``turn_index`` (long, -1 on prompt and
      padding), ``policy_version`` (long: the version that sampled the token's turn, -1 on
      prompt and padding and where the trajectory has no ``policy_versions``);
    * ``(B,)``: ``rewards`` (float32), ``group_ids`` (long: consecutive ints in order of first
      appearance of each trajectory's ``group_id``), ``response_start`` (= len(prompt_ids)),
      ``lengths`` (real tokens), ``is_void`` and ``is_infra_failure`` (bool; what the learner
      filters on: see `Trajectory.is_void` / `Trajectory.is_infra_failure`).

    ``loss_mask`` is the raw per-token mask; zeroing void or infrastructure-failed episodes is the
    learner's decision (they differ: void rewards still count in group statistics).
    """
    import torch

    if not trajectories:
        raise ValueError("collate() needs at least one trajectory")
    batch = len(trajectories)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    width = max(lengths)
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.float32)
    infer_logprobs = torch.zeros((batch, width), dtype=torch.float32)
    turn_index = torch.full((batch, width), -1, dtype=torch.long)
    policy_version = torch.full((batch, width), -1, dtype=torch.long)
    group_map: dict[Any, int] = {}
    for row, traj in enumerate(trajectories):
        p, n = len(traj.prompt_ids), lengths[row]
        input_ids[row, :n] = torch.tensor(traj.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if traj.response_ids:
            loss_mask[row, p:n] = torch.tensor(traj.loss_mask, dtype=torch.float32)
            infer_logprobs[row, p:n] = torch.tensor(traj.infer_logprobs, dtype=torch.float32)
            turn_index[row, p:n] = torch.tensor(traj.turn_index, dtype=torch.long)
            if traj.policy_versions:
                versions = torch.tensor(traj.policy_versions, dtype=torch.long)
                policy_version[row, p:n] = versions[turn_index[row, p:n]]
        group_map.setdefault(traj.group_id, len(group_map))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "infer_logprobs": infer_logprobs,
        "turn_index": turn_index,
        "policy_version": policy_version,
        "rewards": torch.tensor([float(t.reward) for t in trajectories], dtype=torch.float32),
        "group_ids": torch.tensor([group_map[t.group_id] for t in trajectories], dtype=torch.long),
        "response_start": torch.tensor([len(t.prompt_ids) for t in trajectories], dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "is_void": torch.tensor([t.is_void for t in trajectories], dtype=torch.bool),
        "is_infra_failure": torch.tensor(
            [t.is_infra_failure for t in trajectories], dtype=torch.bool
        ),
    }
