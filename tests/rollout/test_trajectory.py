"""Trajectory: validate() names every broken invariant, JSONL round trip, collate layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alp_agents.rollout.trajectory import (
    GradeRecord,
    StepRecord,
    ToolCallRecord,
    Trajectory,
    TrajectoryError,
    collate,
    load_jsonl,
    save_jsonl,
    tool_call_record,
)


def two_steps() -> list[StepRecord]:
    """The env's side of `two_turn`: a failing python call, then a graded answer."""
    return [
        StepRecord(
            turn=0,
            action="```python\n1/0\n```\n",
            tool_calls=[
                ToolCallRecord(
                    name="python", status="error", code="1/0", output="",
                    error="ZeroDivisionError: division by zero",
                    observation="```output\nZeroDivisionError: division by zero\n```",
                )
            ],
            observation=[{"role": "user", "content": "ZeroDivisionError: division by zero"}],
        ),
        StepRecord(
            turn=1,
            action="\\boxed{4}",
            finish_reason="answer",
            grade=GradeRecord(status="correct", extracted="4", reference="4", detail="exact"),
        ),
    ]  # fmt: skip


def two_turn(**changes) -> Trajectory:
    """Turn 0: 3 sampled + 4 template/observation tokens; turn 1: 2 sampled + 1 template."""
    fields = dict(
        prompt_ids=[1, 10, 11, 12],
        response_ids=[20, 21, 2, 198, 1, 30, 198, 40, 2, 198],
        loss_mask=[1, 1, 1, 0, 0, 0, 0, 1, 1, 0],
        infer_logprobs=[-0.25, -1.5, -0.0625, 0.0, 0.0, 0.0, 0.0, -2.0, -0.125, 0.0],
        turn_index=[0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        reward=1.0,
        grade_status="correct",
        finish_reason="answer",
        num_turns=2,
        num_tool_calls=1,
        group_id=3,
        problem_id="arith-train-1",
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        metrics={"turns": [{"generated": 3}, {"generated": 2}]},
    )
    fields.update(changes)
    return Trajectory(**fields)


def test_valid_trajectory_and_derived_views():
    t = two_turn()
    t.validate()
    assert t.context_at_turn(0) == t.prompt_ids
    assert t.context_at_turn(1) == t.prompt_ids + t.response_ids[:7]
    assert t.sampled_ids(1) == [40, 2]
    assert t.num_generated_tokens == 5
    assert not t.is_infra_failure and not t.is_void


@pytest.mark.parametrize(
    ("changes", "invariant"),
    [
        ({"loss_mask": [1] * 9}, "aligned lengths"),
        ({"prompt_ids": []}, "non-empty prompt"),
        ({"response_ids": [20, -1, 2, 198, 1, 30, 198, 40, 2, 198]}, "non-negative ints"),
        ({"loss_mask": [1, 1, 2, 0, 0, 0, 0, 1, 1, 0]}, "loss_mask is 0/1"),
        (
            {"infer_logprobs": [-0.25, -1.5, -0.0625, -0.5, 0.0, 0.0, 0.0, -2.0, -0.125, 0.0]},
            "infer_logprobs 0.0 where mask 0",
        ),
        (
            {"infer_logprobs": [-0.25, math.nan, -0.0625, 0, 0, 0, 0, -2.0, -0.125, 0]},
            "finite log-probs",
        ),
        ({"infer_logprobs": [0.5, -1.5, -0.0625, 0, 0, 0, 0, -2.0, -0.125, 0]}, "finite log-probs"),
        ({"grade_status": "maybe"}, "grade_status known"),
        ({"finish_reason": "timeout"}, "finish_reason known"),
        ({"reward": math.inf}, "reward finite"),
        ({"num_tool_calls": -1}, "counts non-negative"),
        ({"num_void_turns": 3}, "void turns <= turns"),
        ({"finish_reason": "void_turn"}, "void finish counted"),
        ({"turn_index": [0, 0, 0, 0, 0, 0, 0, 2, 2, 2]}, "increases by 1"),
        ({"turn_index": [1, 1, 1, 1, 1, 1, 1, 2, 2, 2]}, "starts at 0"),
        ({"turn_index": [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]}, "a turn starts with a sampled token"),
        (
            {
                "loss_mask": [1, 1, 1, 0, 1, 0, 0, 1, 1, 0],
                "infer_logprobs": [-0.25, -1.5, -0.0625, 0, -1.0, 0, 0, -2.0, -0.125, 0],
            },
            "sampled tokens precede",
        ),  # fmt: skip
        ({"num_turns": 3}, "num_turns matches"),
    ],
)
def test_validate_names_each_broken_invariant(changes, invariant):
    with pytest.raises(TrajectoryError, match=invariant):
        two_turn(**changes).validate()


def test_infra_failure_and_void_flags():
    assert two_turn(finish_reason="sandbox_error", grade_status="unverifiable").is_infra_failure
    assert two_turn(grade_status="unverifiable").is_infra_failure
    assert not two_turn(finish_reason="tool_error").is_infra_failure
    void = two_turn(finish_reason="void_turn", num_void_turns=1, reward=0.0, grade_status="wrong")
    void.validate()
    assert void.is_void and not void.is_infra_failure


def test_jsonl_round_trip_is_lossless(tmp_path):
    trajs = [
        two_turn(),
        two_turn(
            group_id=4,
            infer_logprobs=[-1 / 3, -1e-30, -17.123456789012345, 0, 0, 0, 0, -2.0, -0.1, 0.0],
            messages=[{"role": "user", "content": "ünïcode ```python\nprint(1)\n```"}],
            metrics={"nested": {"a": [1, 2.5, None]}, "flag": True},
            steps=two_steps(),
        ),
    ]
    path = save_jsonl(tmp_path / "sub" / "trajs.jsonl", trajs)
    loaded = load_jsonl(path)
    assert loaded == trajs
    assert [t.to_dict() for t in loaded] == [t.to_dict() for t in trajs]
    assert isinstance(loaded[1].steps[0].tool_calls[0], ToolCallRecord)
    assert loaded[1].num_tool_errors == 1 and loaded[1].grade.extracted == "4"


def test_old_jsonl_without_step_records_still_loads(tmp_path):
    old = two_turn().to_dict()
    del old["steps"]
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(old) + "\n")
    [loaded] = load_jsonl(path)
    assert loaded.steps == [] and loaded.num_tool_errors == 0 and loaded.grade is None


