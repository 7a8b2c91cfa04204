"""The warm fork server: one per worker, started by LocalSandbox (or inside a Docker container).

Start-up (``python -m sandbox.server --request-fd R --reply-fd W``), in order:

1. unshare the per-server namespaces (mount, network, ipc, uts, pid) and fork: the child is
   PID 1 of the new pid namespace and becomes the server, the parent (the "launcher") only
   waits for it and removes the server's cgroups afterwards, even if the server was killed;
2. pre-import numpy, sympy and the stdlib modules math code uses, and warm them up;
3. mount a private ``/proc`` (hidepid) and build the read-only allow-list root for kernels;
4. ``gc.freeze()``, then fork the clean *template* (see zygote.py): it never handles a
   request, and every kernel descends from it, never from the server;
5. probe the per-kernel layers end to end with a real kernel (uid drop + lazy imports, seccomp,
   cgroups, allow-list root) and keep only those that work;
6. say hello to the host with the isolation report, then serve requests one at a time.

Requests (JSON, see protocol.py): ``run`` (a stateless snippet: fork a kernel, run, kill),
``open`` / ``exec`` / ``close`` (sessions), ``ping``. The server must keep working whatever a
snippet does: nothing a kernel writes is parsed beyond a fixed-size record, every failure is
confined to the run that caused it, and the status of a run comes from what the server
observed itself (its timers, the exit status reported by the zygote, cgroup counters, the
output it counted). Its environment is the scrubbed one the host started it with.
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
from . import zygote as zyg
from .kernel import CODE_FD, DONE, FLAG_MEMORY_ERROR, READY, RECORD, SETUP_FAILED
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
import os, json, xml.dom.minidom  # a module the server did not pre-import: lazy imports work
status = open('/proc/self/status').read()
print(json.dumps({
    "uid": os.getuid(),
    "seccomp": status.split('Seccomp:')[1].split()[0],
    "cgroup_hidden": 'alp-sandbox-' not in open('/proc/self/cgroup').read(),
    "sys_hidden": not os.path.exists('/sys/fs/cgroup'),
}))
"""
SETUP_DEADLINE_S = 20.0  # a kernel that is not ready by then is an infrastructure failure
STATUS_WAIT_S = 5.0  # how long to wait for the zygote's report of a kernel's exit status
SPARES = 2  # pre-forked kernels kept ready per server


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


class TemplateGone(Exception):  # noqa: N818 - not an error of a run: the worker must restart
    """The clean template died. A new one forked now would come from a server that has held
    requests, so the server gives up and the host restarts the worker."""


class Zygote:
    """The server's handle on one slot's zygote."""

    def __init__(self, slot: int, pid: int, sock: socket.socket, state: dict) -> None:
        self.slot, self.pid, self.sock, self.state = slot, pid, sock, state
        self.exits: dict[int, int] = {}  # kernel pid (zygote's view) -> wait status
        self.alive = True


class PendingKernel:
    """A spawn request sent to a zygote whose reply (the kernel's pid and pidfd) is not read
    yet: a spare being forked while the server serves."""

    def __init__(self, slot, uid, cgroups, zygote, fds, limits):
        self.slot, self.uid, self.cgroups, self.zygote = slot, uid, cgroups, zygote
        self.fds, self.limits = fds, limits


class Kernel:
    """The server's handle on one kernel."""

    def __init__(self, kid, pid, local_pid, pidfd, slot, uid, cgroups, zygote, fds, limits):
        self.kid, self.pid, self.local_pid, self.pidfd = kid, pid, local_pid, pidfd
        self.slot, self.uid, self.cgroups, self.zygote = slot, uid, cgroups, zygote
        self.code_w, self.done_r, self.out_r, self.err_r = fds
        self.limits = limits
        self.wait_status: int | None = None
        self.ready = False  # its readiness record was read (before any code was sent)
        self.frozen = False
        self.cells = 0
        self.seq = 0  # cells sent; completion records carry it

    def fds(self):
        return (self.code_w, self.done_r, self.out_r, self.err_r, self.pidfd)


def _poll(readers, writers, timeout: float) -> tuple[set[int], set[int]]:
    """poll(2) on descriptors (select(2) breaks above fd 1023, sessions open many)."""
    poller = select.poll()
    for fd in readers:
        poller.register(fd, select.POLLIN)
    for fd in writers:
        poller.register(fd, select.POLLOUT | (select.POLLIN if fd in readers else 0))
    ready_r, ready_w = set(), set()
    readable = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL
    for fd, events in poller.poll(max(0.0, timeout) * 1000):
        if events & readable and fd in readers:
            ready_r.add(fd)
        if events & (select.POLLOUT | select.POLLERR | select.POLLHUP) and fd in writers:
            ready_w.add(fd)
    return ready_r, ready_w


