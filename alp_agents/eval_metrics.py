"""Pure maths of evaluation: pass@k, avg@n, maj@k, answer equivalence, bootstrap intervals.

Everything here works on plain Python values (no torch, no models), so the numbers can be
checked by hand and reused by the trainer's periodic evaluation and the evaluation script alike.

Conventions
-----------
* A *sample* is one episode on one problem; ``n`` samples are drawn per problem.
* Grades are three-valued: ``"correct"``, ``"wrong"`` or ``"unverifiable"`` (verifier timeout or
  crash, sandbox failure). Unverifiable samples are never counted as wrong: they are dropped
  from that problem's ``n`` before any estimator runs and reported separately.
* Every metric is first computed per problem, then averaged over problems; the bootstrap resamples
  problems (the unit that was drawn from a population), not samples.

Example
-------
>>> round(pass_at_k(n=5, c=2, k=2), 6)         # 1 - C(3,2)/C(5,2) = 1 - 3/10
0.7
>>> avg_at_n(["correct", "wrong", "unverifiable", "correct"])  # 2 of 3 verifiable
0.6666666666666666
>>> majority_vote(["1/2", "0.5", "3", None])  # 1/2 and 0.5 are one answer
(0, 2)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

CORRECT = "correct"
WRONG = "wrong"
UNVERIFIABLE = "unverifiable"
GRADE_STATUSES = (CORRECT, WRONG, UNVERIFIABLE)


# --------------------------------------------------------------------------------------------
# pass@k and avg@n
# --------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples, c correct.

    This is the estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, computed as a
    running product so that it stays exact-ish for large n (no huge binomials).

    >>> pass_at_k(n=10, c=0, k=5), pass_at_k(n=10, c=10, k=1), pass_at_k(n=4, c=1, k=1)
    (0.0, 1.0, 0.25)
    """
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"number of correct samples c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@{k} needs k in [1, n] but only n={n} samples were drawn per problem; "
            f"draw more samples (n >= {k}) or ask for a smaller k"
        )
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def verifiable(grades: Sequence[str]) -> list[str]:
    """The grades that count: unverifiable ones removed (they are neither right nor wrong)."""
    for g in grades:
        if g not in GRADE_STATUSES:
            raise ValueError(f"unknown grade status {g!r}; expected one of {GRADE_STATUSES}")
    return [g for g in grades if g != UNVERIFIABLE]


def avg_at_n(grades: Sequence[str]) -> float:
    """Fraction of a problem's verifiable samples that are correct (the papers' Average@n).

    Returns NaN when no sample of the problem could be verified; callers skip NaNs.
    """
    counted = verifiable(grades)
    if not counted:
        return math.nan
    return sum(g == CORRECT for g in counted) / len(counted)


def problem_pass_at_k(grades: Sequence[str], k: int) -> float:
    """pass@k of one problem from its sample grades; NaN if fewer than k samples are verifiable."""
    counted = verifiable(grades)
    if len(counted) < k:
        return math.nan
    return pass_at_k(len(counted), sum(g == CORRECT for g in counted), k)


# --------------------------------------------------------------------------------------------
# answer normalisation and majority vote
# --------------------------------------------------------------------------------------------
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\qquad|\\quad|\\displaystyle|\\?\$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_FRAC = re.compile(r"^-?\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?(?:/\d+)?$")


def normalize_answer(answer: str | None) -> str | None:
    """Canonical text of an extracted answer, so that equal answers vote together.

    Removes LaTeX spacing and sizing commands, ``\\text{}`` wrappers, dollar signs, surrounding
    whitespace and a trailing full stop, thousands separators in numbers, and writes numbers
    (integers, decimals, ``a/b``, ``\\frac{a}{b}``) as an exact reduced fraction, so that
    ``"0.5"``, ``"1/2"`` and ``"\\frac{1}{2}"`` agree. Anything else is compared as cleaned text.
    Returns None for a missing or empty answer.

    >>> normalize_answer(" \\\\$1,000.00. "), normalize_answer("\\\\dfrac{2}{4}"), normalize_answer("x + 1")
    ('1000', '1/2', 'x+1')
    """
    if answer is None:
        return None
    text = _LATEX_NOISE.sub("", str(answer))
    text = _TEXT_WRAPPER.sub(r"\1", text)
    text = text.replace("\\%", "").replace("%", "").replace("^\\circ", "").replace("^{\\circ}", "")
    text = "".join(text.split()).rstrip(".")
    if not text:
        return None
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    frac = _FRAC.match(text)
    if frac:
        sign = "-" if text.startswith("-") else ""
        text = f"{sign}{frac.group(1)}/{frac.group(2)}"
    if _NUMBER.match(text):
        try:
            value = Fraction(text)
        except (ValueError, ZeroDivisionError):
            return text
        return str(value)
    return text


def majority_vote(
    answers: Sequence[str | None], normalize: Callable[[str | None], str | None] = normalize_answer
) -> tuple[int | None, int]:
    """Index of the first sample holding the most common answer, and that answer's vote count.

    Missing answers (None after normalisation) do not vote. Ties go to the answer that appeared
    first, which makes the vote deterministic. Returns ``(None, 0)`` when nobody answered.
    """
    counts: dict[str, int] = {}
    first_index: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = normalize(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_index.setdefault(key, i)
    if not counts:
        return None, 0
    best = max(counts, key=lambda key: (counts[key], -first_index[key]))
    return first_index[best], counts[best]


def problem_maj_at_k(answers: Sequence[str | None], grades: Sequence[str], k: int) -> float:
    """maj@k of one problem: 1.0 if the majority answer of the first k samples is correct.

    The vote uses the first k samples by sample index (fixed by the seed). The winning answer's
    grade is the grade of the sample that first gave it; if that grade is unverifiable the
    problem is not scored (NaN), and a problem where no sample answered scores 0.
    """
    if len(answers) != len(grades):
        raise ValueError(f"{len(answers)} answers but {len(grades)} grades")
    if not 1 <= k <= len(answers):
        raise ValueError(
            f"maj@{k} needs k in [1, n] but only n={len(answers)} samples were drawn per problem"
        )
    winner, _ = majority_vote(answers[:k])
    if winner is None:
        return 0.0
    grade = grades[winner]
    if grade == UNVERIFIABLE:
        return math.nan
    return 1.0 if grade == CORRECT else 0.0


# --------------------------------------------------------------------------------------------
# aggregation and bootstrap confidence intervals
# --------------------------------------------------------------------------------------------
def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN if there are none): problems that cannot be scored drop out."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of per-problem scores.

    Problems are resampled with replacement ``num_resamples`` times from a generator seeded with
    ``seed``, so the interval is reproducible. NaN entries (problems that cannot be scored) are
    dropped first. With fewer than two scored problems the interval is ``(nan, nan)``.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if data.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(num_resamples, data.size))
    means = data[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def default_report_ks(n: int, k: int | None = None) -> list[int]:
    """The k values a human table shows: powers of two up to n, plus k and n themselves.

    >>> default_report_ks(8), default_report_ks(12, k=3)
    ([1, 2, 4, 8], [1, 2, 3, 4, 8, 12])
    """
    ks = {1, n}
    p = 2
    while p < n:
        ks.add(p)
        p *= 2
    if k is not None:
        ks.add(k)
    return sorted(ks)