def test_step_records_are_validated_against_turns():
    two_turn(steps=two_steps()).validate()
    with pytest.raises(TrajectoryError, match="one step per turn"):
        two_turn(steps=two_steps()[:1]).validate()
    shuffled = two_steps()[::-1]
    with pytest.raises(TrajectoryError, match="steps numbered"):
        two_turn(steps=shuffled).validate()


def rewarded_steps() -> list[StepRecord]:
    """`two_steps` from an env with a rubric: tool_use 0.0 then, at the end, correctness 1.0,
    format 1.0 and length -0.5 (weights 1, 0.25, 0.5: 1.0 + 0.25 - 0.25 = 1.0)."""
    first, last = two_steps()
    first.reward, first.rewards = 0.0, {"tool_use": 0.0}
    last.reward = 1.0
    last.rewards = {"correctness": 1.0, "format": 1.0, "tool_use": 0.0, "length": -0.5}
    last.grade.score = 1.0
    return [first, last]


def test_per_turn_rewards_and_rubric_values_are_derived_from_the_steps():
    t = two_turn(steps=rewarded_steps())
    t.validate()
    assert t.turn_rewards == [0.0, 1.0]
    assert t.reward_components == {
        "tool_use": 0.0,
        "correctness": 1.0,
        "format": 1.0,
        "length": -0.5,
    }
    # Records saved before per-turn rewards (reward None) still validate; their turns read 0.0.
    old = two_turn(steps=two_steps())
    old.validate()
    assert old.turn_rewards == [0.0, 0.0] and old.reward_components == {}


