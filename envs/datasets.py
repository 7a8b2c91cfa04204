"""Problem sets: bundled JSONL benchmarks, user JSONL files and procedural generators.

Every loader returns ``list[Problem]``. A JSONL problem file has one JSON object per line with
``question`` and ``answer`` (``id`` and ``source`` are filled in from the file name and line
number when absent); any other fields go to ``Problem.metadata``. Bad input fails loudly with
the file and line: a silent skip would quietly change what a benchmark number means.

    >>> import envs
    >>> problems = envs.load_dataset("aime24")
    >>> len(problems), problems[0].id
    (30, 'aime2024-I-1')
    >>> envs.load_dataset("gsm8k", split="test")[0].id
    'gsm8k-test-0'
    >>> train = envs.load_dataset("arith", split="train")
    >>> test = envs.load_dataset("arith", split="test")
    >>> envs.dataset_overlap(train, test).n_overlap
    0

Bundled data and its provenance and licences: ``envs/data/SOURCES.md``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .text import did_you_mean

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Bundled dataset name -> file in ``envs/data``.
BUNDLED: dict[str, str] = {
    "gsm8k_train": "gsm8k_train.jsonl",
    "gsm8k_test": "gsm8k_test.jsonl",
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
    "simplelr_math35_train": "simplelr_math_35_train.jsonl",
    "aime_1983_2023_train": "aime_1983_2023_train.jsonl",
}
# Other spellings people will type (the file name's own spelling among them).
_ALIASES: dict[str, str] = {
    "simplelr_math_35_train": "simplelr_math35_train",
    "math_500": "math500",
    "aime_2024": "aime24",
    "aime2024": "aime24",
    "amc_2023": "amc23",
    "amc2023": "amc23",
    "olympiad_bench": "olympiadbench",
}


class DatasetError(ValueError):
    """A problem file or dataset name is invalid; the message names the file, line and field."""


@dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
        id: unique within its dataset (used to pin a problem: ``reset(options={"problem_id": id})``).
        question: the problem text shown to the model.
        answer: the reference answer (LaTeX or plain text), graded with :func:`envs.grade`.
        source: the dataset it came from (``"gsm8k"``, ``"math500"``, ``"arith"``...).
        metadata: every other field of the record (level, subject, url...).
    """

    id: str
    question: str
    answer: str
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record (the inverse of reading a line)."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            **self.metadata,
        }


# ----------------------------------------------------------------------------- procedural registry

#: name -> generator(split, **options) -> list[Problem]; filled by :func:`register_generator`.
_GENERATORS: dict[str, Callable[..., list[Problem]]] = {}


def register_generator(name: str, generator: Callable[..., list[Problem]]) -> None:
    """Make ``load_dataset(name, split=..., **options)`` call ``generator(split=..., **options)``.

    A generator must be deterministic given its options (seeded) and return disjoint problems
    for different splits (check with :func:`dataset_overlap`).
    """
    _GENERATORS[name] = generator


#: Entry-point group through which installed packages contribute dataset generators
#: (name = dataset name, value = ``"module:generator"``), found when a name is first asked for.
DATASET_ENTRY_POINT_GROUP = "alp_agents.datasets"


def _generator_from_plugins(name: str) -> Callable[..., list[Problem]] | None:
    from importlib import metadata

    for entry_point in metadata.entry_points(group=DATASET_ENTRY_POINT_GROUP):
        if entry_point.name == name:
            generator = entry_point.load()
            _GENERATORS.setdefault(name, generator)
            return _GENERATORS[name]
    return None


def available_datasets() -> list[str]:
    """Every name :func:`load_dataset` accepts (besides file paths)."""
    groups = sorted(
        {name.rsplit("_", 1)[0] for name in BUNDLED if name.endswith(("_train", "_test"))}
    )
    return sorted(set(BUNDLED) | set(_GENERATORS) | set(groups))


# ----------------------------------------------------------------------------- loading

_cache: dict[tuple[str, float, int], tuple[Problem, ...]] = {}
_cache_lock = threading.Lock()


def load_dataset(
    name_or_path: str | os.PathLike, split: str | None = None, **options: Any
) -> list[Problem]:
    """Load a problem set by bundled name, procedural generator name, or JSONL path.

    Args:
        name_or_path: a bundled name (``gsm8k_train``, ``gsm8k_test``, ``math500``, ``aime24``,
            ``amc23``, ``olympiadbench``, ``simplelr_math35_train``, ``aime_1983_2023_train``),
            a group with a split (``"gsm8k"`` + ``split="test"``), a procedural generator
            (``"arith"``, ``"arith_small"``, ``"arith_easy"``, ``"arith_hard"``; ``split`` is ``"train"`` or
            ``"test"``, other keyword options go to the generator, e.g. ``n=500, seed=1``), or
            the path of a JSONL file.
        split: see above; for a bundled name that already names its split it must match or be None.

    Returns:
        A new list (files are parsed once per process and cached; Problems are immutable).

    Raises:
        DatasetError: unknown name (with close matches), bad JSON (file:line), a record
            without question/answer (naming its id), duplicate ids, or a split that does not exist.
    """
    name = os.fspath(name_or_path)
    key = _ALIASES.get(name, name)
    generator = _GENERATORS.get(key)
    if generator is None and key not in BUNDLED and not name.endswith((".jsonl", ".json")):
        generator = _generator_from_plugins(key)
    if generator is not None:
        return _generated(key, generator, split or "train", options)
    if options:
        raise DatasetError(f"dataset {name!r} takes no options, got {sorted(options)}")
    if key in BUNDLED:
        own_split = key.rsplit("_", 1)[1] if key.endswith(("_train", "_test")) else "test"
        if split is not None and split != own_split:
            raise DatasetError(f"dataset {name!r} is the {own_split!r} split; got split={split!r}")
        return read_jsonl(DATA_DIR / BUNDLED[key])
    if split is not None and f"{key}_{split}" in BUNDLED:
        return read_jsonl(DATA_DIR / BUNDLED[f"{key}_{split}"])
    path = Path(name).expanduser()
    if path.suffix in (".jsonl", ".json") or os.sep in name or path.exists():
        if not path.is_file():
            raise DatasetError(f"problem file not found: {path}")
        return read_jsonl(path)
    hint = did_you_mean(key, available_datasets(), cutoff=0.5)
    splits = sorted(s.rsplit("_", 1)[1] for s in BUNDLED if s.startswith(key + "_"))
    if splits:
        hint = f" Dataset {key!r} has splits {splits}; pass split=..." + hint
    raise DatasetError(
        f"unknown dataset {name!r}.{hint} Known: {', '.join(available_datasets())}, "
        "or the path of a .jsonl file."
    )


