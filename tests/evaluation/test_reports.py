"""Report files and the samples.jsonl reader, from hand-made records (no model)."""

from __future__ import annotations

import json

import pytest

from alp_agents.evaluation import EvalConfig, EvaluationError, load_records, write_reports
from alp_agents.evaluation.runner import _result_from_records


def _records():
    out = []
    for p, grades in {"p0": ["correct", "wrong"], "p1": ["wrong", "unverifiable"]}.items():
        for i, g in enumerate(grades):
            out.append({
                "problem_id": p, "sample_index": i, "grade": g, "extracted_answer": str(i),
                "source": "arith", "level": None, "num_turns": 2, "num_tool_calls": 1,
                "num_tool_errors": 0, "num_void_turns": 0, "response_tokens": 10,
                "finish_reason": "answer",
            })  # fmt: skip
    return out


def test_reports_written_and_consistent(tmp_path):
    result = _result_from_records(
        _records(), n=2, k=2, confidence=0.9, bootstrap_resamples=50, seed=0
    )
    cfg = EvalConfig(dataset="arith", split="test", k=2)
    files = write_reports(tmp_path, result, cfg, elapsed_s=1.5)
    report = json.loads(files["report_json"].read_text())
    assert report["metrics"]["pass@1"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)
    assert report["metrics"]["pass@2"] == pytest.approx(1.0)  # p1 has one verifiable sample
    assert report["metrics"]["tool_error_rate"] == 0.0
    assert report["intervals"]["pass@2"] == [None, None]  # one problem scored: no interval
    assert report["config"]["dataset"] == "arith"
    md = files["report_md"].read_text()
    assert "| pass@1 | 25.0 |" in md
    assert "unverifiable samples (not counted as wrong): 1" in md
    assert "90% CI" in md and "## By source" in md
    png = files["pass_at_k_png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "## Rewards" not in md  # no rubric, no table


def test_report_lists_rubric_rewards(tmp_path):
    records = _records()
    for record, value in zip(records, [1.0, 0.0, 0.0, 0.0], strict=True):
        record.update(reward=value + 0.25, rewards={"correctness": value, "format": 1.0})
    result = _result_from_records(records, n=2, k=2, confidence=0.9, bootstrap_resamples=50, seed=0)
    md = write_reports(tmp_path, result, EvalConfig(dataset="arith", split="test", k=2))[
        "report_md"
    ].read_text()
    assert "## Rewards (rubric)" in md
    assert "| mean | 0.500 |" in md  # (1.25 + 3 * 0.25) / 4
    assert "| correctness | 0.250 |" in md and "| format | 1.000 |" in md


def test_load_records_drops_a_torn_last_line_and_repairs_the_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    good = [json.dumps(r) for r in _records()[:2]]
    path.write_text(good[0] + "\n" + good[1] + "\n" + good[1][:17])
    records = load_records(path)
    assert [r["sample_index"] for r in records] == [0, 1]
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("\n")
    path.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(EvaluationError, match=r"samples.jsonl:2: not a JSON object"):
        load_records(path)