def test_per_turn_rewards_are_validated():
    def with_steps(edit) -> Trajectory:
        steps = rewarded_steps()
        edit(steps)
        return two_turn(steps=steps)

    with pytest.raises(TrajectoryError, match="reward is the sum of the turn rewards"):
        two_turn(steps=rewarded_steps(), reward=0.5).validate()
    with pytest.raises(TrajectoryError, match="step rewards are finite floats"):
        with_steps(lambda s: setattr(s[0], "reward", math.nan)).validate()
    with pytest.raises(TrajectoryError, match="step rewards are finite floats"):
        with_steps(lambda s: setattr(s[0], "reward", "0")).validate()
    with pytest.raises(TrajectoryError, match="rubric values are floats by name"):
        with_steps(lambda s: s[0].rewards.update(tool_use=1)).validate()
    with pytest.raises(TrajectoryError, match="rubric values finite"):
        with_steps(lambda s: s[0].rewards.update(tool_use=math.inf)).validate()
    with pytest.raises(TrajectoryError, match=r"grade score in \[0, 1\]"):
        with_steps(lambda s: setattr(s[1].grade, "score", 1.5)).validate()


def test_rewarded_steps_round_trip_through_jsonl(tmp_path):
    t = two_turn(steps=rewarded_steps())
    [loaded] = load_jsonl(save_jsonl(tmp_path / "t.jsonl", [t]))
    assert loaded == t and loaded.steps[1].rewards["length"] == -0.5
    assert loaded.grade.score == 1.0


def test_tool_results_of_both_envs_become_the_same_record():
    python = tool_call_record(
        {"name": "python", "code": "1/0", "observation": "Error", "stdout": "",
         "stderr": "Traceback...\nZeroDivisionError", "status": "error", "exit_code": 1,
         "duration_s": 0.01, "truncated": False}
    )  # fmt: skip
    assert (python.status, python.code, python.error, python.failed) == (
        "error",
        "1/0",
        "Traceback...\nZeroDivisionError",
        True,
    )
    tool_ok = tool_call_record(
        {"name": "calc", "arguments": {"x": 1}, "raw": "{}", "status": "ok", "output": "2"}
    )
    assert (tool_ok.arguments, tool_ok.output, tool_ok.observation, tool_ok.failed) == (
        {"x": 1},
        "2",
        "2",
        False,
    )
    tool_bad = tool_call_record(
        {"name": "calc", "arguments": {}, "raw": "{}", "status": "error", "error": "bad"}
    )
    assert (tool_bad.error, tool_bad.observation, tool_bad.failed) == ("bad", "Error: bad", True)


def test_load_jsonl_errors_name_file_line_and_field(tmp_path):
    good = json.dumps(two_turn().to_dict())
    bad_field = dict(two_turn().to_dict(), colour="red")
    path = tmp_path / "t.jsonl"
    path.write_text(good + "\n" + json.dumps(bad_field) + "\n")
    with pytest.raises(TrajectoryError, match=r"t\.jsonl:2: unknown field\(s\) \['colour'\]"):
        load_jsonl(path)
    broken = dict(two_turn().to_dict(), finish_reason="bogus")
    path.write_text(good + "\n\n" + json.dumps(broken) + "\n")
    with pytest.raises(TrajectoryError, match=r"t\.jsonl:3: .*finish_reason known"):
        load_jsonl(path)
    path.write_text("{not json\n" + good + "\n")
    with pytest.raises(TrajectoryError, match=r"t\.jsonl:1: not a JSON object"):
        load_jsonl(path)
    # The one JSONL policy: a cut-off last line is an interrupted write, dropped with a warning.
    path.write_text(good + "\n" + good[:30])
    with pytest.warns(RuntimeWarning, match=r"t\.jsonl:2: dropped an incomplete last line"):
        assert len(load_jsonl(path)) == 1
    newer = dict(two_turn().to_dict(), schema_version=99)
    path.write_text(json.dumps(newer) + "\n")
    with pytest.raises(TrajectoryError, match="schema_version 99"):
        load_jsonl(path)