_generated_cache: dict[tuple, tuple[Problem, ...]] = {}


def _generated(
    key: str, generator: Callable[..., list[Problem]], split: str, options: dict
) -> list[Problem]:
    """A generator's problems, memoised per (name, split, options): one env per episode must not
    regenerate thousands of problems each time (generators are deterministic by contract)."""
    try:
        cache_key = (key, id(generator), split, tuple(sorted(options.items())))
        hash(cache_key)
    except TypeError:  # unhashable options: no caching
        return list(generator(split=split, **options))
    with _cache_lock:
        cached = _generated_cache.get(cache_key)
    if cached is None:
        cached = tuple(generator(split=split, **options))
        with _cache_lock:
            _generated_cache[cache_key] = cached
    return list(cached)


def read_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Parse and validate a JSONL problem file (cached by path and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        cached = tuple(_parse_jsonl(path))
        with _cache_lock:
            _cache[key] = cached
    return list(cached)


def _parse_jsonl(path: Path) -> Iterable[Problem]:
    default_source = path.stem
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            problem = problem_from_record(
                record,
                where=where,
                default_id=f"{default_source}-{lineno}",
                default_source=default_source,
            )
            if problem.id in seen:
                raise DatasetError(
                    f"{where}: duplicate id {problem.id!r} (first on line {seen[problem.id]})"
                )
            seen[problem.id] = lineno
            yield problem


def problem_from_record(
    record: dict[str, Any],
    *,
    where: str = "record",
    default_id: str | None = None,
    default_source: str = "",
) -> Problem:
    """Validate one record (dict) and build a Problem; errors name ``where`` and the id."""
    record = dict(record)
    pid = record.pop("id", default_id)
    if pid is None or (isinstance(pid, str) and not pid.strip()):
        raise DatasetError(f"{where}: record has no 'id'")
    pid = str(pid)
    question = record.pop("question", None)
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: problem {pid!r} has no 'question' (a non-empty string)")
    answer = record.pop("answer", None)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DatasetError(f"{where}: problem {pid!r} has no 'answer' (a non-empty string)")
    source = record.pop("source", None) or default_source
    return Problem(
        id=pid, question=question, answer=answer.strip(), source=str(source), metadata=record
    )


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> Path:
    """Write problems as JSONL (e.g. to freeze a procedural split); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.to_dict(), ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- overlap


def normalize_question(text: str) -> str:
    """The key two questions are compared by: NFKC, lower case, all whitespace removed."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


@dataclass(frozen=True)
class OverlapReport:
    """Which test problems also appear (after :func:`normalize_question`) in the train set."""

    n_train: int
    n_test: int
    pairs: tuple[tuple[str, str], ...]  # (train id, test id)

    @property
    def n_overlap(self) -> int:
        """Number of test problems that have a twin in the train set."""
        return len({test_id for _, test_id in self.pairs})

    @property
    def fraction(self) -> float:
        """Share of the test set that overlaps the train set."""
        return self.n_overlap / self.n_test if self.n_test else 0.0

    def __str__(self) -> str:
        head = f"{self.n_overlap}/{self.n_test} test problems ({self.fraction:.1%}) appear in the train set"
        if not self.pairs:
            return head
        shown = ", ".join(f"{a}~{b}" for a, b in self.pairs[:5])
        return f"{head}: {shown}" + (" ..." if len(self.pairs) > 5 else "")


def dataset_overlap(train: Iterable[Problem], test: Iterable[Problem]) -> OverlapReport:
    """Report test problems whose normalised question text also occurs in ``train``.

    >>> a = [Problem("a", "What is 2 + 2?", "4")]
    >>> b = [Problem("b", "what is 2+2?", "4"), Problem("c", "What is 3?", "3")]
    >>> dataset_overlap(a, b).pairs
    (('a', 'b'),)
    """
    train, test = list(train), list(test)
    index: dict[str, list[str]] = {}
    for problem in train:
        index.setdefault(normalize_question(problem.question), []).append(problem.id)
    pairs = tuple(
        (train_id, problem.id)
        for problem in test
        for train_id in index.get(normalize_question(problem.question), ())
    )
    return OverlapReport(n_train=len(train), n_test=len(test), pairs=pairs)
