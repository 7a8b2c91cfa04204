"""One real LocalSandbox per test module (starting one costs ~2 s)."""

from __future__ import annotations

import pytest

from sandbox import Limits, LocalSandbox

API_LIMITS = Limits(timeout_s=2.0, cpu_s=4.0, memory_mb=512, max_output_bytes=4096)


@pytest.fixture(scope="module")
def sb():
    with LocalSandbox(limits=API_LIMITS, workers=2) as sandbox:
        yield sandbox