# The main thread of a kernel that finished its cell is blocked in read(CODE_FD, ...): the
# server checks that in /proc/<pid>/syscall ("<number> <fd> ..."). Where the file or the
# syscall number is unknown, the claim is taken as it is (the freezer still bounds it).
_READ_SYSCALL = {"x86_64": "0", "aarch64": "63", "riscv64": "63", "ppc64le": "3", "s390x": "3"}
_READ_SYSCALL_HERE = (
    _READ_SYSCALL[os.uname().machine].encode() if os.uname().machine in _READ_SYSCALL else None
)
IDLE_RECHECK_S = 0.0002


IDLE_SPINS = 20  # checks (yielding the CPU in between) before sleeping


def _code_read_state(pid: int) -> bool | None:
    """True if the kernel's main thread is blocked reading the code pipe, False if not (yet),
    None if this cannot be seen here (no /proc/<pid>/syscall access, unknown architecture)."""
    number = _READ_SYSCALL_HERE
    if number is None:
        return None
    try:
        fields = _read_proc(f"/proc/{pid}/syscall").split()
    except OSError:
        return None
    if not fields or fields[0] != number:
        return False
    return len(fields) > 1 and int(fields[1], 16) == CODE_FD


def _waiting_for_code(pid: int, spins: int = 1) -> bool:
    """Whether the kernel's main thread is blocked reading the code pipe. The kernel gets
    there microseconds after its record, so the first checks yield the CPU to it. Where this
    cannot be seen, the claim is believed (``verified_completion`` is then off)."""
    for attempt in range(spins):
        state = _code_read_state(pid)
        if state is not False:
            return state is None or state
        if attempt + 1 < spins:
            os.sched_yield()
    return False


