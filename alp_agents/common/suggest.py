"""The "Did you mean ...?" hint every error about a misspelt name ends with."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(value: str, choices: Iterable[str], *, cutoff: float = 0.6, n: int = 1) -> str:
    """``" Did you mean 'x'?"`` for the closest choices, or ``""`` when none is close.

    >>> did_you_mean("bypas", ["alp", "bypass"])
    " Did you mean 'bypass'?"
    >>> did_you_mean("zzz", ["alp"])
    ''
    >>> did_you_mean("arith_hadr", ["arith_easy", "arith_hard", "gsm8k"], n=2)
    " Did you mean 'arith_hard' or 'arith_easy'?"
    """
    close = difflib.get_close_matches(str(value), list(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
