"""The trainer on a problem file with its own column names (``env.dataset`` +
``env.dataset_columns``): validated before any model loads, and trained and evaluated on."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from alp_agents.models import make_tiny_model
from alp_agents.reporting.runlog import read_metrics
from alp_agents.trainer import ALPTrainer, TrainConfig, TrainConfigError, validate_config

PARITY_ENV = "test/LengthParity-v0"  # registered in conftest.py
COLUMNS = {"id": "uid", "question": "prompt", "answer": "solution"}


def _rows(prefix: str, n: int) -> list[dict]:
    return [
        {"uid": f"{prefix}-{i}", "prompt": f"What is {i} + 2?", "solution": i + 2, "level": i % 3}
        for i in range(n)
    ]


@pytest.fixture
def parquet_dir(tmp_path) -> Path:
    """``train.parquet`` (8 problems) and ``test.parquet`` (3) with their own column names."""
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (the data extra)")
    import pyarrow.parquet

    for split, n in (("train", 8), ("test", 3)):
        pyarrow.parquet.write_table(
            pa.Table.from_pylist(_rows(split, n)), tmp_path / f"{split}.parquet"
        )
    return tmp_path


def _config(tmp_path: Path, dataset: str, **env) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.name = "tiny-llama"
    cfg.env.id = PARITY_ENV
    cfg.env.dataset = dataset
    cfg.env.max_turns = 1
    for key, value in env.items():
        setattr(cfg.env, key, value)
    cfg.rollout.prompts_per_step = 2
    cfg.rollout.group_size = 2
    cfg.rollout.max_tokens = 8
    cfg.algorithm.mini_batches = 1
    cfg.algorithm.micro_batch_size = 4
    cfg.eval.num_problems = 2
    cfg.eval.k = 1
    cfg.eval.every = 1
    cfg.steps = 1
    cfg.logging.run_dir = str(tmp_path / "run")
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    return cfg


def test_trains_and_evaluates_on_a_parquet_file_by_split(tmp_path, parquet_dir, tokenizer):
    cfg = _config(tmp_path, str(parquet_dir / "{split}.parquet"), dataset_columns=COLUMNS)
    model = make_tiny_model("llama", tokenizer=tokenizer, hidden_size=64, num_layers=2, seed=0)
    trainer = ALPTrainer(cfg, model=model, tokenizer=tokenizer)
    assert [p.id for p in trainer.train_problems] == [f"train-{i}" for i in range(8)]
    assert [p.id for p in trainer.eval_problems] == ["test-0", "test-1"]
    assert trainer.train_problems[3].answer == "5"
    assert trainer.train_problems[3].metadata == {"level": 0}
    rows = read_metrics(trainer.train().run_dir)
    assert any("reward/mean" in r and r["step"] == 1 for r in rows)
    assert any(any(k.startswith("eval/") for k in r) for r in rows)


def test_column_mistakes_fail_validation_with_the_file_and_column(tmp_path, parquet_dir):
    typo = _config(
        tmp_path,
        str(parquet_dir / "{split}.parquet"),
        dataset_columns={"question": "promt", "answer": "solution"},
    )
    with pytest.raises(TrainConfigError) as err:
        validate_config(typo)
    message = str(err.value)
    assert message.startswith("env.dataset=")
    assert "env.dataset_columns={'question': 'promt', 'answer': 'solution'}" in message
    assert "train.parquet: no column 'promt' (mapped to 'question')" in message
    assert "Did you mean 'prompt'?" in message

    named = _config(tmp_path, "arith", dataset_columns=COLUMNS)
    with pytest.raises(TrainConfigError, match=r"env\.dataset_columns=.*names no file"):
        validate_config(named)

    reversed_mapping = _config(
        tmp_path, str(parquet_dir / "{split}.parquet"), dataset_columns={"prompt": "question"}
    )
    with pytest.raises(TrainConfigError, match=r"did you mean \{'question': 'prompt'\}"):
        validate_config(reversed_mapping)


def test_a_mapping_is_not_applied_to_a_named_eval_dataset(tmp_path, parquet_dir):
    cfg = _config(
        tmp_path,
        str(parquet_dir / "train.parquet"),
        dataset_columns=COLUMNS,
        eval_dataset="arith",
        train_split=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eval_dataset is set: no same-file warning
        validate_config(cfg)


def test_one_file_for_both_splits_warns(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    cfg = _config(tmp_path, str(path))
    with pytest.warns(UserWarning, match=r"one file for both splits.*env\.eval_dataset"):
        validate_config(cfg)


def test_training_cli_reports_a_bad_column_with_status_2(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?", "solution": "2"}) + "\n")
    script = Path(__file__).resolve().parents[2] / "train" / "multi_turn.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            f"env.dataset={path}",
            "env.dataset_columns.question=promt",
            "env.dataset_columns.answer=solution",
            "eval.num_problems=0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "mine.jsonl:1: no column 'promt' (mapped to 'question')" in result.stderr
    assert "Did you mean 'prompt'?" in result.stderr
