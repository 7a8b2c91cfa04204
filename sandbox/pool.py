"""The part every sandbox shares: a pool of warm fork servers, and notebook-like sessions.

`WorkerPoolSandbox` owns the pool (start, close, run, run_many, sessions); a worker owns one
server and says where it runs: `sandbox.local` starts it as a host process, `sandbox.docker`
inside a container. Both sandboxes implement the `sandbox.Sandbox` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from . import isolation, protocol
from .limits import Limits
from .result import ExecutionResult

logger = logging.getLogger("sandbox")

# The server's whole environment. Nothing from the caller's environment is passed on, so a
# snippet cannot read the trainer's secrets (fork copies the raw environment block, so
# scrubbing later inside the server would not be enough).
SCRUBBED_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

STARTUP_TIMEOUT_S = 120.0
# Larger code is refused before it reaches a server (the request channel carries at most
# protocol.MAX_MESSAGE_BYTES; a bigger request would cost the worker and every session on it).
MAX_CODE_BYTES = 16 * 1024 * 1024
# Extra seconds the host waits beyond a snippet's timeout before declaring the server hung.
HOST_GRACE_S = 10.0


def _too_large(code: str) -> ExecutionResult | None:
    """An ``error`` result for code over MAX_CODE_BYTES (scored like any failing snippet)."""
    size = len(code.encode("utf-8", "surrogatepass"))
    if size <= MAX_CODE_BYTES:
        return None
    message = f"ValueError: the code is {size} bytes; at most {MAX_CODE_BYTES} are accepted\n"
    return ExecutionResult("", message, "error", 1, 0.0, False)


class SandboxUnavailable(RuntimeError):
    """Raised when no isolation is available and the caller did not opt in."""


class _Worker:
    """One warm server process and the lock that serialises requests to it.

    Subclasses say where the server runs (`_launch`) and what to clean up after it.
    """

    def __init__(self, server_command: list[str], index: int) -> None:
        self.server_command = server_command
        self.index = index
        self.lock = threading.Lock()
        self.sessions = 0
        self.generation = 0  # bumped on every (re)start; sessions notice a restart
        self.abandoned: list[tuple[int, int]] = []  # (generation, kernel id) to close
        self.process: subprocess.Popen | None = None
        self.isolation: isolation.IsolationReport | None = None
        self.launcher_pid: int | None = None
        self._log = None

    # The caller holds self.lock for everything below.

    def start(self) -> None:
        self._log = tempfile.TemporaryFile(prefix="alp-sandbox-server-")  # noqa: SIM115
        self.process, self.request_w, self.reply_r = self._launch()
        hello = self._read_reply(time.monotonic() + STARTUP_TIMEOUT_S)
        if not hello or not hello.get("hello"):
            log = self.log_tail()
            self.stop()
            raise RuntimeError(f"sandbox server failed to start; its log ends with:\n{log}")
        self.launcher_pid = hello["launcher_pid"]
        self.isolation = isolation.IsolationReport.from_dict(hello["isolation"])
        self.generation += 1

    def _launch(self) -> tuple[subprocess.Popen, int, int]:
        """Start the server; returns (process, fd to write requests, fd to read replies)."""
        raise NotImplementedError

    def _after_stop(self, process: subprocess.Popen) -> None:
        """Clean-up once the server process is gone (nothing by default)."""

    def dispose(self) -> None:
        """Release what outlives the server process (e.g. its container); the pool is closed."""

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError):
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-n:]
        return ""

    def _read_reply(self, deadline: float) -> dict | None:
        """One message from the server, or None if it died or missed the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([self.reply_r], [], [], remaining)
        if not ready:
            return None
        try:
            return protocol.read_message(self.reply_r)
        except (protocol.ProtocolError, OSError):
            return None

    def request(self, message: dict, timeout_s: float) -> dict | None:
        """Send and wait; on failure the server is killed and restarted and None returned."""
        if self.process is None or self.process.poll() is not None:
            self.restart()
        while self.abandoned:  # kernels of sessions garbage-collected without close()
            generation, kid = self.abandoned.pop()
            if generation == self.generation:
                self._exchange({"op": "close", "kid": kid}, 5.0)
        return self._exchange(message, timeout_s)

    def _exchange(self, message: dict, timeout_s: float) -> dict | None:
        try:
            protocol.write_message(self.request_w, message)
            reply = self._read_reply(time.monotonic() + timeout_s + HOST_GRACE_S)
        except OSError:
            reply = None
        if reply is None or "server_error" in (reply or {}):
            detail = (reply or {}).get("server_error") or self.log_tail(500)
            logger.warning("sandbox worker %d failed (%s); restarting it", self.index, detail)
            self.restart()
            return None
        return reply

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            protocol.write_message(self.request_w, {"op": "shutdown"})
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self._after_stop(process)
        for fd in (self.request_w, self.reply_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._log is not None:
            self._log.close()
            self._log = None


class WorkerPoolSandbox:
    """What LocalSandbox and DockerSandbox share: a pool of warm servers, one request at a time
    each, that runs snippets (`run`, `run_many`, `arun`) and hosts sessions (`session`).

    The servers are the given workers (``make_worker(index)``); where a server runs (a host
    process, a container) is the worker's business, so this class never changes with it.
    ``allow_unisolated``: start even when the servers' probe finds no isolation at all.
    """

    def __init__(
        self,
        limits: Limits | None,
        workers: int | None,
        make_worker: Callable[[int], _Worker],
        *,
        allow_unisolated: bool,
    ) -> None:
        self.limits = limits or Limits()
        self.n_workers = max(1, workers or os.cpu_count() or 1)
        self.allow_unisolated = allow_unisolated
        self._workers = [make_worker(i) for i in range(self.n_workers)]
        self._pool_lock = threading.Condition()
        self._start_lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        self._closed = False
        self._rr = 0

    # -------------------------------------------------------------- lifecycle

    def start(self) -> WorkerPoolSandbox:
        """Start the servers (done lazily by the first call; idempotent and thread-safe)."""
        with self._start_lock:
            return self._start_locked()

    def _start_locked(self) -> WorkerPoolSandbox:
        if self._started:
            return self
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed")
        threads = [threading.Thread(target=self._start_worker, args=(w,)) for w in self._workers]
        errors: list[BaseException] = []
        self._start_errors = errors
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._started = True
        if errors:
            self.close()
            raise errors[0]
        report = self.isolation
        logger.info("sandbox started: %d workers, %s", self.n_workers, report)
        if report.level == "none":
            message = (
                "sandbox: NO ISOLATION is available on this host (no namespaces, no uid drop, "
                "no seccomp); snippets run with the server's privileges. "
            )
            if not self.allow_unisolated:
                self.close()
                raise SandboxUnavailable(
                    message + "Refusing to run untrusted code. Pass allow_unisolated=True only "
                    "for trusted code, or use DockerSandbox."
                )
            warnings.warn(message + "Running anyway because allow_unisolated=True.", stacklevel=2)
            logger.warning(message)
        return self

    def _start_worker(self, worker: _Worker) -> None:
        try:
            with worker.lock:
                worker.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in start()
            self._start_errors.append(exc)

    def close(self) -> None:
        """Stop every server (killing all snippets and sessions); idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            with worker.lock:
                worker.stop()
            worker.dispose()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> WorkerPoolSandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def isolation(self) -> isolation.IsolationReport:
        """The isolation in force (the weakest of the workers')."""
        self.start()
        reports = [w.isolation for w in self._workers if w.isolation is not None]
        order = {"none": 0, "partial": 1, "full": 2}
        return min(reports, key=lambda r: order[r.level])

    # -------------------------------------------------------------- pool

    def _acquire(self, worker: _Worker | None = None) -> _Worker:
        self.start()
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed")
        with self._pool_lock:
            while True:
                candidates = [worker] if worker else self._rotated()
                for w in candidates:
                    if w.lock.acquire(blocking=False):
                        return w
                self._pool_lock.wait(0.05)

    def _rotated(self) -> list[_Worker]:
        self._rr = (self._rr + 1) % len(self._workers)
        return self._workers[self._rr :] + self._workers[: self._rr]

    def _release(self, worker: _Worker) -> None:
        worker.lock.release()
        with self._pool_lock:
            self._pool_lock.notify_all()

    # -------------------------------------------------------------- running

    def run(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` in a fresh isolated process; nothing survives the call."""
        limits = limits or self.limits
        refused = _too_large(code)
        if refused is not None:
            return refused
        worker = self._acquire()
        start = time.monotonic()
        try:
            reply = worker.request(
                {"op": "run", "code": code, "limits": limits.to_dict()}, limits.timeout_s
            )
        finally:
            self._release(worker)
        if reply is None:
            return ExecutionResult.infrastructure_error(
                "the sandbox server died or hung; it was restarted", time.monotonic() - start
            )
        return ExecutionResult.from_dict(reply)

    def run_many(self, codes: Iterable[str], limits: Limits | None = None) -> list[ExecutionResult]:
        """Run snippets concurrently (one per worker at a time); results keep input order."""
        codes = list(codes)
        if not codes:
            return []
        return list(self._pool().map(lambda c: self.run(c, limits), codes))

    async def arun(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """``run`` for asyncio code: the blocking wait happens on a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), self.run, code, limits)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=max(4, 2 * self.n_workers), thread_name_prefix="sandbox"
            )
        return self._executor

    def session(self, limits: Limits | None = None) -> Session:
        """A notebook-like session: state persists across ``run`` calls until it is closed."""
        return Session(self, limits or self.limits)


class Session:
    """Python state kept across calls, in one long-lived isolated kernel process.

    If a call kills the kernel (timeout, memory, segfault, ``os._exit``), the next call starts
    a fresh one and says so at the top of its stderr; ``restarts`` counts these.
    """

    RESTART_NOTE = "[sandbox] the previous call ended the session's process; its state was lost\n"

    def __init__(self, sandbox: WorkerPoolSandbox, limits: Limits) -> None:
        self.sandbox = sandbox
        self.limits = limits
        self.restarts = 0
        self._worker: _Worker | None = None
        self._kid: int | None = None
        self._generation = 0
        self._lost_state = False
        self._closed = False
        self._open_error = ""

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Never take locks here (the collector may run while this thread holds one): leave
        # the kernel id to the worker, which closes it before its next request.
        if not getattr(self, "_closed", True) and self._worker is not None:
            if self._kid is not None:
                self._worker.abandoned.append((self._generation, self._kid))
            self._worker.sessions -= 1
            self._closed = True

    def open(self) -> None:
        sandbox = self.sandbox
        sandbox.start()
        with sandbox._pool_lock:
            self._worker = min(sandbox._workers, key=lambda w: w.sessions)
            self._worker.sessions += 1

    def _open_kernel(self) -> bool:
        reply = self._worker.request({"op": "open", "limits": self.limits.to_dict()}, 10.0)
        if reply is None or "kid" not in reply:
            self._open_error = (reply or {}).get("error", "the server did not answer")
            return False
        self._kid, self._generation = reply["kid"], self._worker.generation
        return True

    def run(self, code: str) -> ExecutionResult:
        """Run ``code`` in this session's namespace (variables, imports and functions persist)."""
        if self._closed:
            raise RuntimeError("this session is closed")
        refused = _too_large(code)
        if refused is not None:
            return refused
        if self._worker is None:
            self.open()
        worker = self.sandbox._acquire(self._worker)
        start = time.monotonic()
        try:
            note = ""
            if self._kid is not None and (
                worker.process is None or worker.process.poll() is not None
            ):
                worker.restart()  # notice a dead server before asking it about our kernel
            if self._kid is not None and self._generation != worker.generation:
                # The server was restarted (not by this session's call): our infrastructure
                # lost the state. Running the code in a fresh namespace would score a
                # NameError against the policy; this call is a sandbox_error instead, and the
                # next one starts a fresh process.
                self._kid, self._lost_state = None, False
                self.restarts += 1
                return ExecutionResult.infrastructure_error(
                    "the sandbox server was restarted and this session's state was lost "
                    "(the code was not run)",
                    time.monotonic() - start,
                )
            if self._kid is None:
                if not self._open_kernel():
                    return ExecutionResult.infrastructure_error(
                        f"could not start a session process: {self._open_error}",
                        time.monotonic() - start,
                    )
                if self._lost_state:
                    note, self._lost_state = self.RESTART_NOTE, False
                    self.restarts += 1
            reply = worker.request(
                {"op": "exec", "kid": self._kid, "code": code}, self.limits.timeout_s
            )
            if reply is not None and reply.get("dead"):
                self._kid, self._lost_state = None, True
                return self._retry_after_dead_kernel(code, worker, start)
        finally:
            self.sandbox._release(worker)
        if reply is None:
            self._kid, self._lost_state = None, True
            return ExecutionResult.infrastructure_error(
                "the sandbox server died or hung; it was restarted", time.monotonic() - start
            )
        if not reply.pop("alive", True):
            self._kid, self._lost_state = None, True
        result = ExecutionResult.from_dict(reply)
        if note:
            result = ExecutionResult(**{**result.to_dict(), "stderr": note + result.stderr})
        return result

    def _retry_after_dead_kernel(self, code, worker, start) -> ExecutionResult:
        """The kernel was found dead before running: start a new one and run once more."""
        if not self._open_kernel():
            return ExecutionResult.infrastructure_error(
                "could not start a session process", time.monotonic() - start
            )
        self._lost_state = False
        self.restarts += 1
        reply = worker.request(
            {"op": "exec", "kid": self._kid, "code": code}, self.limits.timeout_s
        )
        if reply is None or reply.get("dead"):
            self._kid = None
            return ExecutionResult.infrastructure_error(
                "the session process died before running", time.monotonic() - start
            )
        if not reply.pop("alive", True):
            self._kid, self._lost_state = None, True
        result = ExecutionResult.from_dict(reply)
        return ExecutionResult(**{**result.to_dict(), "stderr": self.RESTART_NOTE + result.stderr})

    def close(self) -> None:
        """Kill the session's process and everything it started."""
        if self._closed:
            return
        self._closed = True
        worker = self._worker
        if worker is None:
            return
        if self._kid is not None and not self.sandbox._closed:
            acquired = self.sandbox._acquire(worker)
            try:
                if self._generation == worker.generation:
                    worker.request({"op": "close", "kid": self._kid}, 5.0)
            finally:
                self.sandbox._release(acquired)
        with self.sandbox._pool_lock:
            worker.sessions -= 1
