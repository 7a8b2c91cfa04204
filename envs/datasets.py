"""Problem sets: bundled JSONL benchmarks, user files, Dataset objects and procedural generators.

Every loader returns ``list[Problem]``. A JSONL problem file has one JSON object per line with
``question`` and ``answer`` (``id`` and ``source`` are filled in from the file name and line
number when absent); any other fields go to ``Problem.metadata``. Parquet and Arrow files
(with the ``data`` extra, i.e. pyarrow) and in-memory tables (a Hugging Face ``datasets.Dataset``
or ``DatasetDict``, a ``pyarrow.Table``) are read the same way, row by row, and
``columns={"question": "prompt", ...}`` says which column fills which problem field when the
names differ. Bad input fails loudly with the file, line or row and the field: a silent skip
would quietly change what a benchmark number means.

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
from collections.abc import Callable, Iterable, Mapping
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


#: Suffixes read as JSONL problem files (one JSON object per line; ``.json`` for old habits).
JSONL_SUFFIXES = (".jsonl", ".json")
#: Suffixes read with pyarrow (``pip install 'alp-agents[data]'``): Parquet, and Arrow IPC files
#: or streams (``.arrow``, as ``datasets`` writes them; ``.feather``).
ARROW_SUFFIXES = (".parquet", ".arrow", ".feather")
#: Every suffix :func:`load_dataset` reads as a problem file.
FILE_SUFFIXES = JSONL_SUFFIXES + ARROW_SUFFIXES
#: The problem fields a column mapping (``columns=``) can fill; question and answer are required.
PROBLEM_FIELDS = ("id", "question", "answer", "source")
#: Placeholder in a file name that :func:`load_dataset` replaces with the split
#: (``"data/{split}.parquet"``), so one name serves a train and a test file.
SPLIT_PLACEHOLDER = "{split}"


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
#: (name = dataset name, value = ``"module:generator"``). The names are listed by
#: :func:`available_datasets` at once; a module is imported only when its dataset is loaded.
DATASET_ENTRY_POINT_GROUP = "alp_agents.datasets"


def _plugin_entry_points() -> dict[str, Any]:
    """Dataset name -> entry point, for every installed ``alp_agents.datasets`` entry point.

    Read from the installed packages' metadata on each call (imports nothing; some 20 ms), so a
    package installed while the process runs is seen too.
    """
    from importlib import metadata

    return {ep.name: ep for ep in metadata.entry_points(group=DATASET_ENTRY_POINT_GROUP)}


def _generator_from_plugins(name: str) -> Callable[..., list[Problem]] | None:
    entry_point = _plugin_entry_points().get(name)
    if entry_point is None:
        return None
    try:
        generator = entry_point.load()
    except Exception as exc:  # the plugin's own import failed: name it, not just the dataset
        dist = entry_point.dist.name if entry_point.dist else "?"
        raise DatasetError(
            f"dataset {name!r} comes from the entry point {entry_point.name} = "
            f"{entry_point.value} (package {dist}), which failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _GENERATORS.setdefault(name, generator)
    return _GENERATORS[name]


def available_datasets() -> list[str]:
    """Every name :func:`load_dataset` accepts (besides file paths and Dataset objects).

    Bundled names, their groups (``gsm8k`` for ``gsm8k_train`` / ``gsm8k_test``), generators
    registered in this process and the datasets of installed plugins, whether or not they were
    loaded yet.
    """
    groups = sorted(
        {name.rsplit("_", 1)[0] for name in BUNDLED if name.endswith(("_train", "_test"))}
    )
    return sorted(set(BUNDLED) | set(_GENERATORS) | set(groups) | set(_plugin_entry_points()))


def is_dataset_file(name: str | os.PathLike) -> bool:
    """True when :func:`load_dataset` reads ``name`` as a file path, not as a dataset name.

    A registered or bundled name (or group) wins; otherwise a known suffix
    (:data:`FILE_SUFFIXES`), or, for a name no plugin declares, a path separator or an existing
    path makes it a file. Configs use it to decide whether a column mapping applies.

    >>> is_dataset_file("math500"), is_dataset_file("data/{split}.parquet")
    (False, True)
    """
    name = os.fspath(name)
    key = _ALIASES.get(name, name)
    if key in _GENERATORS or key in BUNDLED or any(b.startswith(key + "_") for b in BUNDLED):
        return False
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True  # as in load_dataset: no plugin is looked up for such a name
    if key in _plugin_entry_points():
        return False
    return os.sep in name or Path(name).expanduser().exists()


# ----------------------------------------------------------------------------- loading

_cache: dict[tuple, tuple[Problem, ...]] = {}
_cache_lock = threading.Lock()


def load_dataset(
    name_or_path: str | os.PathLike | Any,
    split: str | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    **options: Any,
) -> list[Problem]:
    """Load a problem set by name, from a file, or from an in-memory table.

    Args:
        name_or_path: one of
            - a bundled name (``gsm8k_train``, ``gsm8k_test``, ``math500``, ``aime24``,
              ``amc23``, ``olympiadbench``, ``simplelr_math35_train``, ``aime_1983_2023_train``)
              or a group with a split (``"gsm8k"`` + ``split="test"``);
            - a procedural generator (``"arith"``, ``"arith_small"``, ``"arith_easy"``,
              ``"arith_hard"``, or one registered with :func:`register_generator` or through the
              ``alp_agents.datasets`` entry point); ``split`` is ``"train"`` or ``"test"``, other
              keyword options go to the generator, e.g. ``n=500, seed=1``;
            - the path of a problem file: JSONL (``.jsonl``/``.json``), Parquet (``.parquet``)
              or Arrow (``.arrow``/``.feather``; these two need pyarrow, the ``data`` extra).
              ``{split}`` in the path is replaced by ``split`` (``"data/{split}.parquet"``);
              otherwise a file is its own split and ``split`` is not used;
            - a table object: a Hugging Face ``datasets.Dataset``, a ``DatasetDict`` (``split``
              picks the member) or a ``pyarrow.Table``: anything with ``column_names`` whose
              rows are dicts. Duck-typed: ``datasets`` itself is not needed here.
        split: see above; for a bundled name that already names its split it must match or be None.
        columns: for files and tables, which column fills which problem field, as
            ``{field: column}`` (fields: ``id``, ``question``, ``answer``, ``source``), e.g.
            ``{"question": "prompt", "answer": "solution"}``. Unmapped fields are read from the
            column of their own name; every other column goes to ``Problem.metadata`` (a column
            displaced by the mapping, e.g. the file's own ``answer``, as ``original_answer``).

    Returns:
        A new list (files are parsed once per process and cached; Problems are immutable).

    Raises:
        DatasetError: unknown name (with close matches), bad JSON (file:line), a missing column
            (naming the file and the closest column names), a record without question/answer
            (file:line or row, and its id), duplicate ids, a split that does not exist, or a
            Parquet/Arrow file without pyarrow installed (naming the extra).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        if options:
            raise DatasetError(f"a table takes no options, got {sorted(options)}")
        return _from_table(name_or_path, split, _check_columns(columns))
    name = os.fspath(name_or_path)
    if SPLIT_PLACEHOLDER in name:
        if split is None:
            raise DatasetError(
                f"dataset path {name!r} has a {SPLIT_PLACEHOLDER} placeholder; pass split=..."
            )
        name = name.replace(SPLIT_PLACEHOLDER, split)
    key = _ALIASES.get(name, name)
    generator = _GENERATORS.get(key)
    if generator is None and key not in BUNDLED and not name.endswith(FILE_SUFFIXES):
        generator = _generator_from_plugins(key)
    if columns and (generator is not None or key in BUNDLED or f"{key}_{split}" in BUNDLED):
        kind = "procedural" if generator is not None else "bundled"
        raise DatasetError(
            f"columns= applies to problem files and tables; {name!r} is a {kind} dataset "
            "whose problems already have question and answer"
        )
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
    if path.suffix.lower() in FILE_SUFFIXES or os.sep in name or path.exists():
        return read_problem_file(path, columns=columns)
    hint = did_you_mean(key, available_datasets(), cutoff=0.5)
    splits = sorted(s.rsplit("_", 1)[1] for s in BUNDLED if s.startswith(key + "_"))
    if splits:
        hint = f" Dataset {key!r} has splits {splits}; pass split=..." + hint
    raise DatasetError(
        f"unknown dataset {name!r}.{hint} Known: {', '.join(available_datasets())}, "
        f"or the path of a problem file ({', '.join(FILE_SUFFIXES)})."
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


def read_problem_file(
    path: str | os.PathLike, *, columns: Mapping[str, str] | None = None
) -> list[Problem]:
    """Parse and validate a JSONL, Parquet or Arrow problem file (see :func:`load_dataset`).

    The suffix decides the format: :data:`ARROW_SUFFIXES` are read with pyarrow, anything else
    as JSONL (as files were always read).

    Cached by path, modification time, size and column mapping: an environment is built per
    episode, and re-reading a large file each time would dominate a rollout.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"problem file not found: {path}")
    if path.is_dir():
        raise DatasetError(
            f"{path} is a folder, not a problem file; for a folder written by "
            "datasets' save_to_disk, pass datasets.load_from_disk(path) to load_dataset"
        )
    suffix = path.suffix.lower()
    mapping = _check_columns(columns, where=str(path))
    path = path.resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, tuple(sorted(mapping.items())))
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        if suffix not in ARROW_SUFFIXES:  # .jsonl, .json, and (as always) any other name
            cached = tuple(_parse_jsonl(path, mapping))
        else:
            table = _read_arrow(path)
            _check_schema(table.column_names, mapping, str(path))
            cached = tuple(
                _problems_from_rows(
                    table.to_pylist(), where=str(path), default_source=path.stem, columns=mapping
                )
            )
        with _cache_lock:
            _cache[key] = cached
    return list(cached)


def read_jsonl(
    path: str | os.PathLike, *, columns: Mapping[str, str] | None = None
) -> list[Problem]:
    """Parse and validate a JSONL problem file (cached by path and modification time)."""
    return read_problem_file(path, columns=columns)


def _parse_jsonl(path: Path, columns: dict[str, str]) -> Iterable[Problem]:
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
                columns=columns,
            )
            if problem.id in seen:
                raise DatasetError(
                    f"{where}: duplicate id {problem.id!r} (first on line {seen[problem.id]})"
                )
            seen[problem.id] = lineno
            yield problem


def _read_arrow(path: Path) -> Any:
    """The file as a ``pyarrow.Table``; a clear error naming the extra when pyarrow is missing."""
    try:
        import pyarrow as pa
        import pyarrow.feather
        import pyarrow.parquet
    except ImportError:
        raise DatasetError(
            f"{path}: reading {path.suffix} files needs pyarrow: pip install 'alp-agents[data]' "
            "(or pip install pyarrow); JSONL problem files need nothing extra"
        ) from None
    try:
        if path.suffix.lower() == ".parquet":
            return pyarrow.parquet.read_table(path)
        try:  # Arrow IPC file format (feather v2) ...
            return pyarrow.feather.read_table(path)
        except pa.ArrowInvalid:  # ... or the stream format that datasets' cache files use
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable {path.suffix[1:]} file ({exc})") from None


def _from_table(data: Any, split: str | None, columns: dict[str, str]) -> list[Problem]:
    """Problems from a Dataset-like object (``column_names`` + dict rows) or a dict of them."""
    if isinstance(data, Mapping):  # a DatasetDict: split name -> Dataset
        splits = [str(s) for s in data]
        if not splits or not all(hasattr(v, "column_names") for v in data.values()):
            raise DatasetError(
                "a dict given to load_dataset must map split names to tables "
                f"(a datasets.DatasetDict); got keys {splits}"
            )
        if split is None:
            if len(splits) != 1:
                raise DatasetError(f"the DatasetDict has splits {splits}; pass split=...")
            split = splits[0]
        if split not in data:
            raise DatasetError(
                f"the DatasetDict has no split {split!r}; it has {splits}."
                + did_you_mean(split, splits)
            )
        data = data[split]
    if not hasattr(data, "column_names"):
        raise DatasetError(
            "load_dataset takes a dataset name, a file path, or a table with column_names "
            f"(datasets.Dataset / DatasetDict, pyarrow.Table); got {type(data).__name__}"
        )
    own_split = getattr(data, "split", None)
    if split is not None and own_split is not None and str(own_split) != split:
        raise DatasetError(
            f"this {type(data).__name__} is the {str(own_split)!r} split; got split={split!r} "
            "(pass the DatasetDict to choose a split)"
        )
    split = split if split is not None else (str(own_split) if own_split is not None else None)
    info = getattr(data, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset"
    label = f"{type(data).__name__} {name!r}" + (f" (split {split!r})" if split else "")
    # A datasets.Dataset has a content fingerprint: an env built per episode from the same
    # Dataset must not convert every row again each time (a pyarrow.Table converts fast).
    fingerprint = getattr(data, "_fingerprint", None)
    key = ("table", fingerprint, split, tuple(sorted(columns.items()))) if fingerprint else None
    if key is not None:
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None:
            return list(cached)
    if data.column_names is not None:  # None for a streaming dataset: checked row by row
        _check_schema(list(data.column_names), columns, label)
    rows = data.to_pylist() if hasattr(data, "to_pylist") else iter(data)
    problems = _problems_from_rows(
        rows,
        where=label,
        default_source=str(name),
        id_prefix=f"{name}-{split}" if split else str(name),
        columns=columns,
    )
    if key is not None:
        with _cache_lock:
            _cache[key] = tuple(problems)
    return problems


def _problems_from_rows(
    rows: Iterable[Any],
    *,
    where: str,
    default_source: str,
    columns: dict[str, str],
    id_prefix: str | None = None,
) -> list[Problem]:
    """Problems from table rows; rows are numbered from 0, as ``table[i]`` indexes them."""
    prefix = default_source if id_prefix is None else id_prefix
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for row_number, row in enumerate(rows):
        here = f"{where}: row {row_number}"
        if not isinstance(row, Mapping):
            raise DatasetError(
                f"{here}: expected a record (column -> value), got {type(row).__name__}"
            )
        problem = problem_from_record(
            row,
            where=here,
            default_id=f"{prefix}-{row_number}",
            default_source=default_source,
            columns=columns,
        )
        if problem.id in seen:
            raise DatasetError(
                f"{here}: duplicate id {problem.id!r} (first in row {seen[problem.id]})"
            )
        seen[problem.id] = row_number
        problems.append(problem)
    return problems


def _check_columns(
    columns: Mapping[str, str] | None, where: str = "load_dataset"
) -> dict[str, str]:
    """Validate a ``{field: column}`` mapping; catches the reversed ``{column: field}`` too."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise DatasetError(
            f"{where}: columns must be a mapping {{field: column}}, got {type(columns).__name__}"
        )
    mapping: dict[str, str] = {}
    for problem_field, column in columns.items():
        if problem_field not in PROBLEM_FIELDS:
            hint = did_you_mean(str(problem_field), PROBLEM_FIELDS)
            if column in PROBLEM_FIELDS:
                hint = (
                    f" The mapping is {{field: column}}: did you mean {{{column!r}: "
                    f"{problem_field!r}}}?"
                )
            raise DatasetError(
                f"{where}: columns key {problem_field!r} is not a problem field "
                f"({', '.join(PROBLEM_FIELDS)}).{hint}"
            )
        if not isinstance(column, str) or not column:
            raise DatasetError(
                f"{where}: columns[{problem_field!r}] must be a column name, got {column!r}"
            )
        mapping[problem_field] = column
    return mapping


def _check_schema(names: list[str], columns: dict[str, str], where: str) -> None:
    """Fail before reading any row when a needed column is absent, with the closest names."""
    for problem_field, column in columns.items():
        if column not in names:
            raise DatasetError(
                f"{where}: no column {column!r} (mapped to {problem_field!r}); columns: "
                f"{names}.{did_you_mean(column, names)}"
            )
    for problem_field in ("question", "answer"):
        if problem_field not in columns and problem_field not in names:
            raise DatasetError(
                f"{where}: no {problem_field!r} column; columns: {names}."
                + did_you_mean(problem_field, names)
                + f" Map one with columns={{{problem_field!r}: COLUMN}}."
            )


def _apply_columns(record: Mapping[str, Any], columns: dict[str, str], where: str) -> dict:
    """The record with mapped columns renamed to their fields (displaced ones kept as
    ``original_<field>``, so no value is lost and ``to_dict`` round-trips)."""
    out = dict(record)
    if not columns:
        return out
    for problem_field, column in columns.items():
        if column not in record:
            raise DatasetError(
                f"{where}: no column {column!r} (mapped to {problem_field!r}); the record has "
                f"{sorted(record)}.{did_you_mean(column, list(record))}"
            )
    for column in columns.values():
        out.pop(column, None)
    for problem_field in columns:
        if problem_field in out:
            out[f"original_{problem_field}"] = out.pop(problem_field)
    for problem_field, column in columns.items():
        out[problem_field] = record[column]
    return out


def _field_problem(
    value: Any, problem_field: str, rest: Mapping[str, Any], columns: dict[str, str]
) -> str:
    """What is wrong with a missing or non-string field: its column, type or a close column."""
    column = columns.get(problem_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if column is not None:
            return f" (column {column!r} is empty)"
        hint = did_you_mean(problem_field, [str(k) for k in rest])
        return f".{hint} Map a column with columns={{{problem_field!r}: COLUMN}}." if hint else ""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    source = f"column {column!r}" if column is not None else "it"
    return f" ({source} is a {type(value).__name__}: {shown})"


def problem_from_record(
    record: Mapping[str, Any],
    *,
    where: str = "record",
    default_id: str | None = None,
    default_source: str = "",
    columns: Mapping[str, str] | None = None,
) -> Problem:
    """Validate one record (dict) and build a Problem; errors name ``where``, the id and field.

    ``columns`` (``{field: column}``) renames the record's columns first (see :func:`load_dataset`).
    """
    mapping = _check_columns(columns, where) if columns else {}
    record = _apply_columns(record, mapping, where)
    pid = record.pop("id", default_id)
    if pid is None or (isinstance(pid, str) and not pid.strip()):
        raise DatasetError(f"{where}: record has no 'id'")
    pid = str(pid)
    question = record.pop("question", None)
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(
            f"{where}: problem {pid!r} has no 'question' (a non-empty string)"
            + _field_problem(question, "question", record, mapping)
        )
    answer = record.pop("answer", None)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DatasetError(
            f"{where}: problem {pid!r} has no 'answer' (a non-empty string)"
            + _field_problem(answer, "answer", record, mapping)
        )
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
