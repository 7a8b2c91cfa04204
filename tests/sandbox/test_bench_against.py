"""bench/sandbox_bench.py --against: the same-run comparison with another revision's sandbox.

The measurement itself is a benchmark (bench/, not a test); these tests check the parts that
decide what it prints: the ratios and medians, and where the old package comes from."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "sandbox_bench", ROOT / "bench" / "sandbox_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _run(latency_ms: list[float], throughput: float, cpu_ms: float) -> dict:
    return {
        "latency": {"LocalSandbox.run|numpy+sympy": [t / 1e3 for t in latency_ms]},
        "throughput": {"numpy+sympy": throughput},
        "cpu_ms": {"numpy+sympy": cpu_ms},
    }


def test_compare_takes_medians_over_rounds_and_ratios_against_the_reference():
    # Round p50s: 10 and 14 ms (median 12) against 20 and 30 ms (median 25).
    current = [_run([9, 10, 11], 100, 20), _run([13, 14, 15], 80, 30)]
    reference = [_run([20, 20, 40], 50, 40), _run([30, 30, 10], 70, 60)]
    rows = {row[0]: row[1:] for row in bench.compare(current, reference)}

    now, then, ratio, lower_is_better = rows["LocalSandbox.run numpy+sympy p50 (ms)"]
    assert (now, then) == pytest.approx((12.0, 25.0))
    assert ratio == pytest.approx(12 / 25) and lower_is_better

    now, then, ratio, lower_is_better = rows["throughput numpy+sympy (/s)"]
    assert (now, then, ratio) == pytest.approx((90.0, 60.0, 1.5)) and not lower_is_better

    now, then, ratio, lower_is_better = rows["CPU per numpy+sympy snippet (ms)"]
    assert (now, then, ratio) == pytest.approx((25.0, 50.0, 0.5)) and lower_is_better


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout of the project")
def test_the_reference_package_is_the_revision_s_sandbox_directory(tmp_path):
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert bench.extract_sandbox_package("HEAD", str(tmp_path)) == head
    extracted = tmp_path / "sandbox" / "local.py"
    committed = subprocess.run(
        ["git", "-C", str(ROOT), "show", "HEAD:sandbox/local.py"], capture_output=True, check=True
    ).stdout
    assert extracted.read_bytes() == committed
    assert not (tmp_path / "envs").exists(), "only sandbox/ is taken from the revision"


def test_an_unknown_revision_is_refused_with_git_s_reason(tmp_path):
    with pytest.raises(SystemExit) as stop:
        bench.extract_sandbox_package("no-such-revision-xyz", str(tmp_path))
    assert "--against no-such-revision-xyz" in str(stop.value)
    assert os.listdir(tmp_path) == []