def test_collate_pads_right_and_aligns_columns_with_tokens():
    a = two_turn()
    b = Trajectory(
        prompt_ids=[1, 5],
        response_ids=[6, 2],
        loss_mask=[1, 1],
        infer_logprobs=[-0.5, -0.75],
        turn_index=[0, 0],
        reward=0.0,
        grade_status="wrong",
        finish_reason="void_turn",
        num_turns=1,
        num_void_turns=1,
        group_id="other-group",
    )
    c = two_turn(finish_reason="sandbox_error", grade_status="unverifiable", reward=0.0)
    batch = collate([a, b, c], pad_token_id=0)
    width = len(a.prompt_ids) + len(a.response_ids)
    assert batch["input_ids"].shape == (3, width)
    for key in ("attention_mask", "loss_mask", "infer_logprobs", "turn_index"):
        assert batch[key].shape == (3, width), key
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    assert batch["input_ids"][0].tolist() == a.input_ids
    assert batch["input_ids"][1].tolist() == [1, 5, 6, 2] + [0] * (width - 4)
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * (width - 4)
    p = len(a.prompt_ids)
    assert batch["loss_mask"][0].tolist() == [0.0] * p + [float(m) for m in a.loss_mask]
    assert batch["infer_logprobs"][0, p:].tolist() == a.infer_logprobs
    assert batch["turn_index"][0].tolist() == [-1] * p + a.turn_index
    assert batch["turn_index"][1].tolist() == [-1, -1, 0, 0] + [-1] * (width - 4)
    assert batch["loss_mask"][1, 4:].sum() == 0 and batch["infer_logprobs"][1, 4:].sum() == 0
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.0]
    assert batch["group_ids"].tolist() == [0, 1, 0]  # group 3, "other-group", group 3
    assert batch["response_start"].tolist() == [4, 2, 4]
    assert batch["lengths"].tolist() == [width, 4, width]
    assert batch["is_void"].tolist() == [False, True, False]
    assert batch["is_infra_failure"].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_token_id=0)


@pytest.mark.parametrize(
    ("versions", "invariant"),
    [
        ([3], "one policy version per turn"),
        ([3, 4, 5], "one policy version per turn"),
        ([3, -1], "non-negative ints"),
        ([3, 4.0], "non-negative ints"),
        ([3, True], "non-negative ints"),
        ([4, 3], "never decrease"),
    ],
)
def test_policy_versions_are_validated(versions, invariant):
    two_turn(policy_versions=[3, 3]).validate()
    two_turn(policy_versions=[3, 5]).validate()  # weights may move between turns
    with pytest.raises(TrajectoryError, match=invariant):
        two_turn(policy_versions=versions).validate()


def test_policy_versions_round_trip_and_collate_per_token(tmp_path):
    """Each response token carries its turn's version; a schema-1 file (no versions) loads
    with none, and its tokens are -1 (unknown) in the batch."""
    a = two_turn(policy_versions=[7, 9])
    old = two_turn().to_dict()
    del old["policy_versions"]
    old["schema_version"] = 1
    path = save_jsonl(tmp_path / "t.jsonl", [a])
    with path.open("a") as fh:
        fh.write(json.dumps(old) + "\n")
    loaded, legacy = load_jsonl(path)
    assert loaded == a and legacy.policy_versions == []
    batch = collate([a, legacy], pad_token_id=0)
    p = len(a.prompt_ids)
    assert batch["policy_version"][0].tolist() == [-1] * p + [7] * 7 + [9] * 3
    assert batch["policy_version"][1].tolist() == [-1] * (p + 10)
