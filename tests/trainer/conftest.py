"""Fixtures for the trainer tests.

A tiny random Llama never writes a correct ``\\boxed{}`` answer, so with the shipped graders
every reward would be 0, every GRPO advantage 0 and no test could see the optimiser, sigma or the
resume state at work. The learning tests therefore use a real (small) text environment registered
through the public API the way a user would write one: ``test/LengthParity-v0`` rewards an answer
whose character count is even, which a random model hits about half the time, so rewards vary
inside every group. The plumbing tests also run the shipped ``alp/PythonTool-v0`` on the real
sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import envs
from alp_agents.models import load_tokenizer
from envs.grading import Grade
from envs.math_env import MathEnv

PARITY_ENV = "test/LengthParity-v0"


class LengthParityEnv(MathEnv):
    """Single-turn: correct iff the assistant's answer has an even number of characters."""

    def grade_answer(self, text: str) -> Grade:
        even = len(text) % 2 == 0
        return Grade("correct" if even else "wrong", str(len(text)), "even", "length parity")


envs.register(PARITY_ENV, LengthParityEnv)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


def write_problems(path: Path, n: int, prefix: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            record = {"id": f"{prefix}-{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def problem_files(tmp_path_factory) -> tuple[str, str]:
    """(train, test) JSONL problem files."""
    root = tmp_path_factory.mktemp("problems")
    return (
        str(write_problems(root / "train.jsonl", 16, "tr")),
        str(write_problems(root / "test.jsonl", 4, "te")),
    )
