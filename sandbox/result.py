"""ExecutionResult (what one call returns) and the head+tail output capture.

``status`` is one of:

- ``ok``: the snippet finished (exit code 0);
- ``error``: an uncaught exception or a non-zero exit code (the traceback is in ``stderr``);
- ``timeout``: wall-clock or CPU limit reached;
- ``memory``: the memory limit was reached (MemoryError or the cgroup's OOM killer);
- ``output_limit``: more than ``Limits.max_output_bytes`` of output (head and tail are kept);
- ``killed``: the snippet died from a signal (segfault, killed itself, ...);
- ``sandbox_error``: OUR infrastructure failed (e.g. the server died). Never score it as a
  wrong answer; the sandbox restarts the server and the next call works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "output_limit", "killed", "sandbox_error"]
STATUSES: tuple[str, ...] = (
    "ok",
    "error",
    "timeout",
    "memory",
    "output_limit",
    "killed",
    "sandbox_error",
)

TRUNCATION_MARKER = "\n[... {n} bytes truncated ...]\n"


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one snippet.

    Attributes:
        stdout, stderr: decoded output (UTF-8, invalid bytes replaced), capped head + tail.
        status: see the module docstring.
        exit_code: process-style exit code; negative = killed by that signal number.
        duration_s: wall time of the call as measured by the server.
        truncated: True when output was cut (the marker in the text says how much).
    """

    stdout: str
    stderr: str
    status: Status
    exit_code: int | None = None
    duration_s: float = 0.0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExecutionResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def infrastructure_error(cls, message: str, duration_s: float = 0.0) -> ExecutionResult:
        """A ``sandbox_error`` result carrying our own diagnostic in ``stderr``."""
        return cls("", f"sandbox error: {message}\n", "sandbox_error", None, duration_s, False)


class HeadTailBuffer:
    """Keeps the first ``cap // 2`` and the last ``cap - cap // 2`` bytes of a stream.

    >>> b = HeadTailBuffer(6)
    >>> b.write(b"abcdefghij")
    >>> b.total, b.truncated, b.getvalue()
    (10, True, b'abc\\n[... 4 bytes truncated ...]\\nhij')
    """

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def getvalue(self) -> bytes:
        if not self.truncated:
            return bytes(self.head + self.tail)
        dropped = self.total - len(self.head) - len(self.tail)
        marker = TRUNCATION_MARKER.format(n=dropped).encode()
        return bytes(self.head) + marker + bytes(self.tail)
