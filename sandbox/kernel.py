"""What runs inside a kernel: lock itself down, then execute snippets like a notebook.

A kernel is forked from its slot's zygote (itself forked from the server's clean template, so
numpy/sympy are already imported and no earlier run's data is in its memory). It first applies
the per-kernel layers (private scratch mount, rlimits, its own uid, parent-death signal,
seccomp), tells the server it is ready, then loops: read one code message, run it in a
persistent namespace, flush, report. A stateless call is a kernel that runs one snippet and
is killed; a session is a kernel that stays alive (frozen by the server) between calls.

What the server trusts: the readiness record is written before any untrusted code ran; after
that, every byte on these pipes may have been written by the snippet. The completion record
is therefore a fixed-size binary claim (never parsed as JSON) that can only say what a
snippet decides anyway (its exit code, whether it raised MemoryError); the server decides
timeouts, memory exhaustion, output floods, signals and infrastructure failures from its own
observations, and believes a completion record only once it sees this loop's main thread
blocked reading the code pipe again (``/proc/<pid>/syscall``).

File descriptors inside a kernel: 0 = /dev/null (``input()`` sees EOF), 1/2 = output pipes to
the server, 3 = code from the server, 4 = records to the server. Nothing else is open.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import linecache
import os
import signal
import struct
import sys
import traceback

from . import isolation, protocol

CODE_FD = 3
DONE_FD = 4

# Records on DONE_FD: tag, cell sequence number, value, flags (16 bytes, big-endian).
RECORD = struct.Struct(">4siii")
READY = b"ALPr"  # set-up finished (trusted: written before any code arrived)
SETUP_FAILED = b"ALPs"  # set-up failed; followed by `value` bytes of diagnostic text
DONE = b"ALPd"  # a cell finished: value = exit code (a claim by untrusted code)
FLAG_MEMORY_ERROR = 1
MAX_SETUP_TEXT = 1000
SETUP_EXIT = 70


class KernelSetup:
    """Everything the child needs to lock itself down (sent by the server to the zygote)."""

    def __init__(self, *, uid, seccomp_filter, private_tmp, limits, parent_pid, scratch=None):
        self.uid = uid  # None: do not drop
        self.seccomp_filter = seccomp_filter  # None: no seccomp
        self.private_tmp = private_tmp
        self.limits = limits
        self.parent_pid = parent_pid
        # (subdirectory, resolved mount point) of each scratch directory, resolved once by
        # the zygote (see isolation.scratch_targets); None: resolve here.
        self.scratch = scratch


def _install_fds(stdout_w: int, stderr_w: int, code_r: int, done_w: int) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    # Move the pipes out of the way first so dup2 never clobbers one with another.
    moved = [os.dup(fd) for fd in (devnull, stdout_w, stderr_w, code_r, done_w)]
    for target, fd in enumerate(moved):
        os.dup2(fd, target)
    os.closerange(5, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)


def _lock_down(setup: KernelSetup) -> None:
    limits = setup.limits
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    # The zygote protects itself from the OOM killer; a kernel must not. (os-level I/O here
    # and below: every Python object a fresh kernel touches costs a copy-on-write fault.)
    with contextlib.suppress(OSError):
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    if setup.private_tmp:
        isolation.setup_kernel_tmp(limits.max_disk_mb, setup.scratch)
    os.chdir("/tmp")
    isolation.apply_rlimits(
        limits.cpu_s,
        limits.max_file_mb,
        limits.max_processes,
        setup.uid is not None,
        limits.memory_mb,
    )
    if setup.uid is not None:
        isolation.drop_privileges(setup.uid)
    os.environ["HOME"] = "/tmp"
    # setuid cleared any parent-death signal: set it now, then make sure the zygote did not
    # die in between (we would have been re-parented and missed the signal).
    isolation.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != setup.parent_pid:
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


def _run_cell(code: str, filename: str, namespace: dict) -> tuple[int, int]:
    """Execute one cell; returns (exit code, flags) for the completion record."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exit_code, flags = 0, 0
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
        flags = FLAG_MEMORY_ERROR if isinstance(exc, MemoryError) else 0
        exit_code = 1
        with contextlib.suppress(BaseException):
            _print_exception(exc, exc.__traceback__)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):  # a closed/replaced stream is the snippet's
            stream.flush()
    return max(-(2**31), min(2**31 - 1, exit_code)), flags


def _write_record(tag: bytes, seq: int, value: int, flags: int = 0, text: bytes = b"") -> None:
    data = memoryview(RECORD.pack(tag, seq, value, flags) + text)
    while data:
        data = data[os.write(DONE_FD, data) :]


def hide_own_modules() -> None:
    """Remove the sandbox's own modules and the seccomp binding from ``sys.modules`` (they
    stay loaded: the template, the zygotes and the kernel loop run in them), so a snippet's
    ``import sandbox`` finds nothing. Done once in the template, which every kernel is
    forked from, instead of scanning ``sys.modules`` in every kernel."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("sandbox", "pyseccomp")]:
        del sys.modules[name]


def kernel_main(setup: KernelSetup, fds: tuple[int, int, int, int]) -> None:
    """Entry point of the forked child; never returns."""
    try:
        _install_fds(*fds)
        _lock_down(setup)
        _fresh_streams()
        _write_record(READY, 0, 0)
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure to the server
        try:
            text = f"{type(exc).__name__}: {exc}".encode(errors="replace")[:MAX_SETUP_TEXT]
            _write_record(SETUP_FAILED, 0, len(text), 0, text)
        finally:
            os._exit(SETUP_EXIT)
    # The sandbox's own modules are not offered to the snippet's imports (the template
    # removed them from sys.modules once: see hide_own_modules).
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    while True:
        try:
            message = protocol.read_message(CODE_FD)
        except (protocol.ProtocolError, OSError):
            os._exit(0)
        with contextlib.suppress(OSError, ValueError):
            isolation.arm_cpu_limit(setup.limits.cpu_s)
        exit_code, flags = _run_cell(
            message["code"], message.get("filename", "<snippet>"), namespace
        )
        try:
            _write_record(DONE, int(message.get("seq", 0)), exit_code, flags)
        except OSError:
            os._exit(0)
