"""Small pure text helpers shared by the environments (code blocks, head+tail truncation, hints).

>>> find_code_block("Let me compute.\\n```python\\nprint(6 * 7)\\n```\\n")
CodeBlock(code='print(6 * 7)', start=16, end=42)
>>> truncate_middle("a" * 10 + "b" * 10, 12)
'aaaaaa\\n...[8 characters omitted]...\\nbbbbbb'
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Languages whose fenced blocks the Python tool runs (``py`` is common in small models' output).
PYTHON_FENCE_LANGUAGES = ("python", "py", "python3")

# Opening fence: ``` + a python language tag + end of line. Closing fence: the next ``` (normally
# at the start of a line; a small model sometimes glues it to the last line of code).
_OPEN_RE = re.compile(
    r"```[ \t]*(?:" + "|".join(PYTHON_FENCE_LANGUAGES) + r")[ \t]*\r?\n", re.IGNORECASE
)
_CLOSE = "```"


@dataclass(frozen=True)
class CodeBlock:
    """A complete fenced python block: its code and the span of the whole block in the text."""

    code: str
    start: int
    end: int  # index just after the closing fence


def find_code_block(text: str) -> CodeBlock | None:
    """The first COMPLETE ```python block in ``text`` (None if there is none or it is unclosed)."""
    opening = _OPEN_RE.search(text)
    if opening is None:
        return None
    close = text.find(_CLOSE, opening.end())
    if close < 0:
        return None
    code = text[opening.end() : close]
    return CodeBlock(
        code=code.rstrip("\n").rstrip("\r"), start=opening.start(), end=close + len(_CLOSE)
    )


def truncate_middle(
    text: str, max_chars: int | None, marker: str = "\n...[{n} characters omitted]...\n"
) -> str:
    """Keep the head and tail of ``text`` (``max_chars`` in total) with a visible marker between.

    The marker says how many characters were dropped; ``None`` or a text that fits is returned
    unchanged.
    """
    if max_chars is None or len(text) <= max_chars:
        return text
    if max_chars <= 0:
        return marker.format(n=len(text)).strip()
    head = (max_chars + 1) // 2
    tail = max_chars - head
    omitted = len(text) - head - tail
    return text[:head] + marker.format(n=omitted) + (text[-tail:] if tail else "")


def last_line(text: str) -> str:
    """The last non-empty line (the error line of a Python traceback)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def did_you_mean(value: str, choices: Iterable[str], *, cutoff: float = 0.6, n: int = 3) -> str:
    """``" Did you mean 'a' or 'b'?"`` for the closest choices, or ``""`` when none is close.

    The same hint format as ``alp_agents.common.did_you_mean`` (envs cannot import alp_agents).

    >>> did_you_mean("math50", ["math500", "gsm8k"])
    " Did you mean 'math500'?"
    >>> did_you_mean("zzz", ["math500"])
    ''
    """
    close = difflib.get_close_matches(str(value), list(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
