"""Shared fixtures for the attack tests: one real, fully isolated sandbox per test module.

The limits are tight so that every attack is stopped quickly (the suite must stay fast), and
after every test the fixture checks that the server still works and that nothing the snippet
started is still alive (no stray processes). At module end it checks that closing the sandbox
leaves no process and no cgroup behind.
"""

from __future__ import annotations

import os
import time

import pytest

from sandbox import Limits, LocalSandbox
from sandbox.audit import cgroups_of_servers, processes_of_servers

FAKE_SECRET = "alp-fake-secret-7f3d9c1e"

ATTACK_LIMITS = Limits(
    timeout_s=1.5,
    cpu_s=3.0,
    memory_mb=256,
    max_processes=32,
    max_file_mb=16,
    max_disk_mb=64,
    max_output_bytes=4096,
)


def _needs_full_isolation(sb: LocalSandbox) -> None:
    if sb.isolation.level != "full":
        pytest.skip(f"full isolation is not available on this host: {sb.isolation}")


@pytest.fixture(scope="session")
def fake_secret() -> str:
    return FAKE_SECRET


@pytest.fixture(scope="module")
def sandbox_box():
    """(sandbox, launcher pids). The trainer's fake secret is in OUR environment while the
    servers start, so a leak would show up in the snippets."""
    os.environ["ALP_FAKE_SECRET"] = FAKE_SECRET
    try:
        sb = LocalSandbox(limits=ATTACK_LIMITS, workers=2).start()
    finally:
        del os.environ["ALP_FAKE_SECRET"]
    _needs_full_isolation(sb)
    launchers = sb.launcher_pids
    yield sb
    sb.close()
    assert_nothing_left(launchers)


def assert_nothing_left(launchers: list[int], wait_s: float = 5.0) -> None:
    """After close(): no snippet process, cgroup or server of these launchers survives."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (
        processes_of_servers(launchers) or cgroups_of_servers(launchers)
    ):
        time.sleep(0.05)
    assert processes_of_servers(launchers) == [], "snippet processes outlived the sandbox"
    assert cgroups_of_servers(launchers) == [], "cgroups outlived the sandbox"
    for pid in launchers:
        assert not os.path.exists(f"/proc/{pid}"), "a server outlived the sandbox"


@pytest.fixture
def sb(sandbox_box):
    """The module's sandbox; after the test: the server works and nothing is left behind."""
    yield sandbox_box
    deadline = time.monotonic() + 3
    stray = sandbox_box.audit()["stray_processes"]
    while stray and time.monotonic() < deadline:
        time.sleep(0.05)
        stray = sandbox_box.audit()["stray_processes"]
    assert stray == [], f"processes left behind: {stray}"
    check = sandbox_box.run("print(sum(range(10)))")
    assert check.status == "ok" and check.stdout == "45\n", check
