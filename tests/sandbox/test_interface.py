"""Both sandboxes implement the `sandbox.Sandbox` protocol; environments accept any that does."""

from __future__ import annotations

import inspect

import pytest

import sandbox
from sandbox import ExecutionResult, LocalSandbox, Sandbox, SandboxSession, Session
from sandbox.docker import DockerSandbox
from sandbox.pool import WorkerPoolSandbox

PROTOCOL_METHODS = ["run", "run_many", "session", "close", "__enter__", "__exit__"]


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [LocalSandbox, DockerSandbox], ids=lambda c: c.__name__)
def test_both_sandboxes_implement_the_protocol(cls):
    # DockerSandbox cannot be built without an engine, so the class is checked, member by
    # member and signature by signature (the protocol has methods only, so issubclass works).
    assert issubclass(cls, Sandbox)
    for name in PROTOCOL_METHODS:
        if name.startswith("__"):
            continue
        assert _parameters(getattr(cls, name)) == _parameters(getattr(Sandbox, name)), name


def test_docker_shares_the_pool_instead_of_overriding_local_internals():
    assert not issubclass(DockerSandbox, LocalSandbox)
    assert issubclass(DockerSandbox, WorkerPoolSandbox)
    assert issubclass(LocalSandbox, WorkerPoolSandbox)
    # the pool's behaviour is defined once: neither sandbox redefines it
    for name in ["run", "run_many", "arun", "session", "close", "start", "_acquire"]:
        assert name not in vars(LocalSandbox) and name not in vars(DockerSandbox), name


def test_an_unstarted_local_sandbox_and_its_session_are_instances():
    sb = LocalSandbox(workers=1)  # nothing starts before the first call
    try:
        assert isinstance(sb, Sandbox)
        assert issubclass(Session, SandboxSession)
    finally:
        sb.close()


def test_protocol_is_exported():
    assert "Sandbox" in sandbox.__all__ and "SandboxSession" in sandbox.__all__


class _FakeSession:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def run(self, code: str) -> ExecutionResult:
        self.log.append(code)
        return ExecutionResult("42\n", "", "ok", 0, 0.0, False)

    def close(self) -> None:
        self.log.append("closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FakeSandbox:
    """Any object with the protocol's methods is a sandbox (no subclassing needed)."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def run(self, code, limits=None):
        return _FakeSession(self.log).run(code)

    def run_many(self, codes, limits=None):
        return [self.run(c, limits) for c in codes]

    def session(self, limits=None):
        return _FakeSession(self.log)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_python_tool_env_runs_on_any_protocol_implementation():
    import envs

    fake = _FakeSandbox()
    assert isinstance(fake, Sandbox)
    env = envs.make("alp/PythonTool-v0", dataset="arith", split="test", sandbox=fake)
    env.reset(options={"problem_id": "arith-test-0"})
    _, _, terminated, _, _ = env.step("Let me compute.\n```python\nprint(6 * 7)\n```\n")
    assert fake.log[0] == "print(6 * 7)"
    env.close()