def _in_slot_cgroups(pid: int) -> bool:
    """Whether ``pid`` (a zygote; its kernels inherit) is in a slot cgroup, seen from here."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return isolation.CgroupManager.PREFIX in f.read()
    except OSError:
        return False


def _read_proc(path: str) -> bytes:
    """A small /proc file in one read (no Python file object: this is on every run's path)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _pid_of_pidfd(pidfd: int) -> int:
    for line in _read_proc(f"/proc/self/fdinfo/{pidfd}").split(b"\n"):
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    raise OSError("no Pid in the pidfd's fdinfo")


def _parse_claim(record: bytes, seq: int) -> tuple[int, int] | None | bool:
    """Scan completion records: (exit code, flags) of the one for cell ``seq``; None while
    there is none yet (records of earlier cells are stale and skipped); False when the bytes
    are not records at all (the snippet wrote garbage on the descriptor: fail closed)."""
    for offset in range(0, len(record) - RECORD.size + 1, RECORD.size):
        tag, number, value, flags = RECORD.unpack_from(record, offset)
        if tag != DONE:
            return False
        if number == seq:
            return value, flags
    return None


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
        self.zygotes: dict[int, Zygote] = {}
        self.next_kid = 1
        # Pre-forked kernels for the next calls, oldest first (a Kernel, or a PendingKernel
        # while its zygote forks it); SPARES of them, with the limits of the last call.
        self.spares: list[Kernel | PendingKernel] = []
        self.spare_limits: Limits | None = None
        self.after_reply: list[Kernel] = []  # stateless kernels: killed after the reply
        self.to_freeze: list[Kernel] = []  # session kernels: frozen after the reply
        self.draining: list[Kernel] = []  # killed; their slot is free once it is empty
        self.template_sock: socket.socket | None = None
        self.template_pid: int | None = None
        self.template_options: dict = {}

    # -------------------------------------------------------------- template and zygotes

    def start_template(self, options: dict) -> None:
        """Fork the clean template (call before handling any request; see zygote.py)."""
        self.stop_template()
        self.template_options = dict(options)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                zyg.template_main(theirs, options, self.seccomp_filter)
            finally:
                os._exit(70)
        theirs.close()
        self.template_sock, self.template_pid = ours, pid
        hello, _ = self._receive(ours, time.monotonic() + SETUP_DEADLINE_S)
        if not hello or not hello.get("hello"):
            raise TemplateGone("the template did not start")
        if options.get("root") and not hello.get("root"):
            self.report.file_allowlist = False
            self.report.notes.append(hello.get("note") or "file_allowlist: not entered")
        self.report.clean_template = True

    def stop_template(self) -> None:
        """Kill the template; its zygotes and their kernels die with it."""
        if self.template_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.template_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.template_pid, 0)
        if self.template_sock is not None:
            self.template_sock.close()
        for z in self.zygotes.values():
            z.alive = False
            with contextlib.suppress(OSError):
                z.sock.close()
        self.zygotes = {}
        self.template_sock = self.template_pid = None

    def _receive(self, sock: socket.socket, deadline: float) -> tuple[dict | None, list[int]]:
        """One message by the deadline; (None, []) on timeout, ({}, []) when the peer is
        gone."""
        remaining = deadline - time.monotonic()
        ready, _ = _poll([sock.fileno()], [], remaining)
        if not ready:
            return None, []
        message, fds = zyg.recv(sock)
        return ({}, fds) if message is None else (message, fds)

    def _zygote(self, slot: int, cgroups: isolation.SlotCgroups | None) -> Zygote:
        z = self.zygotes.get(slot)
        while z is not None and z.alive:  # file its reports; notice if it is gone
            message, _ = self._pump(z, time.monotonic(), want_reply=False)
            if message is None:
                break
        if z is not None and z.alive:
            return z
        if self.template_sock is None:
            raise TemplateGone("no template process")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            zyg.send(self.template_sock, {"op": "zygote"}, [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise TemplateGone(f"the template is gone: {exc}") from exc
        finally:
            theirs.close()
        deadline = time.monotonic() + SETUP_DEADLINE_S
        reply, fds = self._receive(self.template_sock, deadline)
        for fd in fds:
            os.close(fd)
        if not reply or "pid" not in reply:
            ours.close()
            raise TemplateGone(f"the template did not fork a zygote: {reply}")
        hello, fds = self._receive(ours, deadline)
        for fd in fds:
            os.close(fd)
        if not hello or not hello.get("hello"):
            ours.close()
            with contextlib.suppress(OSError):
                os.kill(reply["pid"], signal.SIGKILL)
            raise RuntimeError("a zygote did not start")
        z = Zygote(slot, reply["pid"], ours, hello)
        if cgroups is not None:
            cgroups.join(z.pid)  # its kernels are born in the slot's cgroups
        self.zygotes[slot] = z
        return z

    def _pump(self, z: Zygote, deadline: float, want_reply: bool):
        """Read the zygote's messages until a reply (want_reply) or the deadline; exit
        reports are filed on the way. Returns (reply, fds) or (None, [])."""
        while z.alive:
            message, fds = self._receive(z.sock, deadline)
            if message is None:
                return None, []  # the deadline passed
            if not message:
                z.alive = False  # the zygote is gone
                for fd in fds:
                    os.close(fd)
                return None, []
            if "exit" in message:
                z.exits[int(message["exit"])] = int(message["status"])
                if not want_reply:
                    return message, fds
                continue
            if want_reply:
                return message, fds
            for fd in fds:
                os.close(fd)
        return None, []

    # -------------------------------------------------------------- kernels

    def spawn(self, limits: Limits) -> Kernel:
        return self._complete(self._request_spawn(limits))

    def _request_spawn(self, limits: Limits) -> PendingKernel:
        """Ask a free slot's zygote to fork a kernel; the reply is read by ``_complete``, so
        the fork (milliseconds for a warm heap) need not hold up the server."""
        if not self.free_slots:
            self._reclaim_slots(wait_s=2.0)
        if not self.free_slots:
            raise RuntimeError("no free slot (too many open sessions on this worker)")
        slot = self.free_slots.pop()
        try:
            return self._request_in(slot, limits)
        except BaseException:
            self.free_slots.append(slot)
            raise

    def _request_in(self, slot: int, limits: Limits) -> PendingKernel:
        cgroups = None
        if self.cgroup_manager.bases:
            cgroups = self.slot_cgroups.get(slot) or self.cgroup_manager.slot(slot)
            self.slot_cgroups[slot] = cgroups
            cgroups.configure(limits.memory_mb, limits.max_processes)
        z = self._zygote(slot, cgroups)
        uid = isolation.slot_uid(self.launcher_pid, slot) if self.report.uid_drop else None
        code_r, code_w = os.pipe()
        done_r, done_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        request = {
            "op": "spawn",
            "uid": uid,
            "seccomp": bool(self.report.seccomp and self.seccomp_filter is not None),
            "private_tmp": self.report.private_tmp,
            "limits": limits.to_dict(),
        }
        try:
            zyg.send(z.sock, request, [out_w, err_w, code_r, done_w])
        except OSError as exc:
            z.alive = False
            for fd in (code_r, code_w, done_r, done_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise RuntimeError(f"the slot's zygote is gone: {exc}") from exc
        for fd in (code_r, done_w, out_w, err_w):
            os.close(fd)
        return PendingKernel(slot, uid, cgroups, z, (code_w, done_r, out_r, err_r), limits)

    def _complete(self, pending: PendingKernel) -> Kernel:
        """Read the zygote's reply to a spawn request: the kernel (registered), or
        RuntimeError (its slot is free again)."""
        z = pending.zygote
        try:
            reply, fds = self._pump(z, time.monotonic() + SETUP_DEADLINE_S, want_reply=True)
            if not reply or "pid" not in reply or len(fds) != 1:
                for fd in (*fds, *pending.fds):
                    os.close(fd)
                raise RuntimeError(f"the zygote did not fork a kernel: {reply}")
            pidfd = fds[0]
            try:
                pid = _pid_of_pidfd(pidfd)
                for fd in pending.fds:
                    os.set_blocking(fd, False)
            except OSError:
                for fd in (pidfd, *pending.fds):
                    os.close(fd)
                raise
        except BaseException:
            self.free_slots.append(pending.slot)
            raise
        z.exits.pop(int(reply["pid"]), None)  # a stale report for an earlier kernel's pid
        kernel = Kernel(
            self.next_kid,
            pid,
            int(reply["pid"]),
            pidfd,
            pending.slot,
            pending.uid,
            pending.cgroups,
            z,
            pending.fds,
            pending.limits,
        )
        self.next_kid += 1
        self.kernels[kernel.kid] = kernel
        return kernel

    def _alive(self, kernel: Kernel) -> bool:
        if kernel.wait_status is not None:
            return False
        with contextlib.suppress(OSError, ValueError):
            ready, _ = _poll([kernel.pidfd], [], 0)
            return not ready
        return False

    def _slot_pids(self, kernel: Kernel) -> list[int]:
        """Processes of the kernel's slot (its zygote excluded)."""
        if kernel.cgroups is not None:
            return [p for p in kernel.cgroups.pids() if p != kernel.zygote.pid]
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
        """PID 1 duty (only the template is our child; the zygotes reap the slots)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def kill(self, kernel: Kernel) -> None:
        """SIGKILL the kernel and everything it started, without waiting for them to exit.

        Every process listed in the slot is signalled until no new one appears; a process
        with a pending SIGKILL cannot fork any more, so this converges even for fork bombs.
        A frozen slot is thawed after the signals, so its processes die without running.
        The slot is reused only once it is empty (see ``_reclaim_slots``).
        """
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(kernel.pidfd, signal.SIGKILL)
        self._kill_slot(kernel)
        if kernel.cgroups is not None:
            kernel.cgroups.thaw()
        kernel.frozen = False
        for fd in kernel.fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.kernels.pop(kernel.kid, None) is not None:
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
        """Return drained slots (no process left but the zygote) to the free list."""
        deadline = time.monotonic() + wait_s
        while self.draining:
            still = []
            for kernel in self.draining:
                if kernel.zygote.alive and self._slot_pids(kernel):
                    self._kill_slot(kernel)
                    if kernel.cgroups is not None:
                        kernel.cgroups.thaw()
                    still.append(kernel)
                else:
                    self.free_slots.append(kernel.slot)
            self.draining = still
            self.reap_orphans()
            if not still or time.monotonic() >= deadline:
                return
            time.sleep(0.002)

    def _wait_status(self, kernel: Kernel) -> int | None:
        """The kernel's wait status as the zygote (its parent) reported it."""
        if kernel.wait_status is None:
            deadline = time.monotonic() + STATUS_WAIT_S
            z = kernel.zygote
            while kernel.local_pid not in z.exits and z.alive and time.monotonic() < deadline:
                self._pump(z, deadline, want_reply=False)
            kernel.wait_status = z.exits.pop(kernel.local_pid, None)
        return kernel.wait_status

    def _await_ready(self, kernel: Kernel, deadline: float) -> str | None:
        """Read the readiness record (written before any code was sent, so trusted).
        Returns None when ready, else what went wrong."""
        record = b""
        while len(record) < RECORD.size:
            ready, _ = _poll([kernel.done_r, kernel.pidfd], [], deadline - time.monotonic())
            if not ready:
                return "the kernel did not become ready in time"
            if kernel.done_r in ready:
                chunk = _read_some(kernel.done_r)
                if chunk == b"":
                    break
                record += chunk or b""
            elif kernel.pidfd in ready:
                record += _read_some(kernel.done_r) or b""
                break
        if len(record) < RECORD.size:
            return "the kernel died while setting up"
        tag, _, value, _ = RECORD.unpack_from(record)
        if tag == READY and len(record) == RECORD.size:
            kernel.ready = True
            return None
        if tag == SETUP_FAILED:
            text = record[RECORD.size : RECORD.size + max(0, min(value, 1000))]
            return f"kernel set-up failed: {text.decode('utf-8', 'replace')}"
        return "the kernel's readiness record was malformed"

    def execute(
        self, kernel: Kernel, code: str, limits: Limits, filename: str, oneshot: bool
    ) -> dict:
        """Run one cell in ``kernel``; returns an ExecutionResult dict. Kills the kernel on
        timeout, output flood, malformed record or death; freezes a session's kernel once
        its cell is done."""
        out = HeadTailBuffer(limits.max_output_bytes)
        err = HeadTailBuffer(limits.max_output_bytes)
        start = time.monotonic()
        if not kernel.ready:
            problem = self._await_ready(kernel, start + SETUP_DEADLINE_S)
            if problem is not None:
                self.kill(kernel)
                return _result(out, err, "sandbox_error", None, time.monotonic() - start, problem)
        # Discard what background threads left over, and any record an earlier cell forged.
        for fd in (kernel.out_r, kernel.err_r, kernel.done_r):
            _drain(fd, None)
        cgroups = kernel.cgroups
        oom_before = cgroups.oom_kills() if cgroups else 0
        fail_before = cgroups.failcnt() if cgroups else 0
        start = time.monotonic()
        deadline = start + limits.timeout_s
        kernel.seq += 1
        message = {"code": code, "filename": filename, "oneshot": oneshot, "seq": kernel.seq}
        payload = protocol.encode(message)
        pending = memoryview(payload)
        if kernel.frozen and cgroups is not None:
            # Queue the code first, then thaw: the kernel wakes once, with its cell there.
            with contextlib.suppress(BlockingIOError, OSError):
                pending = pending[os.write(kernel.code_w, pending[: 1 << 16]) :]
            cgroups.thaw()
            kernel.frozen = False
        readers = {kernel.out_r, kernel.err_r, kernel.done_r, kernel.pidfd}
        record = bytearray()
        verdict = None
        claim = None
        recheck = IDLE_RECHECK_S
        while verdict is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                verdict = "timeout"
                break
            if claim:
                # A completion claim counts only once the server sees the kernel's main
                # thread waiting for the next cell (blocked reading the code pipe): a claim
                # written while the snippet goes on computing does not end the call.
                if _waiting_for_code(kernel.pid, spins=IDLE_SPINS):
                    verdict = "done"
                    break
                remaining = min(remaining, recheck)
                recheck = min(recheck * 2, 0.02)
            ready, writable = _poll(readers, [kernel.code_w] if pending else [], remaining)
            if writable:
                try:
                    pending = pending[os.write(kernel.code_w, pending[: 1 << 16]) :]
                except BlockingIOError:
                    pass
                except OSError:
                    pending = pending[:0]  # the kernel closed its end: its exit tells why
            for fd, sink in ((kernel.out_r, out), (kernel.err_r, err)):
                if fd in ready and _drain(fd, sink):
                    readers.discard(fd)  # end of file: never poll it again
            if out.total + err.total > limits.max_output_bytes:
                verdict = "output_limit"
                break
            if kernel.done_r in ready:
                chunk = _read_some(kernel.done_r)
                if chunk == b"":
                    readers.discard(kernel.done_r)
                elif chunk:
                    if len(record) < 1 << 16:
                        record += chunk
                    claim = _parse_claim(record, kernel.seq)
                    if claim is False:
                        verdict = "malformed"
            if kernel.pidfd in ready:
                verdict = "exited"
        duration = time.monotonic() - start
        if verdict in ("timeout", "output_limit", "malformed"):
            self.kill(kernel)
        elif verdict == "done" and cgroups is not None and not oneshot:
            # Nothing of the session runs between calls: frozen right after the reply is
            # written (tidy), before the server reads its next request.
            self.to_freeze.append(kernel)
        _drain(kernel.out_r, out)
        _drain(kernel.err_r, err)
        wait_status = self._wait_status(kernel) if verdict == "exited" else None
        status, exit_code = self._classify(
            kernel,
            verdict,
            claim,
            _parse_claim(bytes(record), kernel.seq),
            wait_status,
            oom_before,
            fail_before,
        )
        note = None
        if verdict == "malformed":
            note = "[sandbox] malformed completion record from the snippet; the run was stopped"
        elif status == "sandbox_error":
            note = "sandbox error: the kernel's exit status was not reported"
        elif status == "timeout":
            note = f"TimeoutError: the snippet exceeded its {limits.timeout_s:g} s limit"
        elif status == "memory" and (exit_code is None or exit_code < 0):
            note = f"MemoryError: the snippet exceeded its {limits.memory_mb} MB limit"
        elif status == "output_limit":
            note = f"\n[output exceeded {limits.max_output_bytes} bytes; the snippet was stopped]"
        elif status == "killed" and exit_code is not None and exit_code < 0:
            name = (
                signal.Signals(-exit_code).name
                if -exit_code in signal.valid_signals()
                else str(-exit_code)
            )
            note = f"the snippet was killed by signal {name}"
        result = _result(out, err, status, exit_code, duration, note)
        result["truncated"] = result["truncated"] or status == "output_limit"
        return result

    def _classify(self, kernel, verdict, claim, claimed, wait_status, oom_before, fail_before):
        """The status from what the server observed; the kernel's own claim only ever
        chooses between outcomes the snippet controls anyway (exit code, MemoryError)."""
        cgroups = kernel.cgroups
        oom = cgroups is not None and cgroups.oom_kills() > oom_before
        pressed = cgroups is not None and cgroups.failcnt() > fail_before
        if verdict == "timeout":
            return ("memory" if pressed else "timeout"), None
        if verdict == "output_limit":
            return "output_limit", None
        if verdict == "malformed":
            return "error", None
        if verdict == "done":
            exit_code, flags = claim
            # As the OS reduces an exit status (sys.exit(256) is 0); a negative exit code
            # always means a signal the server saw, never a claimed number.
            exit_code &= 0xFF
            if flags & FLAG_MEMORY_ERROR:
                return "memory", exit_code
            return ("ok" if exit_code == 0 else "error"), exit_code
        if wait_status is None:
            return "sandbox_error", None
        if os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            if oom:
                return "memory", -sig
            if sig == signal.SIGXCPU:
                return "timeout", -sig
            return "killed", -sig
        code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else 1
        if oom:
            return "memory", code
        if code and claimed and claimed[0] & 0xFF == code and claimed[1] & FLAG_MEMORY_ERROR:
            return "memory", code
        return ("ok" if code == 0 else "error"), code

    # -------------------------------------------------------------- requests

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {
                "ok": True,
                "kernel_uids": sorted(
                    [k.uid for k in self.kernels.values() if k.uid] + self._spare_uids()
                ),
            }
        limits = Limits.from_dict(request["limits"]) if "limits" in request else Limits()
        if op == "run":
            start = time.monotonic()
            try:
                kernel = self._fresh_kernel(limits)
            except (RuntimeError, OSError) as exc:  # this run fails, the server does not
                return _infra(f"could not start a kernel: {exc}", start)
            self.after_reply.append(kernel)  # killed once the host has its answer
            return self._guarded(kernel, request["code"], limits, "<snippet>", True, start)
        if op == "open":
            try:
                kernel = self._fresh_kernel(limits)
            except (RuntimeError, OSError) as exc:  # out of slots: the caller's problem
                return {"error": str(exc)}
            return {"kid": kernel.kid}
        if op == "exec":
            kernel = self.kernels.get(request["kid"])
            if kernel is None or not self._alive(kernel):
                if kernel is not None:
                    self.kill(kernel)
                return {"dead": True}
            kernel.cells += 1
            start = time.monotonic()
            code, filename = request["code"], f"<cell {kernel.cells}>"
            result = self._guarded(kernel, code, kernel.limits, filename, False, start)
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

    def _guarded(self, kernel, code, limits, filename, oneshot, start) -> dict:
        """execute(), with any failure of ours confined to this run (never the server)."""
        try:
            return self.execute(kernel, code, limits, filename, oneshot)
        except Exception as exc:  # our bug: this run is a sandbox_error, the rest goes on
            print(f"sandbox server: execute failed: {exc!r}", file=sys.stderr)
            self.kill(kernel)
            return _infra(f"{type(exc).__name__}: {exc}", start)

    def _fresh_kernel(self, limits: Limits) -> Kernel:
        """The oldest pre-forked spare kernel if it matches ``limits``, else a new one.

        Forking and locking down a kernel costs a few ms; doing it for the NEXT calls right
        after replying takes it off the round trip. Two spares: a kernel forked after the
        previous call may still be setting up when the next one arrives; the one forked a
        call earlier is ready. Spares with other limits are discarded.
        """
        self.spare_limits = limits
        while self.spares:
            spare = self.spares.pop(0)
            if spare.limits != limits:
                self._discard(spare)
                continue
            try:
                kernel = spare if isinstance(spare, Kernel) else self._complete(spare)
            except (RuntimeError, OSError):
                continue  # that spare failed; the next one, or a new kernel
            if self._alive(kernel):
                return kernel
            self.kill(kernel)
        return self.spawn(limits)

    def _discard(self, spare: Kernel | PendingKernel) -> None:
        if isinstance(spare, PendingKernel):
            try:
                spare = self._complete(spare)
            except (RuntimeError, OSError):
                return
        self.kill(spare)

    def _spare_uids(self) -> list[int]:
        return [s.uid for s in self.spares if isinstance(s, PendingKernel) and s.uid]

    def tidy(self) -> None:
        """Work done after the reply is sent: kill finished kernels, fork the next spare."""
        while self.to_freeze:
            kernel = self.to_freeze.pop()
            if kernel.kid in self.kernels and kernel.cgroups is not None:
                kernel.frozen = kernel.cgroups.freeze()
        # Slots drained since an earlier call first: a kernel killed just now is still dying
        # (its slot lists it for a few ms), so checking it here would only read the slot's
        # members and signal it again; the next tidy (or a spawn short of slots) does that.
        self.reap_orphans()
        self._reclaim_slots()
        while self.after_reply:
            kernel = self.after_reply.pop()
            if kernel.kid in self.kernels:
                self.kill(kernel)
        while len(self.spares) < SPARES and self.spare_limits is not None and self.free_slots:
            self.spares.append(self._request_spawn(self.spare_limits))

    def probe(self) -> None:
        """Run a real kernel; drop the layers that do not work end to end."""
        limits = Limits(timeout_s=20.0, cpu_s=20.0)
        for _ in range(5):
            kernel = self.spawn(limits)
            state = kernel.zygote.state
            # A ready kernel waits for its first cell: the completion check must see that.
            if self._await_ready(kernel, time.monotonic() + SETUP_DEADLINE_S) is None:
                waiting, until = False, time.monotonic() + SETUP_DEADLINE_S
                while waiting is False and time.monotonic() < until and self._alive(kernel):
                    waiting = _code_read_state(kernel.pid)
                    if waiting is False:
                        time.sleep(0.002)
                self.report.verified_completion = waiting is True
            result = self._guarded(kernel, PROBE_CODE, limits, "<probe>", True, time.monotonic())
            if kernel.kid in self.kernels:
                self.kill(kernel)
            self._reclaim_slots(wait_s=2.0)
            if result["status"] == "ok":
                found = json.loads(result["stdout"])
                if self.report.uid_drop and int(found["uid"]) == 0:
                    self.report.uid_drop = False
                if self.report.seccomp and found["seccomp"] != "2":
                    self.report.seccomp = False
                if not _in_slot_cgroups(kernel.zygote.pid):
                    self.report.cgroup_memory = self.report.cgroup_pids = False
                    self.report.cgroup_freezer = self.report.cgroup_cpu = False
                if self.report.file_allowlist and not found["sys_hidden"]:
                    self.report.file_allowlist = False
                self.report.slot_pid_namespace = bool(state.get("pid_namespace"))
                self.report.slot_network_namespace = bool(state.get("network_namespace"))
                self.report.notes.extend(state.get("notes") or [])
                return
            # Turn off the most likely culprit and try again.
            self.report.notes.append(f"probe failed: {result['stderr'].strip()[-300:]}")
            if self.report.seccomp:
                self.report.seccomp = False
            elif self.report.uid_drop:
                self.report.uid_drop = False
            elif self.report.private_tmp:
                self.report.private_tmp = False
            elif self.template_options.get("root"):
                self.report.file_allowlist = False
                self.start_template({**self.template_options, "root": None})
            else:
                return

    def shutdown(self) -> None:
        spares, self.spares = self.spares, []
        for spare in spares:
            with contextlib.suppress(Exception):
                self._discard(spare)
        for kernel in list(self.kernels.values()):
            self.kill(kernel)
        self._reclaim_slots(wait_s=2.0)
        self.stop_template()
        for cgroups in self.slot_cgroups.values():
            for pid in cgroups.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            cgroups.thaw()
        deadline = time.monotonic() + 2.0
        for cgroups in self.slot_cgroups.values():
            while cgroups.pids() and time.monotonic() < deadline:
                time.sleep(0.005)
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


def _result(out, err, status, exit_code, duration, note=None) -> dict:
    if note:
        err.write(f"{note}\n".encode())
    return {
        "stdout": out.getvalue().decode("utf-8", "replace"),
        "stderr": err.getvalue().decode("utf-8", "replace"),
        "status": status,
        "exit_code": exit_code,
        "duration_s": duration,
        "truncated": out.truncated or err.truncated,
    }


def _infra(message: str, start: float) -> dict:
    return {
        "stdout": "",
        "stderr": f"sandbox error: {message}\n",
        "status": "sandbox_error",
        "exit_code": None,
        "duration_s": time.monotonic() - start,
        "truncated": False,
    }


def _read_some(fd: int) -> bytes | None:
    """Available bytes, b"" at end of file, None when nothing is there yet."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _drain(fd: int, sink: HeadTailBuffer | None, budget: int = 1 << 24) -> bool:
    """Read what is available now (never wait for EOF: grandchildren may hold the pipe).
    Returns True at end of file (the caller stops polling the descriptor)."""
    while budget > 0:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        budget -= len(data)
        if sink is not None:
            sink.write(data)
    return False


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
        # Both taken before the fork: the launcher shares its mount namespace with the server,
        # which mounts its pid namespace's /proc over /proc, where the launcher has no entry.
        cgroup_bases = isolation.own_cgroup_bases()
        host_proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
        child = os.fork()
        if child:
            return _launcher(child, launcher_pid, args, cgroup_bases, host_proc)
        os.close(host_proc)  # the host's /proc must never reach the template or a kernel
        # (getppid() is 0 here: the launcher lives outside our pid namespace, so the usual
        # "did the parent die before prctl" check cannot be made; the window is microseconds.)
        isolation.set_parent_death_signal(signal.SIGKILL)
    modules_before = set(sys.modules)
    preimport()  # after the fork: the launcher stays a small process
    root = None
    if report.mount_namespace:
        isolation.setup_server_mounts(report)
        if not args.no_isolation:
            root = isolation._staging_dir()
            try:
                allowed = isolation.allowed_top_level(modules_before)
                shown = isolation.build_root(
                    root, allowed, [os.path.realpath(h) for h in args.hide]
                )
                report.file_allowlist = report.hidden_home = True
                report.notes.append("packages visible: " + ",".join(sorted(set(shown))))
            except OSError as exc:
                report.notes.append(f"file_allowlist: {exc}")
                with contextlib.suppress(OSError):
                    isolation.umount(root)
                root = None
    if report.uts_namespace:
        scrubbed_hostname()
    server = Server(launcher_pid, report)
    if args.no_isolation:
        report.uid_drop = report.seccomp = report.private_tmp = False
        report.cgroup_memory = report.cgroup_pids = False
        report.cgroup_freezer = report.cgroup_cpu = False
        server.cgroup_manager.bases = {}
        report.notes.append("isolation disabled by the caller")
    gc.collect()
    gc.freeze()
    # Before the template is forked: the kernels' fork and exit copy and tear down one
    # page-table entry per huge page instead of 512 (see collapse_anonymous_memory).
    collapsed = isolation.collapse_anonymous_memory()
    report.notes.append(f"huge pages: {collapsed >> 20} MiB of the warm heap")
    # The template is forked here, before the first request: kernels never descend from a
    # process that held another run's code or output.
    server.start_template(
        {
            "root": root,
            "pid_namespace": report.pid_namespace and not args.no_isolation,
            "network_namespace": report.network_namespace and not args.no_isolation,
        }
    )
    server.probe()
    protocol.write_message(
        args.reply_fd, {"hello": True, "launcher_pid": launcher_pid, "isolation": report.to_dict()}
    )
    try:
        server.serve(args.request_fd, args.reply_fd)
    finally:
        server.shutdown()
    return 0


PF_EXITING = 0x4  # include/linux/sched.h: the task has begun to exit


def _is_exiting(host_proc: int, pid: int) -> bool:
    """Whether ``pid`` has begun to exit, read through a /proc directory fd of the host's."""
    try:
        fd = os.open(f"{pid}/stat", os.O_RDONLY, dir_fd=host_proc)
        try:
            stat = os.read(fd, 4096)
        finally:
            os.close(fd)
        return bool(int(stat.rsplit(b")", 1)[1].split()[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):
        return False


def _launcher(
    child: int, launcher_pid: int, args, cgroup_bases: dict[str, str], host_proc: int
) -> int:
    """The parent outside the pid namespace: wait for the server, then clean its cgroups
    (the backstop for a server that died without removing them, e.g. during start-up).

    A killed server is the init of its pid namespace: it cannot be reaped before every
    process of the namespace is gone, and a session kernel frozen between calls never goes
    until it is thawed. So the launcher does not just wait: while the server is exiting it
    kills and thaws what is left in its cgroups (``remove_all``), which lets it finish."""
    for fd in (args.request_fd, args.reply_fd):
        os.close(fd)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    try:
        exit_fd = os.pidfd_open(child)  # readable once the server can be reaped
    except (AttributeError, OSError):
        exit_fd = None
    status = 0
    while True:
        try:
            pid, status = os.waitpid(child, os.WNOHANG)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid:
            break
        if _is_exiting(host_proc, child):
            isolation.CgroupManager.remove_all(launcher_pid, wait_s=0.2, bases=cgroup_bases)
        with contextlib.suppress(InterruptedError):
            if exit_fd is None:
                time.sleep(0.2)
            else:
                select.select([exit_fd], [], [], 0.2)
    time.sleep(0.01)
    isolation.CgroupManager.remove_all(launcher_pid, bases=cgroup_bases)
    return os.waitstatus_to_exitcode(status) if status else 0


if __name__ == "__main__":
    sys.exit(main())
