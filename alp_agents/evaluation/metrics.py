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


# --------------------------------------------------------------------------------------------
# from per-sample records to a report
# --------------------------------------------------------------------------------------------
def group_by_problem(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records grouped by ``problem_id`` (first-seen order), each group sorted by ``sample_index``."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["problem_id"]), []).append(record)
    for group in groups.values():
        group.sort(key=lambda r: r["sample_index"])
    return groups


def score_problem(samples: Sequence[dict], n: int, maj_ks: Sequence[int]) -> dict[str, float]:
    """Every per-problem score: ``pass@1..pass@n``, ``avg@n`` and ``maj@k`` for each k in maj_ks.

    ``samples`` are one problem's records (``grade`` and ``extracted_answer`` fields) in sample
    order; exactly ``n`` are expected.
    """
    if len(samples) != n:
        raise ValueError(
            f"problem {samples[0]['problem_id'] if samples else '?'} has {len(samples)} samples, "
            f"expected n={n}"
        )
    grades = [s["grade"] for s in samples]
    answers = [s.get("extracted_answer") for s in samples]
    scores = {f"pass@{j}": problem_pass_at_k(grades, j) for j in range(1, n + 1)}
    scores[f"avg@{n}"] = avg_at_n(grades)
    for j in maj_ks:
        scores[f"maj@{j}"] = problem_maj_at_k(answers, grades, j)
    return scores


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def episode_statistics(records: Sequence[dict]) -> dict[str, float]:
    """Tool-use and termination statistics over all samples (episodes).

    * ``turns_per_episode``, ``tool_calls_per_episode``, ``response_tokens_per_episode``: means;
    * ``tool_use_rate``: fraction of episodes with at least one tool call;
    * ``tool_error_rate``: failed tool calls (result status not ``ok``) / tool calls (NaN when
      there were none);
    * ``void_turn_rate``: void turns (neither code nor answer) / turns;
    * ``void_episode_rate``: episodes with at least one void turn / episodes;

    The same definitions as training's ``env/tool_error_ratio``, ``env/void_turn_ratio`` and
    ``env/void_episode_ratio`` (`alp_agents.rollout.stats.episode_stats`), except that an
    undefined ratio is NaN here (a report says n/a) and 0.0 in a training log (plots need numbers).
    * ``unverifiable_rate``: fraction of samples whose grade could not be decided;
    * ``finish_reason/<reason>``: fraction of episodes that ended that way;
    * for an env with a rubric (records with ``rewards``): ``reward/mean``, the mean episode
      reward, and ``reward/<name>``, the mean of each reward function's value (an episode where
      it was never scored counts 0.0), as in training's log.
    """
    count = len(records)
    if not count:
        return {}
    turns = sum(r.get("num_turns", 0) for r in records)
    calls = sum(r.get("num_tool_calls", 0) for r in records)
    stats = {
        "turns_per_episode": turns / count,
        "tool_calls_per_episode": calls / count,
        "tool_use_rate": sum(r.get("num_tool_calls", 0) > 0 for r in records) / count,
        "tool_error_rate": _ratio(sum(r.get("num_tool_errors", 0) for r in records), calls),
        "void_turn_rate": _ratio(sum(r.get("num_void_turns", 0) for r in records), turns),
        "void_episode_rate": sum(r.get("num_void_turns", 0) > 0 for r in records) / count,
        "response_tokens_per_episode": sum(r.get("response_tokens", 0) for r in records) / count,
        "unverifiable_rate": sum(r["grade"] == UNVERIFIABLE for r in records) / count,
    }
    reasons: dict[str, int] = {}
    for r in records:
        reason = str(r.get("finish_reason") or "unknown")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason in sorted(reasons):
        stats[f"finish_reason/{reason}"] = reasons[reason] / count
    stats.update(rubric_statistics(records))
    return stats


def rubric_statistics(records: Sequence[dict]) -> dict[str, float]:
    """``reward/mean`` and ``reward/<name>`` over records whose env has a rubric ({} otherwise)."""
    values = [r.get("rewards") or {} for r in records]
    names = list(dict.fromkeys(name for v in values for name in v))
    if not names:
        return {}
    stats = {"reward/mean": sum(float(r.get("reward", 0.0)) for r in records) / len(records)}
    for name in names:
        stats[f"reward/{name}"] = sum(float(v.get(name, 0.0)) for v in values) / len(records)
    return stats


def summarize(
    records: Sequence[dict],
    n: int,
    k: int | None = None,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Aggregate per-sample records into the evaluation report (plain JSON-able values).

    Returns a dict with

    * ``metrics``: flat ``{name: float}``: ``pass@1..pass@n`` (unbiased), ``avg@n``, ``maj@j`` for
      the reported ks, the `episode_statistics`, ``num_problems``, ``num_samples``,
      ``num_unverifiable``;
    * ``intervals``: ``{name: [low, high]}`` bootstrap intervals (over problems) for the reported
      pass@j, ``avg@n`` and maj@j;
    * ``scored_problems``: ``{name: count}``, how many problems each mean is over (a problem whose
      samples are mostly unverifiable can drop out of pass@k for large k);
    * ``breakdown``: ``{"source": {value: {...}}, "level": {value: {...}}}`` with the reported
      metrics per group, for the fields the records carry.

    ``k`` is the headline k (default n); it must not exceed n.
    """
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is larger than the n={n} samples drawn per problem (need k <= n)")
    ks = default_report_ks(n, k)
    groups = group_by_problem(records)
    per_problem = {pid: score_problem(samples, n, ks) for pid, samples in groups.items()}
    names = [f"pass@{j}" for j in range(1, n + 1)] + [f"avg@{n}"] + [f"maj@{j}" for j in ks]
    headline = [f"pass@{j}" for j in ks] + [f"avg@{n}"] + [f"maj@{j}" for j in ks]

    metrics: dict[str, float] = {}
    scored: dict[str, int] = {}
    for name in names:
        values = [scores[name] for scores in per_problem.values()]
        metrics[name] = nanmean(values)
        scored[name] = sum(not math.isnan(v) for v in values)
    intervals = {
        name: list(
            bootstrap_ci(
                [s[name] for s in per_problem.values()],
                confidence=confidence,
                num_resamples=num_resamples,
                seed=seed,
            )
        )
        for name in headline
    }
    metrics.update(episode_statistics(records))
    metrics["num_problems"] = float(len(groups))
    metrics["num_samples"] = float(len(records))
    metrics["num_unverifiable"] = float(sum(r["grade"] == UNVERIFIABLE for r in records))

    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    for field in ("source", "level"):
        values_of = {pid: samples[0].get(field) for pid, samples in groups.items()}
        if all(v is None for v in values_of.values()):
            continue
        table: dict[str, dict[str, float]] = {}
        for value in sorted({str(v) for v in values_of.values()}, key=_natural_key):
            members = [pid for pid, v in values_of.items() if str(v) == value]
            row = {"num_problems": float(len(members))}
            for name in headline:
                row[name] = nanmean([per_problem[pid][name] for pid in members])
            table[value] = row
        breakdown[field] = table
    return {
        "n": n,
        "k": k,
        "report_ks": ks,
        "confidence": confidence,
        "metrics": metrics,
        "intervals": intervals,
        "scored_problems": scored,
        "breakdown": breakdown,
    }


def _natural_key(text: str) -> tuple:
    """Sort "2" before "10" and numbers before words."""
    return (0, float(text), "") if re.fullmatch(r"-?\d+(\.\d+)?", text) else (1, 0.0, text)
