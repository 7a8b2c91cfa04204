"""DockerSandbox: the `sandbox.Sandbox` interface LocalSandbox has, on hosts with a Docker engine.

A pool of long-lived, locked-down containers (one per worker) each runs the same warm fork
server (``python -m sandbox.server``) through ``docker exec -i``; snippets never pay for
``docker run``. The pool, sessions and failure handling are `sandbox.pool.WorkerPoolSandbox`'s,
shared with LocalSandbox; only where a worker's server runs differs. The container adds its own walls (no network, read-only root file system,
all capabilities dropped but the few the server needs to build its inner layers, memory and
pids limits, no-new-privileges); inside, the server probes and applies whatever layers the
container allows (uid drop, rlimits, seccomp, namespaces), exactly as on the host.

Needs the ``docker`` extra (``pip install 'alp-agents[docker]'``), the docker CLI, and an image
with Python, numpy, sympy, pyseccomp and this package; ``sandbox/Dockerfile`` builds one:

    docker build -f sandbox/Dockerfile -t alp-sandbox:latest .

Example (on a host with an engine):
    >>> from sandbox import DockerSandbox                      # doctest: +SKIP
    >>> with DockerSandbox(workers=2) as sb:                    # doctest: +SKIP
    ...     sb.run("print(1)").stdout
    '1\\n'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

from .limits import Limits
from .pool import SCRUBBED_ENV, WorkerPoolSandbox, _Worker

DEFAULT_IMAGE = "alp-sandbox:latest"
# What the trusted server inside needs to build its inner layers (namespaces, uid drop, kills,
# and reading /proc/<pid>/syscall of a kernel to check its completion claims).
SERVER_CAPABILITIES = [
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SETUID",
    "SETGID",
    "KILL",
    "DAC_OVERRIDE",
    "CHOWN",
    "FOWNER",
]


def docker_unavailable_reason(image: str = DEFAULT_IMAGE) -> str | None:
    """Why DockerSandbox cannot run here (None if it can). Used by the tests to skip."""
    try:
        import docker
    except ImportError:
        return "the `docker` Python package is not installed (pip install 'alp-agents[docker]')"
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach the engine
        return f"no Docker engine reachable: {exc}"
    try:
        client.images.get(image)
    except Exception:
        return f"image {image!r} not found (docker build -f sandbox/Dockerfile -t {image} .)"
    return None


class _DockerWorker(_Worker):
    """A worker whose server runs inside its own long-lived container."""

    def __init__(
        self, server_command: list[str], index: int, create_container: Callable[[int], Any]
    ) -> None:
        super().__init__(server_command, index)
        self.create_container = create_container
        self.container: Any = None

    def _ensure_container(self):
        if self.container is not None:
            self.container.reload()
            if self.container.status == "running":
                return self.container
            self.container.remove(force=True)
        self.container = self.create_container(self.index)
        return self.container

    def _launch(self):
        container = self._ensure_container()
        command = ["docker", "exec", "-i", container.id, *self.server_command]
        command += ["--request-fd", "0", "--reply-fd", "1"]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        request_w, reply_r = os.dup(process.stdin.fileno()), os.dup(process.stdout.fileno())
        process.stdin.close()
        process.stdout.close()
        return process, request_w, reply_r

    def _after_stop(self, process: subprocess.Popen) -> None:
        # A server that did not shut down cleanly may have left processes inside: restart
        # the container, which kills everything in it.
        if process.returncode != 0 and self.container is not None:
            with contextlib.suppress(Exception):
                self.container.restart(timeout=0)

    def dispose(self) -> None:
        """Remove the container (the pool is closing)."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.remove(force=True)
            self.container = None


class DockerSandbox(WorkerPoolSandbox):
    """The `sandbox.Sandbox` interface, with each worker's server inside a locked-down container.

    Args:
        limits, workers: as for LocalSandbox.
        image: an image with Python 3.10+, numpy, sympy, pyseccomp and this package.
        container_memory_mb: memory of each container (default: limits.memory_mb + 512, the
            server plus one snippet; sessions on the same worker share it).
        inner_isolation: give the server the capabilities it needs to build its own layers
            inside the container (namespaces, per-slot uid). The snippets never hold them.
        python: the interpreter inside the image.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        workers: int | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        container_memory_mb: int | None = None,
        inner_isolation: bool = True,
        python: str = "python",
    ) -> None:
        reason = docker_unavailable_reason(image)
        if reason:
            raise RuntimeError(f"DockerSandbox is unavailable: {reason}")
        import docker

        self.client = docker.from_env()
        self.image = image
        self.inner_isolation = inner_isolation
        self._session_tag = uuid.uuid4().hex[:12]
        limits = limits or Limits()
        self.container_memory_mb = container_memory_mb or limits.memory_mb + 512
        server_command = [python, "-m", "sandbox.server"]
        # The container is the isolation layer even where the inner probe finds little.
        super().__init__(
            limits,
            workers,
            lambda index: _DockerWorker(server_command, index, self._create_container),
            allow_unisolated=True,
        )

    def _create_container(self, index: int):
        limits = self.limits
        return self.client.containers.run(
            self.image,
            ["sleep", "infinity"],
            detach=True,
            name=f"alp-sandbox-{self._session_tag}-{index}",
            labels={"alp-sandbox": self._session_tag},
            environment=dict(SCRUBBED_ENV),
            network_mode="none",
            read_only=True,
            tmpfs={
                "/tmp": f"size={limits.max_disk_mb}m,mode=1777",
                "/var/tmp": f"size={limits.max_disk_mb}m,mode=1777",
                "/run": "size=8m",
            },
            mem_limit=f"{self.container_memory_mb}m",
            memswap_limit=f"{self.container_memory_mb}m",
            pids_limit=max(64, limits.max_processes * 4),
            cap_drop=["ALL"],
            cap_add=SERVER_CAPABILITIES if self.inner_isolation else [],
            security_opt=["no-new-privileges"]
            + (["seccomp=unconfined", "apparmor=unconfined"] if self.inner_isolation else []),
            user="0:0",
            working_dir="/tmp",
            stop_signal="SIGKILL",
        )

    @property
    def launcher_pids(self) -> list[int]:
        return []  # the servers' pids live in the containers' namespaces

    def audit(self) -> dict:
        raise NotImplementedError("audit() inspects host processes; use `docker top` here")
