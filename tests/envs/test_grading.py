"""Grading edge cases with the real math-verify in the real verifier processes."""

from __future__ import annotations

import threading

import pytest

import envs
from envs.grading import VerifierPool, extract_boxed, extract_last_number


@pytest.mark.parametrize(
    ("response", "reference", "status"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", "correct"),  # fraction vs decimal
        (r"\boxed{\dfrac{3}{4}}", r"\frac34", "correct"),
        (r"\boxed{2/4}", r"\frac{1}{2}", "correct"),
        (r"\boxed{\frac{1}{3}}", "0.5", "wrong"),
        (r"\boxed{[1,3)}", "[1,3)", "correct"),  # intervals, open/closed ends matter
        (r"\boxed{(1,3]}", "[1,3)", "wrong"),
        (r"\boxed{(-\infty, 2]}", r"(-\infty,2]", "correct"),
        (r"\boxed{10\text{ cm}}", "10", "correct"),  # \text{} units
        (r"\boxed{90^\circ}", "90", "correct"),
        (r"\boxed{1,000}", "1000", "correct"),  # commas in numbers
        (r"\boxed{1{,}234{,}567}", "1234567", "correct"),
        (r"\boxed{x^2+1}", "1+x^2", "correct"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3, \pi/2)", "correct"),
        (r"\boxed{\text{(C)}}", "C", "correct"),
        (r"first \boxed{1} then \boxed{2}", "2", "correct"),  # multiple boxes: the last counts
        (r"first \boxed{2} then \boxed{1}", "2", "wrong"),
        ("the answer is 2", "2", "wrong"),  # no box: no answer
        (r"\boxed{}", "2", "wrong"),
        (r"\boxed{hello world}", "3", "wrong"),
    ],
)
def test_grade_edge_cases(response, reference, status):
    result = envs.grade(response, reference)
    assert result.status == status, result
    assert result.reference == reference
    assert result.reward == (1.0 if status == "correct" else 0.0)


def test_no_box_reports_why():
    result = envs.grade("I think it is 7", "7")
    assert result.extracted is None and "no \\boxed{}" in result.detail


def test_gsm8k_style_number_fallback():
    assert envs.grade("She pays $1,234 in total.", "1234", extract="boxed_or_number").correct
    assert envs.grade(
        r"\boxed{5} and later 7", "5", extract="boxed_or_number"
    ).correct  # a box wins
    assert not envs.grade("no numbers here", "5", extract="boxed_or_number").correct
    assert envs.grade("  3/6 ", "0.5", extract="raw").correct
    with pytest.raises(ValueError, match="extract must be one of"):
        envs.grade("x", "1", extract="first")


def test_verifier_timeout_is_unverifiable_never_wrong():
    # sympy tries to evaluate the tower of powers and never returns: the pool kills the worker.
    pool = VerifierPool(size=1)
    try:
        result = envs.grade(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1.0, pool=pool)
        assert result.status == "unverifiable" and "timed out" in result.detail
        assert envs.grade(
            r"\boxed{\frac{2}{4}}", "0.5", pool=pool
        ).correct  # a fresh worker took over
    finally:
        pool.close()


def test_malformed_reference_is_unverifiable():
    assert envs.grade(r"\boxed{3}", r"\frac{1}{").status == "unverifiable"


def test_grade_from_many_threads():
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = envs.grade(rf"\boxed{{\frac{{{i}}}{{2}}}}", str(i / 2)).status

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: "correct" for i in range(24)}


def test_extractors():
    assert extract_boxed(r"\boxed{\frac{a}{b}} and \fbox{7}") == "7"
    assert extract_boxed(r"$\boxed 5$") == "5"
    assert extract_boxed(r"\boxed{unclosed and \boxed{2}") == "2"
    assert extract_boxed(r"\boxed{cut off") is None
    assert extract_last_number("from -3 to 4.5.") == "4.5"
    assert extract_last_number("total 12,345 apples") == "12345"


def test_real_references_through_the_verifier():
    """AIME/AMC integer answers written as decimals go through math-verify (no exact match)."""
    for name in ("aime24", "amc23"):
        for problem in envs.load_dataset(name):
            result = envs.grade(rf"\boxed{{{problem.answer}.0}}", problem.answer)
            assert result.correct and result.detail == "math-verify", (problem.id, result)
            assert (
                envs.grade(rf"\boxed{{{int(problem.answer) + 1}}}", problem.answer).status
                == "wrong"
            )
