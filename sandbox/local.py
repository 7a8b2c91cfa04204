"""LocalSandbox: a pool of warm fork servers on this host, plus notebook-like sessions.

Example (runs on any Linux host; full isolation needs root):
    >>> from sandbox import LocalSandbox, Limits
    >>> with LocalSandbox(limits=Limits(timeout_s=2.0), workers=1) as sb:
    ...     print(sb.run("print(6 * 7)").stdout, end="")
    ...     with sb.session() as s:
    ...         _ = s.run("x = 20")
    ...         print(s.run("print(x + 1)").stdout, end="")
    42
    21
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from . import audit, isolation
from .limits import Limits
from .pool import (
    HOST_GRACE_S,
    MAX_CODE_BYTES,
    SCRUBBED_ENV,
    STARTUP_TIMEOUT_S,
    SandboxUnavailable,
    Session,
    WorkerPoolSandbox,
    _Worker,
)

__all__ = [
    "HOST_GRACE_S",
    "MAX_CODE_BYTES",
    "SCRUBBED_ENV",
    "STARTUP_TIMEOUT_S",
    "LocalSandbox",
    "SandboxUnavailable",
    "Session",
]


class _HostWorker(_Worker):
    """A worker whose server is a process on this host."""

    def _launch(self) -> tuple[subprocess.Popen, int, int]:
        """Start the server; returns (process, fd to write requests, fd to read replies)."""
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(SCRUBBED_ENV, PYTHONPATH=package_parent)
        command = [*self.server_command, "--request-fd", str(request_r), "--reply-fd", str(reply_w)]
        try:
            process = subprocess.Popen(
                command,
                env=env,
                cwd="/",
                pass_fds=(request_r, reply_w),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                start_new_session=True,
            )
        finally:
            os.close(request_r)
            os.close(reply_w)
        return process, request_w, reply_r

    def _after_stop(self, process: subprocess.Popen) -> None:
        """Clean-up once the server is gone: the launcher removes its cgroups itself, but
        not if it was killed."""
        isolation.CgroupManager.remove_all(self.launcher_pid or process.pid)


class LocalSandbox(WorkerPoolSandbox):
    """Runs untrusted Python snippets in warm, isolated fork servers on this host.

    Args:
        limits: default Limits for every call (``Limits()`` if None).
        workers: number of servers = snippets that run at once (default: CPU count).
        allow_unisolated: run code even when the probe finds no isolation at all. Only for
            trusted code on hosts without namespaces/root; a warning is logged on every start.
        isolate: False skips the namespaces/uid/seccomp layers on purpose (for trusted code;
            still needs ``allow_unisolated=True``).
        hide_paths: directories hidden from snippets besides /root and /home (default: the
            current working directory; the Python installation inside stays visible).

    ``isolation`` is the probed IsolationReport; ``isolation.level`` is full | partial | none.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        workers: int | None = None,
        *,
        allow_unisolated: bool = False,
        isolate: bool = True,
        hide_paths: Sequence[str] | None = None,
    ) -> None:
        command = [sys.executable, "-m", "sandbox.server"]
        if not isolate:
            command.append("--no-isolation")
        hide = list(hide_paths) if hide_paths is not None else [os.getcwd()]
        for path in hide:
            command += ["--hide", os.path.abspath(path)]
        self._server_command = command
        super().__init__(
            limits,
            workers,
            lambda index: _HostWorker(command, index),
            allow_unisolated=allow_unisolated,
        )

    @property
    def launcher_pids(self) -> list[int]:
        """Host pids of the servers' launchers (they name the slot uids and cgroups)."""
        return [w.launcher_pid for w in self._workers if w.launcher_pid]

    def audit(self) -> dict:
        """What is alive now: the kernels each server tracks (spares, sessions) and every
        host process under one of this sandbox's slot uids. ``stray_processes`` lists those
        that belong to no tracked kernel, or more than one process per idle kernel (a
        snippet that left something behind); it should always be empty between calls."""
        kernel_uids: list[int] = []
        for worker in self._workers:
            acquired = self._acquire(worker)
            try:
                reply = worker.request({"op": "ping"}, 5.0) or {}
            finally:
                self._release(acquired)
            kernel_uids += reply.get("kernel_uids", [])
        processes = audit.processes_of_servers(self.launcher_pids)
        seen: set[int] = set()
        stray = []
        for pid, uid in processes:
            if uid not in kernel_uids or uid in seen:
                stray.append((pid, uid))
            seen.add(uid)
        return {"kernel_uids": kernel_uids, "processes": processes, "stray_processes": stray}
