"""Resource limits for one snippet (or one session turn).

The defaults follow the authors' release for multi-turn math tool use (see
docs/environments.md, `alp/PythonTool-v0`): 3 s wall clock and 2 GB of memory per call. The other defaults are chosen so that legitimate
math code (numpy, sympy, threads, moderate recursion) never hits them while attacks (fork bombs,
huge files, floods of output) are stopped within a fraction of the timeout.

Example:
    >>> from sandbox import Limits
    >>> Limits().timeout_s
    3.0
    >>> Limits(timeout_s=1.0, memory_mb=256).memory_mb
    256
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Per-call resource limits.

    Attributes:
        timeout_s: wall-clock seconds a call may take before it is killed (status ``timeout``).
        cpu_s: CPU seconds (all threads together) before the kernel sends SIGXCPU (``timeout``).
        memory_mb: memory of the snippet and everything it starts (cgroup), MiB (``memory``).
        max_processes: processes and threads the snippet may have alive at once (fork bombs).
        max_file_mb: largest single file the snippet may write, MiB (``RLIMIT_FSIZE``).
        max_disk_mb: total size of the snippet's private ``/tmp`` (a tmpfs), MiB.
        max_output_bytes: stdout + stderr kept; writing more kills the snippet with status
            ``output_limit`` and the result keeps the first and last halves.
    """

    timeout_s: float = 3.0
    cpu_s: float = 6.0
    memory_mb: int = 2048
    max_processes: int = 64
    max_file_mb: int = 64
    max_disk_mb: int = 256
    max_output_bytes: int = 65536

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        """Plain dict (what travels to the server)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Limits:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Limits field(s): {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)
