"""DockerSandbox against a real engine; skipped (with the reason) where there is none."""

from __future__ import annotations

import pytest

from sandbox import Limits
from sandbox.docker import DEFAULT_IMAGE, docker_unavailable_reason

REASON = docker_unavailable_reason(DEFAULT_IMAGE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"DockerSandbox: {REASON}")


@pytest.fixture(scope="module")
def dsb():
    from sandbox import DockerSandbox

    with DockerSandbox(limits=Limits(timeout_s=2.0, memory_mb=256), workers=2) as sandbox:
        yield sandbox


def test_docker_runs_snippets_and_sessions(dsb):
    assert dsb.run("print(6 * 7)").stdout == "42\n"
    assert [r.stdout for r in dsb.run_many([f"print({i})" for i in range(4)])] == [
        f"{i}\n" for i in range(4)
    ]
    with dsb.session() as s:
        s.run("x = 3")
        assert s.run("print(x * 2)").stdout == "6\n"


def test_docker_limits_and_network(dsb):
    assert dsb.run("while True: pass").status == "timeout"
    r = dsb.run(
        "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=0.5)\n"
        "    print('connected')\nexcept OSError:\n    print('blocked')"
    )
    assert r.stdout == "blocked\n"
    assert dsb.run("print(1)").status == "ok"  # still serving after the attack


def test_docker_tracebacks_use_snippet_lines(dsb):
    r = dsb.run("x = 1\n1 / 0\n")
    assert r.status == "error" and 'File "<snippet>", line 2' in r.stderr
