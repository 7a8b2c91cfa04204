"""Linux isolation primitives, each probed at start-up and applied only where it works.

The adversary is the code in the sandbox: in RL it is written by a policy that is rewarded for
outcomes, so anything a snippet can do to change how it is scored, to see what other rollouts
do, or to take more than its share of the machine will be found by training. Layers:

- per server (once): pid, network, mount, ipc and uts namespaces; a private ``/proc``;
- a read-only *allow-list* root file system (``build_root``): system libraries and binaries,
  a few files of ``/etc``, the interpreter, its standard library and only the allowed
  packages of each package directory (numpy, sympy, mpmath, ...). Nothing else of the host
  exists for a snippet: not the project, not datasets, not ``/work``, ``/home``, ``/root``,
  ``/sys``, host sockets, other packages (the project's own ``envs/data`` included, wherever
  it is installed);
- a clean template process (forked before the server handles any request) that forks one
  *zygote* per slot: PID 1 of a pid namespace of its own, with its own network namespace and
  ``/proc``, joined to the slot's cgroups once; it forks the slot's kernels, so a kernel
  never inherits memory that held another run's code or output, and no two slots share a pid
  or network namespace (abstract unix sockets, ``kill(pid, 0)`` probes);
- per kernel: its own mount and ipc namespaces with ONE size-limited tmpfs shared by
  ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock``; rlimits (``RLIMIT_DATA`` makes an
  allocation beyond the memory limit fail at once); a uid (and gid) of its own, unique on the
  host; a seccomp filter;
- per slot cgroups (v1): memory (no swap), pids, freezer (a session is frozen between calls)
  and cpu (one core per slot).

Python 3.11 has no ``os.unshare``/``os.mount``/``os.setns``: we call libc through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
# clone() flags that create namespaces: a snippet may never use them (a new user namespace
# would give its child every capability inside it).
NAMESPACE_CLONE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1

# uids handed to slots: UID_BASE + launcher_pid * SLOTS_PER_SERVER + slot. The launcher pid is
# unique among live servers on the host, so uids (and cgroup names) never collide between
# servers, sandboxes or processes (pytest-xdist workers, trainer + tests).
UID_BASE = 1 << 20
SLOTS_PER_SERVER = 256

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None):
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def umount(target: str, flags: int = MNT_DETACH) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(number, new_root.encode(), put_old.encode()), "pivot_root")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def slot_uid(launcher_pid: int, slot: int) -> int:
    """The uid (and gid) of a slot; unique across all live servers on the host."""
    if not 0 <= slot < SLOTS_PER_SERVER:
        raise ValueError(f"slot {slot} out of range 0..{SLOTS_PER_SERVER - 1}")
    return UID_BASE + launcher_pid * SLOTS_PER_SERVER + slot


@dataclass
class IsolationReport:
    """Which layers are in force (filled by the server's probe, shown as ``sandbox.isolation``)."""

    pid_namespace: bool = False
    network_namespace: bool = False
    mount_namespace: bool = False
    ipc_namespace: bool = False
    uts_namespace: bool = False
    user_namespace: bool = False
    private_tmp: bool = False
    hidden_home: bool = False
    hidden_proc: bool = False
    file_allowlist: bool = False  # a read-only allow-list root; nothing else of the host
    clean_template: bool = False  # kernels forked from a process that never held a request
    slot_pid_namespace: bool = False  # one pid namespace per slot (no cross-slot pids)
    slot_network_namespace: bool = False  # one network namespace per slot (abstract sockets)
    cgroup_memory: bool = False
    cgroup_pids: bool = False
    cgroup_freezer: bool = False  # sessions frozen between calls
    cgroup_cpu: bool = False  # one core per slot
    verified_completion: bool = False  # a session's completion claim is checked in /proc
    uid_drop: bool = False
    seccomp: bool = False
    rlimits: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def level(self) -> str:
        """``full``, ``partial`` or ``none`` (rlimits alone do not isolate anything)."""
        core = [
            self.pid_namespace,
            self.network_namespace,
            self.mount_namespace,
            self.private_tmp,
            self.hidden_proc,
            self.file_allowlist,
            self.clean_template,
            self.slot_pid_namespace,
            self.slot_network_namespace,
            self.cgroup_memory,
            self.cgroup_pids,
            self.cgroup_freezer,
            self.verified_completion,
            self.uid_drop,
            self.seccomp,
        ]
        if all(core):
            return "full"
        if self.uid_drop or self.network_namespace or self.seccomp or self.pid_namespace:
            return "partial"
        return "none"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["level"] = self.level
        return data

    @classmethod
    def from_dict(cls, data: dict) -> IsolationReport:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def __str__(self) -> str:
        on = [k for k, v in asdict(self).items() if v is True]
        off = [k for k, v in asdict(self).items() if v is False]
        text = f"isolation level {self.level}: on={','.join(on)} off={','.join(off) or '-'}"
        return text + (f" notes={'; '.join(self.notes)}" if self.notes else "")


# ----------------------------------------------------------------------------- namespaces


def enter_server_namespaces(report: IsolationReport) -> None:
    """unshare the namespaces made once per server (the caller must fork afterwards for pid)."""
    for flag, name in (
        (CLONE_NEWNS, "mount_namespace"),
        (CLONE_NEWNET, "network_namespace"),
        (CLONE_NEWIPC, "ipc_namespace"),
        (CLONE_NEWUTS, "uts_namespace"),
        (CLONE_NEWPID, "pid_namespace"),
    ):
        try:
            unshare(flag)
            setattr(report, name, True)
        except OSError as exc:
            report.notes.append(f"{name}: {exc}")


# ----------------------------------------------------------------------------- allow-list root

# Packages a snippet may import besides the standard library (those installed are bound; the
# modules the server pre-imports pull in their own dependencies, e.g. mpmath for sympy).
ALLOWED_PACKAGES = ("numpy", "sympy", "mpmath", "scipy", "networkx")
# Never visible, whatever imported them in the server.
NEVER_ALLOWED = ("sandbox", "envs", "alp_agents", "train", "pyseccomp", "_distutils_hack")
# System directories bound whole (read-only) into the root; symlinks (merged /usr) are kept.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Inside them, directories that are covered by an empty (or filtered) view.
SYSTEM_MASKS = ("/usr/src", "/usr/local/src", "/usr/local/share", "/usr/share/doc")
# What a program needs from /etc (dynamic loader, users, time zone, certificates, MIME types).
ETC_ALLOWED = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
    "nsswitch.conf", "host.conf", "hosts", "gai.conf", "os-release", "debian_version",
    "alternatives", "ssl", "ca-certificates", "mime.types", "protocols", "services",
    "locale.alias", "networks",
    "shadow",  # present but unreadable for a slot uid (0640 root): keeps EACCES semantics
)  # fmt: skip
DEVICES = ("null", "zero", "full", "random", "urandom")
SCRATCH = (("tmp", "/tmp"), ("var_tmp", "/var/tmp"), ("shm", "/dev/shm"), ("lock", "/run/lock"))
SCRATCH_STAGING = "/.scratch"
OLD_ROOT = "/.old"


