"""JSON Lines files written a row at a time, read back with one policy for a cut-off tail.

A run killed mid-write leaves at most its last line incomplete (rows are appended and flushed
one at a time). `read_jsonl` therefore drops a last line that does not parse, with a warning,
and raises on a bad line anywhere else, naming the file and line: that is corruption, not an
interrupted write.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


def read_jsonl(
    path: str | os.PathLike[str], *, missing_ok: bool = False, torn_tail_ok: bool = True
) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines are skipped.

    A last line that does not parse is dropped with a `RuntimeWarning` (``torn_tail_ok``);
    any other bad line raises `ValueError` naming ``path:line``. A missing file raises
    `FileNotFoundError` unless ``missing_ok``, which returns ``[]``.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> _ = p.write_text('{"step": 1}\\n{"step": 2}\\n{"ste')
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     read_jsonl(p)
    [{'step': 1}, {'step': 2}]
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last and torn_tail_ok:
                warnings.warn(
                    f"{path}:{i + 1}: dropped an incomplete last line (an interrupted write)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def append_jsonl(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], **dumps: Any
) -> None:
    """Append rows, one line each, flushed together (``dumps`` go to `json.dumps`)."""
    text = "".join(json.dumps(row, **dumps) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def rewrite_jsonl(path: str | os.PathLike[str], keep: Callable[[dict[str, Any]], bool]) -> int:
    """Keep only the rows for which ``keep(row)`` is true (atomically); returns rows dropped.

    Used when a run resumes from a checkpoint: rows it logged after that checkpoint are
    dropped so they are not logged twice. A torn last line is dropped too.
    """
    path = Path(path)
    if not path.exists():
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = read_jsonl(path)
    kept = [row for row in rows if keep(row)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)
    return len(rows) - len(kept)
