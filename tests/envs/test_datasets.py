"""Datasets: bundled files match their SOURCES.md, bad input names file/line/id, arith splits."""

from __future__ import annotations

import json
import re

import pytest

import envs
from envs.datasets import BUNDLED, DATA_DIR


def _counts_from_sources() -> dict[str, int]:
    """file -> count, read from the provenance table in SOURCES.md (the data's own record)."""
    text = (DATA_DIR / "SOURCES.md").read_text()
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\| (\w+\.jsonl) \| (\d+) \|", text, re.M)
    }


def test_every_bundled_dataset_loads_with_the_count_its_sources_record():
    counts = _counts_from_sources()
    assert set(counts) == set(BUNDLED.values())
    for name, filename in BUNDLED.items():
        problems = envs.load_dataset(name)
        assert len(problems) == counts[filename], name
        assert len({p.id for p in problems}) == len(problems)
        assert all(p.question.strip() and p.answer.strip() and p.source for p in problems)


def test_names_splits_and_aliases():
    assert envs.load_dataset("gsm8k", split="test") == envs.load_dataset("gsm8k_test")
    assert envs.load_dataset("gsm8k_train", split="train")[0].id == "gsm8k-train-0"
    assert envs.load_dataset("simplelr_math_35_train") == envs.load_dataset("simplelr_math35_train")
    math500 = envs.load_dataset("math500", split="test")
    assert math500[0].metadata["level"] == 2 and "level" not in math500[0].to_dict().get(
        "metadata", {}
    )
    with pytest.raises(envs.DatasetError, match="'test' split"):
        envs.load_dataset("gsm8k_test", split="train")
    with pytest.raises(envs.DatasetError, match="splits \\['test', 'train'\\]"):
        envs.load_dataset("gsm8k")


def test_unknown_name_lists_close_matches():
    with pytest.raises(envs.DatasetError, match="Did you mean 'math500'"):
        envs.load_dataset("math50")


def test_loaded_lists_are_independent_copies():
    a = envs.load_dataset("aime24")
    a.clear()
    assert len(envs.load_dataset("aime24")) == 30


def test_user_jsonl_defaults_and_metadata(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": "1+1?", "answer": 2, "difficulty": "easy"}\n\n{"id": "b", "question": "q", "answer": "x"}\n'
    )
    first, second = envs.load_dataset(path)
    assert (first.id, first.answer, first.source, first.metadata) == (
        "mine-1",
        "2",
        "mine",
        {"difficulty": "easy"},
    )
    assert second.id == "b"
    round_trip = envs.load_dataset(envs.write_jsonl([first, second], tmp_path / "copy.jsonl"))
    assert [p.to_dict() for p in round_trip] == [first.to_dict(), second.to_dict()]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "p1", "question": "What?", "answer": "1"', r"bad\.jsonl:2: invalid JSON"),
        ('["not", "an", "object"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"id": "p7", "question": "What?"}', r"bad\.jsonl:2: problem 'p7' has no 'answer'"),
        ('{"id": "p8", "question": "What?", "answer": "  "}', r"problem 'p8' has no 'answer'"),
        ('{"id": "p9", "answer": "3"}', r"bad\.jsonl:2: problem 'p9' has no 'question'"),
        (
            '{"id": "p0", "question": "again", "answer": "3"}',
            r"bad\.jsonl:2: duplicate id 'p0' \(first on line 1\)",
        ),
    ],
)
def test_bad_jsonl_names_file_line_and_id(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "p0", "question": "ok", "answer": "1"}) + "\n" + line + "\n")
    with pytest.raises(envs.DatasetError, match=message):
        envs.load_dataset(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(envs.DatasetError, match="not found"):
        envs.load_dataset(tmp_path / "nope.jsonl")


def _value(expression: str) -> int:
    """Evaluate 'a op b [op c]' (+, -, * with * first) without eval()."""
    tokens = expression.split()
    terms, signs = [int(tokens[0])], []
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "*":
            terms[-1] *= int(number)
        else:
            signs.append(op)
            terms.append(int(number))
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        total = total + term if sign == "+" else total - term
    return total


@pytest.mark.parametrize("name", ["arith_easy", "arith", "arith_hard"])
def test_arith_splits_are_disjoint_deterministic_and_correct(name):
    train = envs.load_dataset(name, split="train", n=2000)
    test = envs.load_dataset(name, split="test")
    assert len(test) == 500 and len(train) == 2000
    assert envs.dataset_overlap(train, test).n_overlap == 0
    assert train == envs.load_dataset(name, split="train", n=2000)  # same seed, same problems
    other_seed = envs.load_dataset(name, split="train", n=2000, seed=1)
    assert other_seed != train and envs.dataset_overlap(other_seed, test).n_overlap == 0
    for problem in train[:200] + test[:200]:
        assert problem.answer == str(_value(problem.metadata["expression"]))
    assert test[17].id == f"{name}-test-17"
    assert len({p.question for p in train}) == len(train)


def test_arith_small_covers_its_question_space_without_leaking():
    train = envs.load_dataset("arith_small", split="train")
    test = envs.load_dataset("arith_small", split="test")
    assert (len(train), len(test)) == (600, 120)  # of ~640 / ~160 distinct questions
    assert envs.dataset_overlap(train, test).n_overlap == 0
    assert len({p.question for p in train + test}) == 720
    for problem in train + test:
        a, op, b = problem.metadata["expression"].split()
        assert 1 <= int(a) <= 20 and 1 <= int(b) <= 20 and op in "+-"
        assert problem.answer == str(_value(problem.metadata["expression"]))
    with pytest.raises(envs.DatasetError, match="could not draw"):
        envs.load_dataset("arith_small", split="test", n=400)  # more than exist


def test_arith_levels_differ_in_difficulty():
    digits = {
        name: max(
            len(t)
            for p in envs.load_dataset(name, split="test", n=50)
            for t in p.metadata["expression"].split()
        )
        for name in ("arith_easy", "arith", "arith_hard")
    }
    assert digits["arith_easy"] == 2 and digits["arith"] >= 3 and digits["arith_hard"] >= 4


def test_arith_bad_options():
    with pytest.raises(envs.DatasetError, match="splits"):
        envs.load_dataset("arith", split="validation")
    with pytest.raises(envs.DatasetError, match="level"):
        envs.load_dataset("arith", level="impossible")
    with pytest.raises(envs.DatasetError, match="takes no options"):
        envs.load_dataset("math500", n=3)


def test_overlap_finds_reworded_whitespace_and_case():
    train = [envs.Problem("t1", "What is  2+2?", "4"), envs.Problem("t2", "Other", "1")]
    test = [envs.Problem("e1", "what is 2 + 2?", "4"), envs.Problem("e2", "New one", "5")]
    report = envs.dataset_overlap(train, test)
    assert report.pairs == (("t1", "e1"),) and report.fraction == 0.5
    assert "1/2 test problems" in str(report)


def test_bundled_gsm8k_train_and_test_do_not_overlap():
    report = envs.dataset_overlap(envs.load_dataset("gsm8k_train"), envs.load_dataset("gsm8k_test"))
    assert report.n_train == 7473 and report.n_overlap == 0
