"""Evaluation on a problem file with its own column names (``dataset`` + ``dataset_columns``),
and the contamination guard reading a trained run's column mapping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alp_agents.evaluation import EvaluationError, evaluate

ROOT = Path(__file__).resolve().parents[2]
TINY = {"max_turns": 1, "max_tokens": 8, "progress": False, "k": 1}
COLUMNS = {"question": "prompt", "answer": "solution"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama + the SmolLM2 tokenizer inside a run folder, as the trainer saves."""
    from alp_agents.models import load_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("run") / "final"
    tiny_llama().save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def _problem_file(path: Path, n: int) -> Path:
    rows = [{"prompt": f"What is {i} + 5?", "solution": i + 5, "topic": "add"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluates_a_file_through_its_column_mapping(tiny_checkpoint, tmp_path):
    data = _problem_file(tmp_path / "sums.jsonl", 3)
    report = evaluate(
        model=str(tiny_checkpoint),
        dataset=str(data),
        dataset_columns=COLUMNS,
        num_problems=2,
        run_dir=tmp_path / "r",
        **TINY,
    )
    records = [json.loads(line) for line in report.files["samples"].read_text().splitlines()]
    assert [(r["problem_id"], r["question"]) for r in records] == [
        ("sums-1", "What is 0 + 5?"),
        ("sums-2", "What is 1 + 5?"),
    ]


def test_mapping_mistakes_fail_before_a_model_loads(tmp_path):
    data = _problem_file(tmp_path / "sums.jsonl", 2)
    with pytest.raises(EvaluationError, match=r"sums\.jsonl:1: no column 'promt'.*'prompt'"):
        evaluate(
            dataset=str(data),
            dataset_columns={"question": "promt", "answer": "solution"},
            run_dir=tmp_path / "r",
            **TINY,
        )
    with pytest.raises(EvaluationError, match=r"dataset_columns=.*dataset='math500' names no file"):
        evaluate(dataset="math500", dataset_columns=COLUMNS, run_dir=tmp_path / "r", **TINY)
    assert not (tmp_path / "r").exists()


def test_contamination_guard_uses_the_runs_column_mapping(tiny_checkpoint, tmp_path):
    data = _problem_file(tmp_path / "sums.jsonl", 2)
    env = {"dataset": str(data), "train_split": None, "dataset_columns": COLUMNS}
    config = tiny_checkpoint.parent / "config.yaml"
    config.write_text(yaml.safe_dump({"env": env}))
    try:
        with pytest.warns(UserWarning, match=r"contamination: 1/1 test problems"):
            evaluate(
                model=str(tiny_checkpoint),
                dataset=str(data),
                dataset_columns=COLUMNS,
                num_problems=1,
                run_dir=tmp_path / "r",
                **TINY,
            )
    finally:
        config.unlink()


def test_cli_takes_the_mapping_as_dotted_keys(tmp_path):
    data = _problem_file(tmp_path / "sums.jsonl", 2)
    script = [sys.executable, str(ROOT / "train" / "evaluate.py"), "--dataset", str(data)]
    bad = subprocess.run(
        [*script, "dataset_columns.question=promt", "dataset_columns.answer=solution"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "no column 'promt' (mapped to 'question')" in bad.stderr
    assert "Did you mean 'prompt'?" in bad.stderr
