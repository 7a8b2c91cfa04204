"""Grading throughput: the warm verifier pool vs one fresh verifier process per grade.

Prints answers/s for both on the same real MATH-500 references (answers written differently
from the reference, so every call goes through math-verify, not the exact-match shortcut) and
their ratio. Run: python bench/envs_grading.py [--n 200]
"""

from __future__ import annotations

import argparse
import time

import envs
from envs.grading import VerifierPool


def answers(n: int) -> list[tuple[str, str]]:
    pairs = []
    for problem in envs.load_dataset("math500"):
        if problem.answer.isdigit():
            pairs.append((rf"The answer is \boxed{{{problem.answer}.0}}", problem.answer))
        if len(pairs) == n:
            break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--baseline-n", type=int, default=10, help="grades for the slow baseline")
    args = parser.parse_args()
    pairs = answers(args.n)

    pool = VerifierPool()
    pool.warm_up()
    start = time.perf_counter()
    statuses = [envs.grade(text, ref, pool=pool).status for text, ref in pairs]
    warm = len(pairs) / (time.perf_counter() - start)
    pool.close()
    assert statuses.count("correct") == len(pairs), statuses

    start = time.perf_counter()
    for text, ref in pairs[: args.baseline_n]:
        fresh = VerifierPool(size=1, cache_size=0)  # a new process for every grade
        envs.grade(text, ref, pool=fresh)
        fresh.close()
    cold = args.baseline_n / (time.perf_counter() - start)
    print(f"warm pool: {warm:8.1f} grades/s ({len(pairs)} grades)")
    print(f"fresh process per grade: {cold:8.1f} grades/s ({args.baseline_n} grades)")
    print(f"ratio warm / fresh: {warm / cold:.1f}x")


if __name__ == "__main__":
    main()
