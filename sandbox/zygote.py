"""The clean template and the per-slot zygotes: trusted processes whose only job is to fork.

Why: a kernel forked from the server itself would inherit the server's heap, which holds
earlier requests' code and output (freed buffers, live frames) of every session on the
worker. Instead the server forks the *template* once, after warming up and before it handles
any request; the template never reads a request or a byte of output. It forks one *zygote*
per slot (lazily), and the zygote forks that slot's kernels. So a kernel's memory is a copy of
a process that never held a request.

A zygote is PID 1 of a pid namespace of its own, in a network namespace of its own, with a
``/proc`` for that pid namespace: kernels of different slots cannot see each other's pids
(``kill(pid, 0)``, ``getpgid``, ``pidfd_open`` say "no such process") nor reach each other
through abstract unix sockets. The server moves the zygote into the slot's cgroups once, so
every kernel it forks is born inside them (no migration per run). As PID 1 it reaps whatever
the snippets orphan and reports each kernel's exit status to the server, which is where the
status of a stateless run comes from.

Protocol: SOCK_SEQPACKET socketpairs, one JSON object per packet, file descriptors attached
with SCM_RIGHTS. Both ends are trusted (server, template, zygote); no snippet holds them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket

from . import isolation
from .kernel import KernelSetup, hide_own_modules, kernel_main
from .limits import Limits

MAX_PACKET = 1 << 16


def send(sock: socket.socket, message: dict, fds: list[int] | tuple = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock: socket.socket, max_fds: int = 8) -> tuple[dict | None, list[int]]:
    """One message and its descriptors; (None, []) when the other side is gone."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, max_fds)
    except (ConnectionError, OSError):
        return None, []
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def _keep_only(keep: int) -> None:
    """Close every descriptor but ``keep`` (and 0-2): nothing of the server's reaches here."""
    top = os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536
    os.closerange(3, keep)
    os.closerange(keep + 1, top)


def _wakeup_pipe() -> int:
    """A pipe that becomes readable on SIGCHLD (returns the read end)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    return r


def _drain_wakeup(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass


def template_main(sock: socket.socket, options: dict, seccomp_filter) -> None:
    """The clean template (child of the server). Never returns.

    ``options``: root (the allow-list root to pivot into, or None), pid_namespace and
    network_namespace (make them per slot).
    """
    isolation.set_parent_death_signal(signal.SIGKILL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    _keep_only(sock.fileno())
    # In a container the server talks to the host on fds 0 and 1: never hold those open.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        if fd != sock.fileno():
            os.dup2(devnull, fd)
    if devnull not in (0, 1, sock.fileno()):
        os.close(devnull)
    own_pid_ns = None
    if options.get("pid_namespace"):
        own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    hello = {"hello": True, "root": False}
    heap = isolation.anonymous_ranges()  # /proc is gone once the root is entered
    if options.get("root"):
        try:
            isolation.unshare(isolation.CLONE_NEWNS)
            isolation.enter_root(options["root"])
            hello["root"] = True
        except OSError as exc:  # the server reports the layer off
            hello["note"] = f"file_allowlist: entering the root failed: {exc}"
    if own_pid_ns is not None:
        hello["pid_namespace"] = True
    hide_own_modules()
    # Its own start-up wrote into (and so split) some of the server's huge pages: back them
    # with huge pages again before any zygote is forked (see collapse_anonymous_memory).
    isolation.collapse_anonymous_memory(heap)
    send(sock, hello)
    wake = _wakeup_pipe()
    while True:
        ready, _, _ = select.select([sock, wake], [], [])
        if wake in ready:
            _drain_wakeup(wake)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
        if sock not in ready:
            continue
        message, fds = recv(sock)
        if message is None:
            os._exit(0)  # the server is gone
        if message.get("op") != "zygote" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            send(sock, {"error": "bad request"})
            continue
        error = None
        if own_pid_ns is not None:
            try:
                isolation.unshare(isolation.CLONE_NEWPID)
            except OSError as exc:
                error = f"slot pid namespace: {exc}"
        pid = os.fork()
        if pid == 0:
            try:
                zygote_main(socket.socket(fileno=fds[0]), options, seccomp_filter, error)
            finally:
                os._exit(70)
        os.close(fds[0])
        if own_pid_ns is not None and error is None:
            isolation.setns(own_pid_ns, isolation.CLONE_NEWPID)
        send(sock, {"pid": pid})


def zygote_main(sock: socket.socket, options: dict, seccomp_filter, pid_ns_error) -> None:
    """One slot's zygote. Never returns."""
    isolation.set_parent_death_signal(signal.SIGKILL)  # dies with the template
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    _keep_only(sock.fileno())
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")  # the OOM killer of the slot's cgroup must pick the kernel, not us
    notes = []
    state = {"pid_namespace": False, "network_namespace": False}
    if pid_ns_error:
        notes.append(pid_ns_error)
    if options.get("network_namespace"):
        try:
            isolation.unshare(isolation.CLONE_NEWNET)
            state["network_namespace"] = True
        except OSError as exc:
            notes.append(f"slot network namespace: {exc}")
    in_own_pid_ns = bool(options.get("pid_namespace")) and not pid_ns_error and os.getpid() == 1
    if in_own_pid_ns or options.get("root"):
        # A /proc for this slot's pid namespace (the allow-list root has none of its own;
        # without a pid namespace of its own, one of the server's, still hidepid=2).
        try:
            isolation.unshare(isolation.CLONE_NEWNS)
            isolation.mount_own_proc()
            state["pid_namespace"] = in_own_pid_ns
        except OSError as exc:
            notes.append(f"slot /proc: {exc}")
    wake = _wakeup_pipe()
    scratch = isolation.scratch_targets()  # the same for every kernel of the slot
    send(sock, {"hello": True, "notes": notes, **state})
    kernels: set[int] = set()
    while True:
        ready, _, _ = select.select([sock, wake], [], [])
        if wake in ready:
            _drain_wakeup(wake)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in kernels:
                    kernels.discard(pid)
                    send(sock, {"exit": pid, "status": status})
        if sock not in ready:
            continue
        message, fds = recv(sock)
        if message is None:
            os._exit(0)
        if message.get("op") != "spawn" or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            send(sock, {"error": "bad request"})
            continue
        setup = KernelSetup(
            uid=message.get("uid"),
            seccomp_filter=seccomp_filter if message.get("seccomp") else None,
            private_tmp=bool(message.get("private_tmp")),
            limits=Limits.from_dict(message["limits"]),
            parent_pid=os.getpid(),
            scratch=scratch,
        )
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                os.close(wake)
                kernel_main(setup, tuple(fds))
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        kernels.add(pid)
        pidfd = os.pidfd_open(pid)
        send(sock, {"pid": pid}, [pidfd])
        os.close(pidfd)
