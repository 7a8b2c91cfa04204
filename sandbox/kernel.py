"""What runs inside a forked kernel: lock itself down, then execute snippets like a notebook.

A kernel is forked from the warm server, so numpy/sympy are already imported. It first applies
the per-kernel layers (cgroups, private scratch mounts, rlimits, its own uid, parent-death
signal, seccomp), then loops: read one code message, run it in a persistent namespace, flush,
report. A stateless call is a kernel that runs one snippet and is killed; a session is a kernel
that stays alive between calls.

File descriptors inside a kernel: 0 = /dev/null (``input()`` sees EOF), 1/2 = output pipes to
the server, 3 = code from the server, 4 = completion messages to the server. Nothing else is
open (in particular not the server's pipe to the host).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import linecache
import os
import signal
import sys
import traceback

from . import isolation, protocol

CODE_FD = 3
DONE_FD = 4


class KernelSetup:
    """Everything the child needs to lock itself down (built by the server before forking)."""

    def __init__(self, *, uid, cgroups, seccomp_filter, private_tmp, limits, server_pid):
        self.uid = uid  # None: do not drop
        self.cgroups = cgroups
        self.seccomp_filter = seccomp_filter  # None: no seccomp
        self.private_tmp = private_tmp
        self.limits = limits
        self.server_pid = server_pid


def _install_fds(stdout_w: int, stderr_w: int, code_r: int, done_w: int) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    # Move the pipes out of the way first so dup2 never clobbers one with another.
    moved = [os.dup(fd) for fd in (devnull, stdout_w, stderr_w, code_r, done_w)]
    for target, fd in enumerate(moved):
        os.dup2(fd, target)
    os.closerange(5, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)


def _lock_down(setup: KernelSetup) -> None:
    limits = setup.limits
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if setup.cgroups is not None:
        setup.cgroups.join()
    if setup.private_tmp:
        isolation.setup_kernel_tmp(limits.max_disk_mb)
        os.chdir("/tmp")
    else:
        os.chdir("/tmp")
    isolation.apply_rlimits(
        limits.cpu_s, limits.max_file_mb, limits.max_processes, setup.uid is not None
    )
    if setup.uid is not None:
        isolation.drop_privileges(setup.uid)
        os.environ["HOME"] = "/tmp"
    # setuid cleared any parent-death signal: set it now, then make sure the server did not
    # die in between (we would have been re-parented and missed the signal).
    isolation.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != setup.server_pid:
        os._exit(1)
    if setup.seccomp_filter is not None:
        setup.seccomp_filter.load()


def _fresh_streams() -> None:
    def stream(fd: int) -> io.TextIOWrapper:
        return io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )

    sys.stdout = sys.__stdout__ = stream(1)
    sys.stderr = sys.__stderr__ = stream(2)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")


def _print_exception(exc: BaseException, tb) -> None:
    """Print the traceback without our own frames: line numbers are the snippet's."""
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<"):
        tb = tb.tb_next
    text = "".join(traceback.TracebackException(type(exc), exc, tb, compact=True).format())
    sys.stderr.write(text)


def _run_cell(code: str, filename: str, namespace: dict) -> dict:
    """Execute one cell; returns the completion message for the server."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exit_code, exc_name = 0, None
    try:
        compiled = compile(code, filename, "exec", dont_inherit=True)
        exec(compiled, namespace)
    except SystemExit as exc:
        code_value = exc.code
        if code_value is None:
            exit_code = 0
        elif isinstance(code_value, int):
            exit_code = code_value
        else:
            sys.stderr.write(f"{code_value}\n")
            exit_code = 1
    except BaseException as exc:  # the snippet's error, reported like the interpreter does
        exc_name = type(exc).__name__
        exit_code = 1
        _print_exception(exc, exc.__traceback__)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed/replaced stream is the snippet's business
            stream.flush()
    return {"exit": exit_code, "exc": exc_name}


def kernel_main(setup: KernelSetup, fds: tuple[int, int, int, int]) -> None:
    """Entry point of the forked child; never returns."""
    try:
        _install_fds(*fds)
        _lock_down(setup)
        _fresh_streams()
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure to the server
        try:
            protocol.write_message(DONE_FD, {"setup_error": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(70)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    while True:
        try:
            message = protocol.read_message(CODE_FD)
        except protocol.ProtocolError:
            os._exit(0)
        with contextlib.suppress(OSError, ValueError):
            isolation.arm_cpu_limit(setup.limits.cpu_s)
        done = _run_cell(message["code"], message.get("filename", "<snippet>"), namespace)
        try:
            protocol.write_message(DONE_FD, done)
        except OSError:
            os._exit(0)