def _staging_dir() -> str:
    return "/mnt" if os.path.isdir("/mnt") else "/media"


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def python_package_dirs() -> list[str]:
    """The site-packages / dist-packages directories that hold third-party packages (not the
    stdlib, not a project checkout that happens to be on ``sys.path``)."""
    import site
    import sysconfig

    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    out = []
    candidates = [p for p in sys.path if p] + list(site.getsitepackages())
    # The base interpreter's own site-packages lies inside the stdlib directory (bound whole)
    # even when a virtualenv does not use it: filter it too.
    candidates += [os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages")]
    for pattern_root in ("/usr/lib", "/usr/local/lib"):
        with contextlib.suppress(OSError):
            for name in os.listdir(pattern_root):
                if name.startswith("python3"):
                    for sub in ("dist-packages", "site-packages"):
                        candidates.append(os.path.join(pattern_root, name, sub))
    candidates.append("/usr/lib/python3/dist-packages")
    for path in candidates:
        real = os.path.realpath(path)
        if not os.path.isdir(real) or real in out:
            continue
        if not real.endswith(("site-packages", "dist-packages")):
            # the stdlib itself, lib-dynload, and source trees on sys.path (the working
            # directory, an editable install's project): never package directories to expose
            continue
        out.append(real)
    return out


def allowed_top_level(modules_before: set[str], extra: tuple[str, ...] = ()) -> set[str]:
    """Top-level names a snippet may import from package directories: ALLOWED_PACKAGES, what
    the server pre-imported (with its dependencies), ``extra``; never NEVER_ALLOWED."""
    names = set(ALLOWED_PACKAGES) | set(extra)
    names |= {m.split(".")[0] for m in set(sys.modules) - modules_before}
    return {n for n in names if n and n not in NEVER_ALLOWED}


class RootBuilder:
    """Builds the read-only allow-list root under ``root`` (a fresh tmpfs) in the server's
    private mount namespace; kernels ``pivot_root`` into it (see ``enter_root``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.bound: list[str] = []

    def _dest(self, path: str) -> str:
        return self.root + path

    def _covered(self, path: str) -> bool:
        return any(_within(path, b) for b in self.bound)

    def add(self, path: str, depth: int = 0) -> None:
        """Make ``path`` (and the symlinks leading to it) visible read-only."""
        path = os.path.normpath(os.path.abspath(path))
        if depth > 16 or not os.path.lexists(path):
            return
        parts = path.strip("/").split("/")
        current = ""
        for i, part in enumerate(parts):
            current += "/" + part
            if self._covered(current):
                if os.path.islink(path):  # a symlink inside a bound dir pointing elsewhere
                    self.add(os.path.realpath(path), depth + 1)
                return
            if os.path.islink(current):
                target = os.readlink(current)
                dest = self._dest(current)
                if not os.path.lexists(dest):
                    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
                    os.symlink(target, dest)
                resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
                rest = "/".join(parts[i + 1 :])
                self.add(os.path.join(resolved, rest) if rest else resolved, depth + 1)
                return
        self._bind(path)

    def _bind(self, path: str) -> None:
        dest = self._dest(path)
        if os.path.isdir(path):
            os.makedirs(dest, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            if not os.path.exists(dest):
                open(dest, "a").close()  # noqa: SIM115 - a mount point
        mount(path, dest, None, MS_BIND | MS_REC)
        mount("none", dest, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        self.bound.append(path)

    def filtered(self, directory: str, allowed: set[str]) -> list[str]:
        """Show ``directory`` with only the entries that belong to ``allowed`` packages."""
        directory = os.path.realpath(directory)
        if not os.path.isdir(directory):
            return []
        dest = self._dest(directory)
        inside_bound = self._covered(directory)
        entries = [
            entry
            for entry in sorted(os.listdir(directory))
            # no .pth start-up hooks (editable finders point into the project)
            if not entry.endswith(".pth") and entry.split(".")[0].split("-")[0] in allowed
        ]
        if not entries and not inside_bound:
            return []  # nothing to show: the directory does not exist for snippets
        if inside_bound:
            mount("tmpfs", dest, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        else:
            os.makedirs(dest, mode=0o755, exist_ok=True)
        shown = []
        for entry in entries:
            src = os.path.join(directory, entry)
            target = dest + "/" + entry
            if os.path.isdir(src):
                os.makedirs(target, mode=0o755, exist_ok=True)
            else:
                open(target, "a").close()  # noqa: SIM115 - a mount point
            mount(src, target, None, MS_BIND | MS_REC)
            mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            shown.append(entry)
        if inside_bound:
            mount("none", dest, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        return shown

    def mask(self, directory: str) -> None:
        """Cover a directory inside a bound one with an empty read-only tmpfs."""
        directory = os.path.realpath(directory)
        if os.path.isdir(directory) and self._covered(directory):
            mount(
                "tmpfs", self._dest(directory), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k"
            )


def build_root(root: str, allowed: set[str], hidden: list[str]) -> list[str]:
    """Build the allow-list root at ``root`` (needs a private mount namespace and root).

    Returns the package entries shown. ``hidden`` directories are masked even when they lie
    inside something allowed.
    """
    import sysconfig

    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    builder = RootBuilder(root)
    for directory in SYSTEM_DIRS:
        builder.add(directory)
    for name in ETC_ALLOWED:
        builder.add(os.path.join("/etc", name))
    # The interpreter: the executable's symlink chain, a venv's pyvenv.cfg, libpython, stdlib.
    builder.add(sys.executable)
    builder.add(os.path.realpath(sys.executable))
    for prefix in {sys.prefix, sys.base_prefix}:
        builder.add(os.path.join(prefix, "pyvenv.cfg"))
        libdir = os.path.join(prefix, "lib")
        with contextlib.suppress(OSError):
            for name in os.listdir(libdir):
                if name.startswith("libpython"):
                    builder.add(os.path.join(libdir, name))
    builder.add(sysconfig.get_paths()["stdlib"])
    for path in sys.path:
        if path and os.path.isdir(path) and "lib-dynload" in path:
            builder.add(path)
    # Shared libraries the warm process has mapped (outside the bound system dirs).
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
                lib = fields[5].strip()
                if not any(_within(lib, d) for d in python_package_dirs()):
                    builder.add(lib)
    shown = []
    for directory in python_package_dirs():
        shown += builder.filtered(directory, allowed)
    for directory in SYSTEM_MASKS:
        builder.mask(directory)
    for directory in hidden:
        builder.mask(directory)
    # Mount points and the minimal /dev.
    for path in ("/proc", "/tmp", "/var/tmp", "/dev/shm", "/run/lock", SCRATCH_STAGING, OLD_ROOT):
        os.makedirs(builder._dest(path), mode=0o755, exist_ok=True)
    for device in DEVICES:
        src = f"/dev/{device}"
        if os.path.exists(src):
            dest = builder._dest(src)
            open(dest, "a").close()  # noqa: SIM115 - a mount point
            mount(src, dest, None, MS_BIND)
            mount("none", dest, None, MS_REMOUNT | MS_BIND | MS_NOSUID)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, builder._dest(f"/dev/{name}"))
    mount("none", root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return shown


def enter_root(root: str) -> None:
    """In a fresh mount namespace: make ``root`` the file system root, drop the old one."""
    os.chdir(root)
    pivot_root(".", "." + OLD_ROOT)
    os.chdir("/")
    umount(OLD_ROOT, MNT_DETACH)


def setup_server_mounts(report: IsolationReport) -> None:
    """Inside the server's new mount + pid namespace: private propagation, own /proc."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
        report.hidden_proc = report.pid_namespace
    except OSError as exc:
        report.notes.append(f"hidden_proc: {exc}")


def mount_own_proc() -> None:
    """A /proc for the caller's pid namespace (zygote: PID 1 of a slot's namespace)."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")


def setup_kernel_tmp(disk_mb: int, scratch: list[tuple[str, str]] | None = None) -> None:
    """In a kernel (before dropping the uid): own mount + ipc namespaces and ONE tmpfs of
    ``disk_mb`` whose subdirectories are ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
    ``/run/lock`` (so the quota is shared, not per mount point).

    Everything a snippet writes lands there (the rest of the tree is read-only) and disappears
    with its mount namespace when the kernel's processes are gone.
    """
    if scratch is None:
        scratch = scratch_targets()
    # SysV/POSIX IPC objects die with the kernel; its cgroup paths read as "/".
    unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWCGROUP)
    staging = scratch_staging()
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={disk_mb}m")
    for name, target in scratch:
        sub = f"{staging}/{name}"
        os.mkdir(sub)
        os.chmod(sub, 0o1777)
        mount(sub, target, None, MS_BIND)
    umount(staging, MNT_DETACH)


def scratch_staging() -> str:
    return SCRATCH_STAGING if os.path.isdir(SCRATCH_STAGING) else _staging_dir()


def scratch_targets() -> list[tuple[str, str]]:
    """(subdirectory name, resolved mount point) of every scratch directory that exists here.
    The zygote resolves them once (its root is its kernels' root) instead of every kernel."""
    return [(name, os.path.realpath(t)) for name, t in SCRATCH if os.path.isdir(t)]


# ----------------------------------------------------------------------------- cgroups (v1)


def _own_cgroup_dir(controller: str) -> str | None:
    root = f"/sys/fs/cgroup/{controller}"
    if not os.path.isdir(root):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    candidate = root + path.rstrip("/")
                    return candidate if os.path.isdir(candidate) else root
    except OSError:
        return None
    return root


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pread_all(fd: int) -> bytes:
    """The whole content of a (cgroup or proc) file opened once, read again from offset 0."""
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


CONTROLLERS = (
    ("memory", "cgroup_memory"),
    ("pids", "cgroup_pids"),
    ("freezer", "cgroup_freezer"),
    ("cpu", "cgroup_cpu"),
)
CPU_PERIOD_US = 100_000
SLOT_CPUS = 1  # cores one slot may use at once (its whole process tree)


class SlotCgroups:
    """The cgroups of one slot (created once, reused by its kernels): memory, pids, freezer,
    cpu. The slot's zygote is a member too (its kernels inherit the membership at fork)."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs
        self.memory_dir = dirs.get("memory")
        self.pids_dir = dirs.get("pids")
        self.freezer_dir = dirs.get("freezer")
        self.cpu_dir = dirs.get("cpu")
        self._configured: tuple | None = None
        # The memory counters, read twice on every run: opened once (each read at offset 0
        # is fresh) instead of a Python file object each time. Closed by remove().
        self._fds: dict[str, int] = {}
        self._maybe_frozen = False  # a FROZEN write since the last THAWED one
        if self.cpu_dir:
            with contextlib.suppress(OSError):
                _write(f"{self.cpu_dir}/cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(f"{self.cpu_dir}/cpu.cfs_quota_us", str(CPU_PERIOD_US * SLOT_CPUS))
        if self.memory_dir:
            with contextlib.suppress(OSError):  # never swap: exhaustion must end fast
                _write(f"{self.memory_dir}/memory.swappiness", "0")

    def configure(self, memory_mb: int, max_processes: int) -> None:
        key = (memory_mb, max_processes)
        if key == self._configured:
            return
        if self.memory_dir:
            limit = str(memory_mb * 1024 * 1024)
            # memory+swap must stay >= memory: raise it first, set memory, then lower it.
            memsw = f"{self.memory_dir}/memory.memsw.limit_in_bytes"
            with contextlib.suppress(OSError):
                _write(memsw, "-1")
            _write(f"{self.memory_dir}/memory.limit_in_bytes", limit)
            with contextlib.suppress(OSError):  # no swap accounting: fine
                _write(memsw, limit)
        if self.pids_dir:  # + 1: the zygote
            _write(f"{self.pids_dir}/pids.max", str(max_processes + 1))
        self._configured = key

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0 = the caller) into every cgroup of the slot."""
        for d in self.dirs.values():
            _write(f"{d}/cgroup.procs", str(pid or os.getpid()))

    def _read(self, directory: str | None, name: str) -> bytes | None:
        if not directory:
            return None
        fd = self._fds.get(name)
        try:
            if fd is None:
                fd = self._fds[name] = os.open(f"{directory}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            return _pread_all(fd)
        except OSError:
            return None

    def pids(self) -> list[int]:
        # Opened afresh every time: cgroup v1 caches an open cgroup.procs' list, so reading
        # a kept descriptor again shows the members of when it was first read.
        for d in (self.pids_dir, self.memory_dir, self.freezer_dir, self.cpu_dir):
            if d:
                try:
                    fd = os.open(f"{d}/cgroup.procs", os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        return [int(x) for x in _pread_all(fd).split()]
                    finally:
                        os.close(fd)
                except OSError:
                    return []
        return []

    def freeze(self) -> bool:
        """Stop every process of the slot (a session between calls). True if frozen."""
        if not self.freezer_dir:
            return False
        self._maybe_frozen = True  # even if the write fails: thaw() must not skip
        try:
            _write(f"{self.freezer_dir}/freezer.state", "FROZEN")
            return True
        except OSError:
            return False

    def thaw(self) -> None:
        """Let the slot's processes run (and die, if they were killed while frozen). Only
        freeze() ever freezes a slot (snippets cannot reach the cgroup files), so a slot
        that was not frozen since it was last thawed needs no write."""
        if self.freezer_dir and self._maybe_frozen:
            with contextlib.suppress(OSError):
                _write(f"{self.freezer_dir}/freezer.state", "THAWED")
                self._maybe_frozen = False

    def oom_kills(self) -> int:
        data = self._read(self.memory_dir, "memory.oom_control")
        if data:
            for line in data.split(b"\n"):
                if line.startswith(b"oom_kill "):
                    with contextlib.suppress(ValueError):
                        return int(line.split()[1])
        return 0

    def failcnt(self) -> int:
        data = self._read(self.memory_dir, "memory.failcnt")
        try:
            return int(data) if data else 0
        except ValueError:
            return 0

    def remove(self) -> None:
        self._maybe_frozen = True  # whatever happened: never leave a frozen cgroup behind
        self.thaw()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                os.rmdir(d)


class CgroupManager:
    """Creates slot cgroups named ``alp-sandbox-<launcher pid>-<slot>`` under our own cgroup."""

    PREFIX = "alp-sandbox-"

    def __init__(self, launcher_pid: int, report: IsolationReport) -> None:
        self.launcher_pid = launcher_pid
        self.bases = {}
        for controller, attr in CONTROLLERS:
            base = _own_cgroup_dir(controller)
            if base is None:
                report.notes.append(f"{attr}: controller not mounted")
                continue
            probe = f"{base}/{self.PREFIX}{launcher_pid}-probe"
            try:
                os.mkdir(probe)
                os.rmdir(probe)
                self.bases[controller] = base
                setattr(report, attr, True)
            except OSError as exc:
                report.notes.append(f"{attr}: {exc}")

    def slot(self, slot: int) -> SlotCgroups:
        dirs = {}
        for controller, base in self.bases.items():
            d = f"{base}/{self.PREFIX}{self.launcher_pid}-{slot}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(d)
            dirs[controller] = d
        return SlotCgroups(dirs)

    @classmethod
    def remove_all(
        cls, launcher_pid: int, wait_s: float = 3.0, bases: dict[str, str] | None = None
    ) -> bool:
        """Kill what is left in this launcher's cgroups and remove them (used when its server
        is gone; dying processes keep a cgroup busy for a moment, hence the retries).
        Returns True when none is left.

        ``bases`` are the controllers' parent directories (`own_cgroup_bases`), resolved
        by the caller while ``/proc/self`` still worked: the launcher shares its mount
        namespace with a server that mounts its pid namespace's /proc, where the launcher
        has no entry, so looking them up there afterwards finds nothing and removes nothing.
        """
        if bases is None:
            bases = own_cgroup_bases()
        deadline = time.monotonic() + wait_s
        while True:
            remaining = 0
            for controller, base in bases.items():
                if not os.path.isdir(base):
                    continue
                for name in os.listdir(base):
                    if not name.startswith(f"{cls.PREFIX}{launcher_pid}-"):
                        continue
                    path = f"{base}/{name}"
                    with contextlib.suppress(OSError), open(f"{path}/cgroup.procs") as f:
                        for pid in f.read().split():
                            with contextlib.suppress(OSError):
                                os.kill(int(pid), signal.SIGKILL)
                    if controller == "freezer":  # a frozen process dies only once thawed
                        with contextlib.suppress(OSError):
                            _write(f"{path}/freezer.state", "THAWED")
                    try:
                        os.rmdir(path)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        remaining += 1
            if remaining == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def own_cgroup_bases() -> dict[str, str]:
    """The directory of this process's cgroup for each mounted controller we use (where slot
    cgroups are made), by controller name. Needs a /proc in which this process has an entry."""
    bases = {}
    for controller, _ in CONTROLLERS:
        base = _own_cgroup_dir(controller)
        if base:
            bases[controller] = base
    return bases


def leftover_cgroups() -> list[str]:
    """All sandbox cgroups that exist now (tests check nothing is left behind)."""
    out = []
    for base in own_cgroup_bases().values():
        if os.path.isdir(base):
            out += [f"{base}/{n}" for n in os.listdir(base) if n.startswith(CgroupManager.PREFIX)]
    return out


# ----------------------------------------------------------------------------- memory

MADV_COLLAPSE = 25  # Linux 6.1+
HUGE_PAGE = 1 << 21


def anonymous_ranges() -> list[tuple[int, int]]:
    """The caller's private anonymous mappings (and the brk heap), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue  # never file mappings
        low, high = (int(v, 16) for v in fields[0].split("-"))
        out.append((low, high))
    return out


def collapse_anonymous_memory(ranges: list[tuple[int, int]] | None = None) -> int:
    """Back the caller's private anonymous memory (the warm heap) with transparent huge pages
    where a whole aligned 2 MiB range fits (``MADV_COLLAPSE``; no sysfs setting needed, the
    mappings are not marked ``MADV_HUGEPAGE``). Best effort; returns the bytes collapsed.
    ``ranges``: from ``anonymous_ranges()`` (read earlier when /proc is no longer there).

    Why: every kernel is a fork of a fork of this heap, and fork copies (and exit tears down)
    one page-table entry per 4 KiB page: with ~60 MB of heap, fork and exit were ~40% of the
    CPU of a stateless ``print(1)`` (docs/sandbox.md, Performance). A huge page is one entry.
    Copy-on-write is unchanged: the first write to a shared huge page splits the mapping in
    the writer and copies 4 KiB, so no process ever shares a written page with another.
    """
    done = 0
    for low, high in anonymous_ranges() if ranges is None else ranges:
        start = (low + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = high & ~(HUGE_PAGE - 1)
        if end > start and _libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            done += end - start
    return done


# ----------------------------------------------------------------------------- credentials


def drop_privileges(uid: int) -> None:
    """Become ``uid``/``gid=uid`` with no supplementary groups (irreversible)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# A session's kernel accumulates CPU time over many calls, so the hard CPU limit is this many
# times the per-call budget and the soft limit is re-armed before every call (see
# ``arm_cpu_limit``). The wall-clock timeout bounds each call in any case.
CPU_HARD_FACTOR = 20


def cpu_hard_limit(cpu_s: float) -> int:
    return int(cpu_s * CPU_HARD_FACTOR) + 2


def arm_cpu_limit(cpu_s: float) -> None:
    """Allow ``cpu_s`` more CPU seconds from now (SIGXCPU after that), within the hard limit."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = int(used + cpu_s + 0.999)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (max(1, soft), hard))


def _data_bytes() -> int:
    """The caller's current data segment (``VmData``: private writable mappings), bytes."""
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY)
        try:
            status = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        start = status.index(b"\nVmData:") + 8
        return int(status[start : status.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        return 0


def data_headroom_mb(memory_mb: int) -> int:
    """How much more address space a kernel may map than it has at start: enough for its
    memory limit plus thread stacks, small enough that one allocation far beyond the memory
    limit fails at once with MemoryError instead of paging towards the cgroup limit."""
    return max(2 * memory_mb, memory_mb + 512)


def apply_rlimits(
    cpu_s: float, max_file_mb: int, max_processes: int, uid_dropped: bool, memory_mb: int = 0
) -> None:
    hard = cpu_hard_limit(cpu_s)
    resource.setrlimit(resource.RLIMIT_CPU, (min(hard, max(1, int(cpu_s + 0.999))), hard))
    size = max_file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb:
        data = _data_bytes()
        if data:
            limit = data + data_headroom_mb(memory_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    if uid_dropped:  # ignored for root; counts every process of the (unique) uid
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))


# ----------------------------------------------------------------------------- seccomp

# Syscalls a snippet never needs and that widen the kernel attack surface, would undo the other
# layers, or observe other sessions (inotify/fanotify on the shared read-only tree). Everything
# else is allowed (a deny list keeps numpy/sympy/threads working), with argument rules below.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "syslog", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "iopl", "ioperm", "quotactl", "open_by_handle_at",
    "name_to_handle_at", "lookup_dcookie", "vhangup", "personality", "sethostname",
    "setdomainname", "nfsservctl",
    "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark",
)  # fmt: skip
# Socket families a snippet may create: AF_UNIX (asyncio, multiprocessing), AF_INET(6) (the
# network namespace is empty). Everything else (AF_VSOCK, AF_NETLINK, AF_PACKET, ...) fails.
ALLOWED_SOCKET_FAMILIES = (1, 2, 10)
# File locks work on any file a process can open read-only, so two sessions could signal
# each other through a lock on a shared library file: flock and the fcntl lock commands
# (F_GETLK, F_SETLK, F_SETLKW and their OFD variants) fail with ENOLCK.
FCNTL_LOCK_COMMANDS = (5, 6, 7, 36, 37, 38)
MAX_SOCKET_FAMILY = 64


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class SeccompProgram:
    """The deny-list filter, compiled to BPF once in the server.

    libseccomp's ``load()`` recompiles the filter on every call (~0.7 ms, a sixth of a whole
    stateless run); the kernels instead install the exported program with one ``prctl``.
    """

    def __init__(self) -> None:
        import tempfile

        import pyseccomp

        filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        deny = pyseccomp.ERRNO(errno.EPERM)
        for name in DENIED_SYSCALLS:
            with contextlib.suppress(Exception):  # syscall unknown on this architecture
                filt.add_rule(deny, name)
        # clone() with any namespace flag (flags are argument 0 on every architecture we
        # support); clone3() passes its flags in memory a filter cannot read, so it is
        # refused with ENOSYS, which makes glibc fall back to clone() for threads and fork.
        for flag in NAMESPACE_CLONE_FLAGS:
            filt.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
        with contextlib.suppress(Exception):
            filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
        no_family = pyseccomp.ERRNO(errno.EAFNOSUPPORT)
        for family in range(MAX_SOCKET_FAMILY):
            if family not in ALLOWED_SOCKET_FAMILIES:
                filt.add_rule(no_family, "socket", pyseccomp.Arg(0, pyseccomp.EQ, family))
        filt.add_rule(no_family, "socket", pyseccomp.Arg(0, pyseccomp.GE, MAX_SOCKET_FAMILY))
        filt.add_rule(no_family, "socketpair", pyseccomp.Arg(0, pyseccomp.NE, 1))
        no_lock = pyseccomp.ERRNO(errno.ENOLCK)
        filt.add_rule(no_lock, "flock")
        for name in ("fcntl", "fcntl64"):
            for command in FCNTL_LOCK_COMMANDS:
                with contextlib.suppress(Exception):  # fcntl64 exists on 32-bit only
                    filt.add_rule(no_lock, name, pyseccomp.Arg(1, pyseccomp.EQ, command))
        with tempfile.TemporaryFile() as f:
            filt.export_bpf(f)
            f.seek(0)
            code = f.read()
        if not code or len(code) % 8:
            raise OSError(errno.EINVAL, "libseccomp exported an empty or malformed program")
        self._buffer = ctypes.create_string_buffer(code, len(code))
        self._program = _SockFprog(len(code) // 8, ctypes.cast(self._buffer, ctypes.c_void_p))

    def load(self) -> None:
        """Install the filter on the calling process (irreversible; inherited by children)."""
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(
            _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._program), 0, 0),
            "prctl(PR_SET_SECCOMP)",
        )
