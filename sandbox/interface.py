"""The interface environments program against: `Sandbox` and the sessions it opens.

`LocalSandbox` (warm fork servers on this host) and `DockerSandbox` (the same servers inside
locked-down containers) both implement it; an environment that takes ``sandbox=`` accepts
either, or any other object with these methods (a fake in a test, a remote pool).

    >>> from sandbox import LocalSandbox, Sandbox
    >>> isinstance(LocalSandbox(workers=1), Sandbox)   # nothing starts until the first call
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from .limits import Limits
from .result import ExecutionResult


@runtime_checkable
class SandboxSession(Protocol):
    """Python state kept across ``run`` calls until ``close`` (one isolated kernel process)."""

    def run(self, code: str) -> ExecutionResult:
        """Run ``code`` in the session's namespace (variables, imports, functions persist)."""
        ...

    def close(self) -> None:
        """End the session and everything it started; idempotent."""
        ...

    def __enter__(self) -> SandboxSession: ...

    def __exit__(self, *exc: Any) -> None: ...


@runtime_checkable
class Sandbox(Protocol):
    """Runs untrusted Python snippets in isolation; what `envs.PythonToolEnv` calls.

    Failures of the snippet are results (``status`` error, timeout, memory, ...), never
    exceptions; a failure of the infrastructure is a result with status ``sandbox_error``.
    """

    def run(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` in a fresh process; nothing survives the call."""
        ...

    def run_many(self, codes: Iterable[str], limits: Limits | None = None) -> list[ExecutionResult]:
        """Run snippets concurrently; results keep input order."""
        ...

    def session(self, limits: Limits | None = None) -> SandboxSession:
        """A notebook-like session whose state persists across its ``run`` calls."""
        ...

    def close(self) -> None:
        """Stop everything (snippets and sessions); idempotent."""
        ...

    def __enter__(self) -> Sandbox: ...

    def __exit__(self, *exc: Any) -> None: ...
