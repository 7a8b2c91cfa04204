"""Legitimate math code must keep working under the same tight limits as the attacks."""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.security


def run(sb, code: str):
    return sb.run(textwrap.dedent(code))


def test_numpy(sb):
    r = run(
        sb,
        "import numpy as np\na = np.arange(12).reshape(3, 4)\nprint(a.sum(), np.linalg.matrix_rank(a))\n",
    )
    assert (r.status, r.stdout) == ("ok", "66 2\n"), r


def test_sympy_including_lazily_imported_parts(sb):
    r = run(
        sb,
        """
        import sympy as sp
        from sympy.ntheory import totient
        x = sp.symbols("x")
        print(sp.solve(x**2 - 5*x + 6, x), sp.integrate(sp.sin(x)**2, (x, 0, sp.pi)), totient(36))
        """,
    )
    assert (r.status, r.stdout) == ("ok", "[2, 3] pi/2 12\n"), r


def test_fractions_and_itertools(sb):
    r = run(
        sb,
        """
        from fractions import Fraction
        from itertools import combinations, permutations
        print(sum(Fraction(1, n) for n in range(1, 5)), len(list(combinations(range(10), 3))),
              sum(1 for _ in permutations(range(6))))
        """,
    )
    assert (r.status, r.stdout) == ("ok", "25/12 120 720\n"), r


def test_threads(sb):
    r = run(
        sb,
        """
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            print(sum(pool.map(lambda n: n * n, range(100))))
        """,
    )
    assert (r.status, r.stdout) == ("ok", "328350\n"), r


def test_moderate_recursion(sb):
    r = run(
        sb,
        """
        import sys
        sys.setrecursionlimit(20000)
        def depth(n):
            return 0 if n == 0 else 1 + depth(n - 1)
        print(depth(10000))
        """,
    )
    assert (r.status, r.stdout) == ("ok", "10000\n"), r


def test_unicode_output(sb):
    r = run(sb, "print('π ≈ 3.14159, ∑ n² — 数学 🎲')\n")
    assert (r.status, r.stdout) == ("ok", "π ≈ 3.14159, ∑ n² — 数学 🎲\n"), r


def test_subprocess_of_python_works(sb):
    r = run(
        sb,
        "import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', 'print(2+2)'], capture_output=True, text=True).stdout, end='')\n",
    )
    assert (r.status, r.stdout) == ("ok", "4\n"), r
