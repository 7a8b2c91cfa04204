"""The warm fork server: one per worker, started by LocalSandbox (or inside a Docker container).

Start-up (``python -m sandbox.server --request-fd R --reply-fd W``), in order:

1. unshare the per-server namespaces (mount, network, ipc, uts, pid) and fork: the child is
   PID 1 of the new pid namespace and becomes the server, the parent (the "launcher") only
   waits for it and removes the server's cgroups afterwards, even if the server was killed;
2. pre-import numpy, sympy and the stdlib modules math code uses, and warm them up;
3. mount a private ``/proc`` (hidepid) and hide home directories and the caller's directory;
4. probe the per-kernel layers end to end with a real kernel (uid drop + lazy imports, seccomp,
   cgroups) and keep only those that work;
5. ``gc.freeze()`` so forked kernels share the warm heap copy-on-write without GC touching it;
6. say hello to the host with the isolation report, then serve requests one at a time.

Requests (JSON, see protocol.py): ``run`` (a stateless snippet: fork a kernel, run, kill),
``open`` / ``exec`` / ``close`` (sessions), ``ping``. The server must keep working whatever a
snippet does; its environment is the scrubbed one the host started it with.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import time

from . import isolation, protocol
from .kernel import KernelSetup, kernel_main
from .limits import Limits
from .result import HeadTailBuffer

PREIMPORTED = [
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "heapq",
    "bisect",
    "statistics",
    "random",
    "re",
    "string",
    "json",
    "datetime",
    "operator",
    "typing",
    "dataclasses",
    "copy",
    "textwrap",
    "io",
    "array",
    "numbers",
    "enum",
    "threading",
    "traceback",
    "linecache",
    "numpy",
    "sympy",
]

PROBE_CODE = """
import os, xml.dom.minidom  # a module the server did not pre-import: lazy imports must work
status = open('/proc/self/status').read()
seccomp = status.split('Seccomp:')[1].split()[0]
cgroups = open('/proc/self/cgroup').read()
print(os.getuid(), seccomp, 'alp-sandbox-' in cgroups)
"""


def preimport() -> None:
    for name in PREIMPORTED:
        __import__(name)
    import numpy as np
    import sympy as sp

    np.linalg.inv(np.eye(3) + 1)
    np.random.default_rng(0).normal(size=4).sum()
    x = sp.Symbol("x")
    sp.solve(x**2 - 2, x)
    sp.simplify(sp.sin(x) ** 2 + sp.cos(x) ** 2)
    sp.factorint(360)
    sp.Rational(1, 3) + sp.Integer(2)
    sp.latex(sp.sqrt(2) / 3)
    sp.integrate(x**2, x)


class Kernel:
    """The server's handle on one forked kernel."""

    def __init__(self, kid, pid, slot, uid, cgroups, code_w, done_r, out_r, err_r, limits):
        self.kid, self.pid, self.slot, self.uid = kid, pid, slot, uid
        self.cgroups = cgroups
        self.code_w, self.done_r, self.out_r, self.err_r = code_w, done_r, out_r, err_r
        self.limits = limits
        self.pidfd = os.pidfd_open(pid)
        self.wait_status: int | None = None
        self.cells = 0

    def fds(self):
        return (self.code_w, self.done_r, self.out_r, self.err_r, self.pidfd)


