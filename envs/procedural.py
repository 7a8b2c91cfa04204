"""Procedural problem generators with seeded, disjoint train and test splits.

``arith`` is the task where the Python tool clearly helps: multiplying 3-4 digit numbers is
hard for a small model "in its head" and trivial with ``print(a * b)``. The default 135M model
writes such a block for many questions when the prompt carries a one-shot example, so its
reward with the tool is above zero but far from one: room to learn within minutes of CPU
training. Four difficulty levels:

- ``arith_small``: ``a op b`` with operands 1-20 and op in ``+ -`` (800 distinct questions:
  600 train / 120 test by default); the one the 135M model can do without a tool, for the
  single-turn default;
- ``arith_easy``: ``a op b`` with two-digit operands and op in ``+ - *``;
- ``arith`` (``level="medium"``): ``a * b`` with a 3-4 digit and a 3 digit operand;
- ``arith_hard``: ``a * b + c`` / ``a * b - c`` with 3-4 digit operands.

Splits are disjoint by construction: a problem belongs to ``test`` iff a hash of its
normalised question falls in the test bucket (1 in 5), so no seed, size or level can leak a
test question into ``train``. Within a split the sequence is seeded and deterministic.

    >>> from envs import load_dataset
    >>> p = load_dataset("arith", split="train", n=3)
    >>> [x.id for x in p]
    ['arith-train-0', 'arith-train-1', 'arith-train-2']
    >>> p == load_dataset("arith", split="train", n=3)
    True
"""

from __future__ import annotations

import hashlib
import random

from .datasets import DatasetError, Problem, normalize_question, register_generator

LEVELS = ("small", "easy", "medium", "hard")
SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 5000, "test": 500}
SMALL_SIZES = {"train": 600, "test": 120}  # of ~640 / ~160 distinct questions per split
_TEST_BUCKETS = 5  # one in five questions is test-only


def split_of(question: str) -> str:
    """The split a question belongs to (a pure function of its normalised text)."""
    digest = hashlib.sha256(normalize_question(question).encode()).digest()
    return "test" if digest[0] % _TEST_BUCKETS == 0 else "train"


def _expression(rng: random.Random, level: str) -> tuple[str, int]:
    """One random expression at ``level`` and its exact value."""
    if level == "small":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-")
        return f"{a} {op} {b}", a + b if op == "+" else a - b
    if level == "easy":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a} {op} {b}", value
    if level == "medium":
        a, b = rng.randint(100, 9999), rng.randint(100, 999)
        return f"{a} * {b}", a * b
    if level == "hard":
        a, b, c = rng.randint(100, 9999), rng.randint(100, 9999), rng.randint(100, 9999)
        if rng.random() < 0.5:
            return f"{a} * {b} + {c}", a * b + c
        return f"{a} * {b} - {c}", a * b - c
    raise DatasetError(f"arith level must be one of {LEVELS}, got {level!r}")


def arith(
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    level: str = "medium",
    name: str | None = None,
) -> list[Problem]:
    """Generate ``n`` arithmetic problems of ``split`` ("train" or "test").

    Args:
        split: "train" or "test" (disjoint, see the module docstring).
        n: number of problems (default 5000 for train, 500 for test).
        seed: changes the sample within the split, never the split membership.
        level: "small", "easy", "medium" (default) or "hard".
        name: dataset name used in ids and ``source`` (default ``arith`` / ``arith_<level>``).
    """
    if split not in SPLITS:
        raise DatasetError(f"arith has splits {SPLITS}, got split={split!r}")
    if level not in LEVELS:
        raise DatasetError(f"arith level must be one of {LEVELS}, got {level!r}")
    sizes = SMALL_SIZES if level == "small" else DEFAULT_SIZES
    n = sizes[split] if n is None else int(n)
    if n < 0:
        raise DatasetError(f"arith n must be >= 0, got {n}")
    name = name or ("arith" if level == "medium" else f"arith_{level}")
    rng = random.Random(f"{name}:{level}:{split}:{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 50 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise DatasetError(
                f"{name}: could not draw {n} distinct {split} problems at level {level!r} "
                f"(got {len(problems)}); ask for fewer"
            )
        expression, value = _expression(rng, level)
        question = f"What is {expression}?"
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        problems.append(
            Problem(
                id=f"{name}-{split}-{len(problems)}",
                question=question,
                answer=str(value),
                source=name,
                metadata={"level": level, "expression": expression, "seed": seed},
            )
        )
    return problems


def _level_generator(level: str, name: str):
    def generate(split: str = "train", **options) -> list[Problem]:
        options.setdefault("level", level)
        options.setdefault("name", name)
        return arith(split=split, **options)

    generate.__doc__ = f"``arith`` at level {level!r} (see :func:`arith`)."
    return generate


register_generator("arith", _level_generator("medium", "arith"))
register_generator("arith_small", _level_generator("small", "arith_small"))
register_generator("arith_easy", _level_generator("easy", "arith_easy"))
register_generator("arith_hard", _level_generator("hard", "arith_hard"))
