"""sandbox: fast, isolated execution of untrusted Python snippets, with stateful sessions.

    >>> from sandbox import LocalSandbox, Limits
    >>> with LocalSandbox(limits=Limits(timeout_s=3.0), workers=1) as sb:
    ...     sb.run("print(1)").stdout
    '1\\n'

`Sandbox` is the interface environments use; `LocalSandbox` and `DockerSandbox` implement it.
See docs/sandbox.md for the isolation layers, the defaults and the measured speed.
"""

from .interface import Sandbox, SandboxSession
from .isolation import IsolationReport
from .limits import Limits
from .local import LocalSandbox, SandboxUnavailable, Session
from .result import STATUSES, ExecutionResult, Status

__all__ = [
    "STATUSES",
    "DockerSandbox",
    "ExecutionResult",
    "IsolationReport",
    "Limits",
    "LocalSandbox",
    "Sandbox",
    "SandboxSession",
    "SandboxUnavailable",
    "Session",
    "Status",
]


def __getattr__(name: str):
    if name == "DockerSandbox":  # imported lazily: it needs the optional `docker` package
        from .docker import DockerSandbox

        return DockerSandbox
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