class Server:
    def __init__(self, launcher_pid: int, report: isolation.IsolationReport):
        self.launcher_pid = launcher_pid
        self.report = report
        self.cgroup_manager = isolation.CgroupManager(launcher_pid, report)
        self.seccomp_filter = None
        try:
            self.seccomp_filter = isolation.SeccompProgram()
            report.seccomp = True
        except Exception as exc:  # pyseccomp or libseccomp missing
            report.notes.append(f"seccomp: {exc}")
        report.uid_drop = os.getuid() == 0
        if not report.uid_drop:
            report.notes.append("uid_drop: the server is not root")
        report.private_tmp = report.mount_namespace
        self.free_slots = list(range(isolation.SLOTS_PER_SERVER - 1, -1, -1))
        self.kernels: dict[int, Kernel] = {}
        self.slot_cgroups: dict[int, isolation.SlotCgroups] = {}
        self.next_kid = 1
        self.spare: Kernel | None = None
        self.spare_limits: Limits | None = None
        self.after_reply: list[Kernel] = []
        self.dying: dict[int, Kernel] = {}  # killed, not yet reaped (pid -> kernel)
        self.draining: list[Kernel] = []  # killed; their slot is free once it is empty

    # -------------------------------------------------------------- kernels

    def spawn(self, limits: Limits) -> Kernel:
        if not self.free_slots:
            self._reclaim_slots(wait_s=2.0)
        if not self.free_slots:
            raise RuntimeError("no free slot (too many open sessions on this worker)")
        slot = self.free_slots.pop()
        cgroups = None
        if self.cgroup_manager.bases:
            cgroups = self.slot_cgroups.get(slot) or self.cgroup_manager.slot(slot)
            self.slot_cgroups[slot] = cgroups
            cgroups.configure(limits.memory_mb, limits.max_processes)
        uid = isolation.slot_uid(self.launcher_pid, slot) if self.report.uid_drop else None
        code_r, code_w = os.pipe()
        done_r, done_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        setup = KernelSetup(
            uid=uid,
            cgroups=cgroups,
            seccomp_filter=self.seccomp_filter if self.report.seccomp else None,
            private_tmp=self.report.private_tmp,
            limits=limits,
            server_pid=os.getpid(),
        )
        pid = os.fork()
        if pid == 0:
            try:
                kernel_main(setup, (out_w, err_w, code_r, done_w))
            finally:
                os._exit(70)
        for fd in (code_r, done_w, out_w, err_w):
            os.close(fd)
        for fd in (done_r, out_r, err_r):
            os.set_blocking(fd, False)
        kernel = Kernel(
            self.next_kid, pid, slot, uid, cgroups, code_w, done_r, out_r, err_r, limits
        )
        self.next_kid += 1
        self.kernels[kernel.kid] = kernel
        return kernel

    def _alive(self, kernel: Kernel) -> bool:
        if kernel.wait_status is not None:
            return False
        try:
            pid, status = os.waitpid(kernel.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = kernel.pid, 0
        if pid:
            kernel.wait_status = status
            return False
        return True

    def _slot_pids(self, kernel: Kernel) -> list[int]:
        if kernel.cgroups is not None:
            return kernel.cgroups.pids()
        if kernel.uid is None:
            return []
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{name}").st_uid == kernel.uid:
                        pids.append(int(name))
        return pids

    def reap_orphans(self) -> None:
        """PID 1 duty: collect re-parented grandchildren, remember our kernels' statuses."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            kernel = self.dying.pop(pid, None) or self._by_pid.get(pid)
            if kernel is not None:
                kernel.wait_status = status

    @property
    def _by_pid(self) -> dict[int, Kernel]:
        return {k.pid: k for k in self.kernels.values()}

    def kill(self, kernel: Kernel) -> None:
        """SIGKILL the kernel and everything it started, without waiting for them to exit.

        Every process listed in the slot is signalled until no new one appears; a process
        with a pending SIGKILL cannot fork any more, so this converges even for fork bombs.
        The slot is reused only once it is empty (see ``_reclaim_slots``).
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(kernel.pid, signal.SIGKILL)
        self._kill_slot(kernel)
        for fd in kernel.fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kernels.pop(kernel.kid, None)
        if kernel.wait_status is None:
            self.dying[kernel.pid] = kernel
        self.draining.append(kernel)

    def _kill_slot(self, kernel: Kernel) -> list[int]:
        signalled: set[int] = set()
        while True:
            fresh = [p for p in self._slot_pids(kernel) if p not in signalled]
            if not fresh:
                return sorted(signalled)
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            signalled.update(fresh)

    def _reclaim_slots(self, wait_s: float = 0.0) -> None:
        """Return drained slots (no process left) to the free list."""
        deadline = time.monotonic() + wait_s
        while self.draining:
            still = []
            for kernel in self.draining:
                if self._slot_pids(kernel):
                    self._kill_slot(kernel)
                    still.append(kernel)
                else:
                    self.free_slots.append(kernel.slot)
            self.draining = still
            self.reap_orphans()
            if not still or time.monotonic() >= deadline:
                return
            time.sleep(0.002)

    def execute(self, kernel: Kernel, code: str, limits: Limits, filename: str) -> dict:
        """Run one cell in ``kernel``; returns an ExecutionResult dict. Kills the kernel on
        timeout, output flood or death (the caller decides about the healthy case)."""
        out = HeadTailBuffer(limits.max_output_bytes)
        err = HeadTailBuffer(limits.max_output_bytes)
        # Discard what background threads left over, and any completion message a previous
        # cell forged or left behind, so this cell's answer is read in step.
        for fd in (kernel.out_r, kernel.err_r, kernel.done_r):
            _drain(fd, None)
        oom_before = kernel.cgroups.oom_kills() if kernel.cgroups else 0
        fail_before = kernel.cgroups.failcnt() if kernel.cgroups else 0
        start = time.monotonic()
        deadline = start + limits.timeout_s
        done = None
        verdict = None
        with contextlib.suppress(OSError):  # a dead kernel: its exit status tells why
            protocol.write_message(kernel.code_w, {"code": code, "filename": filename})
        watch = [kernel.out_r, kernel.err_r, kernel.done_r, kernel.pidfd]
        done_buffer = b""
        while done is None and verdict is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                verdict = "timeout"
                break
            ready, _, _ = select.select(watch, [], [], remaining)
            if kernel.out_r in ready:
                _drain(kernel.out_r, out)
            if kernel.err_r in ready:
                _drain(kernel.err_r, err)
            if out.total + err.total > limits.max_output_bytes:
                verdict = "output_limit"
                break
            if kernel.done_r in ready:
                chunk = _read_some(kernel.done_r)
                done_buffer += chunk or b""
                parsed = _parse_done(done_buffer)
                if parsed is not None:
                    done = parsed
                elif not chunk:
                    watch.remove(kernel.done_r)
            if kernel.pidfd in ready and done is None:
                verdict = "died"
        duration = time.monotonic() - start
        if verdict is not None:
            self.kill(kernel)
        _drain(kernel.out_r, out)
        _drain(kernel.err_r, err)
        status, exit_code = self._classify(kernel, done, verdict, oom_before, fail_before)
        if done is not None and "setup_error" in done:
            status, exit_code = "sandbox_error", None
            err.write(f"sandbox error: kernel set-up failed: {done['setup_error']}\n".encode())
        if status == "timeout":
            err.write(
                f"TimeoutError: the snippet exceeded its {limits.timeout_s:g} s limit\n".encode()
            )
        elif status == "memory" and done is None:
            err.write(
                f"MemoryError: the snippet exceeded its {limits.memory_mb} MB limit\n".encode()
            )
        elif status == "output_limit":
            err.write(
                f"\n[output exceeded {limits.max_output_bytes} bytes; the snippet was stopped]\n".encode()
            )
        elif status == "killed" and exit_code is not None and exit_code < 0:
            name = (
                signal.Signals(-exit_code).name
                if -exit_code in signal.valid_signals()
                else str(-exit_code)
            )
            err.write(f"the snippet was killed by signal {name}\n".encode())
        return {
            "stdout": out.getvalue().decode("utf-8", "replace"),
            "stderr": err.getvalue().decode("utf-8", "replace"),
            "status": status,
            "exit_code": exit_code,
            "duration_s": duration,
            "truncated": out.truncated or err.truncated or status == "output_limit",
        }

    def _classify(self, kernel, done, verdict, oom_before, fail_before):
        oom = kernel.cgroups is not None and kernel.cgroups.oom_kills() > oom_before
        if done is not None and "setup_error" not in done:
            exit_code = int(done.get("exit") or 0) if isinstance(done.get("exit"), int) else 1
            if done.get("exc") == "MemoryError":
                return "memory", exit_code
            if done.get("exc") == "RecursionError" or exit_code != 0:
                return "error", exit_code
            return ("ok" if exit_code == 0 else "error"), exit_code
        if verdict == "timeout" and kernel.cgroups and kernel.cgroups.failcnt() > fail_before:
            return "memory", None  # timed out while pressed against its memory limit
        if verdict in ("timeout", "output_limit"):
            return verdict, None
        if done is not None:  # setup_error
            return "sandbox_error", None
        # The kernel process ended before reporting completion.
        if kernel.wait_status is None:
            with contextlib.suppress(ChildProcessError):
                _, kernel.wait_status = os.waitpid(kernel.pid, 0)
        self.dying.pop(kernel.pid, None)
        status = kernel.wait_status or 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if oom:
                return "memory", -sig
            if sig == signal.SIGXCPU:
                return "timeout", -sig
            return "killed", -sig
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
        if oom:
            return "memory", code
        return ("ok" if code == 0 else "error"), code

    # -------------------------------------------------------------- requests

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {
                "ok": True,
                "kernel_uids": sorted(k.uid for k in self.kernels.values() if k.uid),
            }
        limits = Limits.from_dict(request["limits"]) if "limits" in request else Limits()
        if op == "run":
            kernel = self._fresh_kernel(limits)
            result = self.execute(kernel, request["code"], limits, "<snippet>")
            self.after_reply.append(kernel)  # killed once the host has its answer
            return result
        if op == "open":
            try:
                kernel = self._fresh_kernel(limits)
            except RuntimeError as exc:  # out of slots: the caller's problem, not a crash
                return {"error": str(exc)}
            return {"kid": kernel.kid}
        if op == "exec":
            kernel = self.kernels.get(request["kid"])
            if kernel is None or not self._alive(kernel):
                if kernel is not None:
                    self.kill(kernel)
                return {"dead": True}
            kernel.cells += 1
            result = self.execute(kernel, request["code"], kernel.limits, f"<cell {kernel.cells}>")
            result["alive"] = kernel.kid in self.kernels and self._alive(kernel)
            if kernel.kid in self.kernels and not result["alive"]:
                self.kill(kernel)
            return result
        if op == "close":
            kernel = self.kernels.get(request["kid"])
            if kernel is not None:
                self.kill(kernel)
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def _fresh_kernel(self, limits: Limits) -> Kernel:
        """The pre-forked spare kernel if it matches ``limits``, else a new one.

        Forking and locking down a kernel (cgroup migration especially) costs several ms; doing
        it for the NEXT call right after replying takes it off the round trip.
        """
        spare, self.spare = self.spare, None
        self.spare_limits = limits
        if spare is not None:
            if spare.limits == limits and self._alive(spare):
                return spare
            self.kill(spare)
        return self.spawn(limits)

    def tidy(self) -> None:
        """Work done after the reply is sent: kill finished kernels, fork the next spare."""
        while self.after_reply:
            kernel = self.after_reply.pop()
            if kernel.kid in self.kernels:
                self.kill(kernel)
        self.reap_orphans()
        self._reclaim_slots()
        if self.spare is None and self.spare_limits is not None and self.free_slots:
            self.spare = self.spawn(self.spare_limits)

    def probe(self) -> None:
        """Run a real kernel; drop the layers that do not work end to end."""
        limits = Limits(timeout_s=20.0, cpu_s=20.0)
        for _ in range(3):
            kernel = self.spawn(limits)
            result = self.execute(kernel, PROBE_CODE, limits, "<probe>")
            if kernel.kid in self.kernels:
                self.kill(kernel)
            if result["status"] == "ok":
                uid, seccomp, in_cgroup = result["stdout"].split()
                if self.report.uid_drop and int(uid) == 0:
                    self.report.uid_drop = False
                if self.report.seccomp and seccomp != "2":
                    self.report.seccomp = False
                if in_cgroup != "True":
                    self.report.cgroup_memory = self.report.cgroup_pids = False
                return
            # Turn off the most likely culprit and try again.
            self.report.notes.append(f"probe failed: {result['stderr'].strip()[-300:]}")
            if self.report.seccomp:
                self.report.seccomp = False
            elif self.report.uid_drop:
                self.report.uid_drop = False
            else:
                self.report.private_tmp = False

    def shutdown(self) -> None:
        self.spare = None
        for kernel in list(self.kernels.values()):
            self.kill(kernel)
        self._reclaim_slots(wait_s=2.0)
        for cgroups in self.slot_cgroups.values():
            cgroups.remove()

    def serve(self, request_fd: int, reply_fd: int) -> None:
        while True:
            try:
                request = protocol.read_message(request_fd)
            except protocol.ProtocolError:
                return  # the host went away
            if request.get("op") == "shutdown":
                return
            try:
                reply = self.handle(request)
            except Exception as exc:  # our bug or bad request: report, keep serving
                reply = {"server_error": f"{type(exc).__name__}: {exc}"}
            protocol.write_message(reply_fd, reply)
            try:
                self.tidy()
            except Exception as exc:  # never leave the host without a server
                print(f"sandbox server: tidy failed: {exc!r}", file=sys.stderr)


def _read_some(fd: int) -> bytes | None:
    """Available bytes, b"" at end of file, None when nothing is there yet."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _parse_done(buffer: bytes) -> dict | None:
    if len(buffer) < 4:
        return None
    length = int.from_bytes(buffer[:4], "big")
    if len(buffer) < 4 + length:
        return None
    try:
        message = json.loads(buffer[4 : 4 + length])
    except ValueError:
        return {"exit": 1, "exc": "ProtocolError"}
    return message if isinstance(message, dict) else {"exit": 1, "exc": "ProtocolError"}


def _drain(fd: int, sink: HeadTailBuffer | None, budget: int = 1 << 24) -> None:
    """Read what is available now (never wait for EOF: grandchildren may hold the pipe)."""
    while budget > 0:
        try:
            data = os.read(fd, 1 << 16)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        budget -= len(data)
        if sink is not None:
            sink.write(data)


def scrubbed_hostname() -> None:
    with contextlib.suppress(OSError):
        socket.sethostname("sandbox")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request-fd", type=int, required=True)
    parser.add_argument("--reply-fd", type=int, required=True)
    parser.add_argument("--no-isolation", action="store_true", help="skip namespaces, uid, seccomp")
    parser.add_argument("--hide", action="append", default=[], help="directory to hide")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the host, which shuts us down
    report = isolation.IsolationReport()
    launcher_pid = os.getpid()
    if not args.no_isolation:
        isolation.enter_server_namespaces(report)
    if report.pid_namespace:
        child = os.fork()
        if child:
            return _launcher(child, launcher_pid, args)
        # (getppid() is 0 here: the launcher lives outside our pid namespace, so the usual
        # "did the parent die before prctl" check cannot be made; the window is microseconds.)
        isolation.set_parent_death_signal(signal.SIGKILL)
    preimport()  # after the fork: the launcher stays a small process
    if report.mount_namespace:
        keep = isolation.python_paths()
        hidden = ["/root", "/home", *args.hide]
        isolation.setup_server_mounts(report, hidden, keep)
    if report.uts_namespace:
        scrubbed_hostname()
    server = Server(launcher_pid, report)
    if args.no_isolation:
        report.uid_drop = report.seccomp = report.private_tmp = False
        report.cgroup_memory = report.cgroup_pids = False
        server.cgroup_manager.bases = {}
        report.notes.append("isolation disabled by the caller")
    server.probe()
    gc.collect()
    gc.freeze()
    protocol.write_message(
        args.reply_fd, {"hello": True, "launcher_pid": launcher_pid, "isolation": report.to_dict()}
    )
    try:
        server.serve(args.request_fd, args.reply_fd)
    finally:
        server.shutdown()
    return 0


def _launcher(child: int, launcher_pid: int, args) -> int:
    """The parent outside the pid namespace: wait for the server, then clean its cgroups."""
    for fd in (args.request_fd, args.reply_fd):
        os.close(fd)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 0
            break
    time.sleep(0.01)
    isolation.CgroupManager.remove_all(launcher_pid)
    return os.waitstatus_to_exitcode(status) if status else 0


if __name__ == "__main__":
    sys.exit(main())
