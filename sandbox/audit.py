"""Host-side inspection: which snippet processes and cgroups exist right now.

Used by the tests (nothing may be left behind after an attack) and handy when debugging:

    >>> from sandbox import LocalSandbox
    >>> with LocalSandbox(workers=1) as sb:
    ...     _ = sb.run("print(1)")
    ...     report = sb.audit()
    >>> sorted(report)
    ['kernel_uids', 'processes', 'stray_processes']
"""

from __future__ import annotations

import contextlib
import os

from .isolation import SLOTS_PER_SERVER, UID_BASE, leftover_cgroups


def processes_of_servers(launcher_pids: list[int]) -> list[tuple[int, int]]:
    """(pid, uid) of every host process running under a slot uid of these servers."""
    ranges = [
        (UID_BASE + p * SLOTS_PER_SERVER, UID_BASE + (p + 1) * SLOTS_PER_SERVER)
        for p in launcher_pids
    ]
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            uid = os.stat(f"/proc/{name}").st_uid
            if any(lo <= uid < hi for lo, hi in ranges):
                out.append((int(name), uid))
    return out


def cgroups_of_servers(launcher_pids: list[int]) -> list[str]:
    """The slot cgroups that exist for these servers."""
    prefixes = tuple(f"alp-sandbox-{p}-" for p in launcher_pids)
    return [c for c in leftover_cgroups() if os.path.basename(c).startswith(prefixes)]
