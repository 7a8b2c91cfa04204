"""Attacks of a policy that is rewarded for outcomes: forge or disturb results, read answers,
reach other rollouts, take more than its share of the machine. One section per class of the
second hardening round; all against the real sandbox, no mocks.

Most tests use the module's two-worker sandbox (``sb``: after every test the server must
still work and nothing may be left behind). Tests about several sessions on ONE server
use ``one`` (a one-worker sandbox, so attacker and victim share the server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from sandbox import Limits, LocalSandbox
from sandbox.audit import processes_of_servers

from .conftest import ATTACK_LIMITS, assert_nothing_left

pytestmark = pytest.mark.security

# The checkout's root (tests/sandbox/security/ is three levels below it). A wrong root would make
# the file attacks below look for the datasets and README where there are none, and pass.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
assert os.path.isfile(os.path.join(REPO, "pyproject.toml")), REPO


def run(sb, code: str, **limits):
    override = dataclasses.replace(sb.limits, **limits) if limits else None
    return sb.run(textwrap.dedent(code), limits=override)


@pytest.fixture(scope="module")
def one():
    """A one-worker sandbox: every session of a test lives on the same server."""
    sb = LocalSandbox(limits=ATTACK_LIMITS, workers=1).start()
    if sb.isolation.level != "full":
        sb.close()
        pytest.skip(f"full isolation is not available on this host: {sb.isolation}")
    launchers = sb.launcher_pids
    yield sb
    sb.close()
    assert_nothing_left(launchers)


def _server_pid(launcher: int) -> int:
    with open(f"/proc/{launcher}/task/{launcher}/children") as f:
        return int(f.read().split()[0])


def _cpu_s(pid: int) -> float:
    """utime + stime of a host process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _slot_cpu_s(sb) -> float:
    """CPU seconds of every live snippet process of the sandbox (threads included)."""
    return sum(_cpu_s(pid) for pid, _ in processes_of_servers(sb.launcher_pids))


# --------------------------------------------------------------------------- 1. result channel

RECORD = ">4siii"  # tag, cell number, value, flags (see sandbox/kernel.py)


def test_a_snippet_cannot_claim_a_setup_failure(sb):
    for forged in (
        # the record the kernel uses for a real set-up failure, and the old JSON message
        "os.write(4, struct.pack('>4siii', b'ALPs', 0, 5, 0) + b'boom!')",
        "b = json.dumps({'setup_error': 'boom'}).encode(); os.write(4, struct.pack('>I', len(b)) + b)",
    ):
        r = run(sb, f"import os, struct, json\n{forged}\nprint('done')\n")
        assert r.status != "sandbox_error", r
        assert r.status in ("ok", "error"), r


def test_a_forged_completion_does_not_end_a_stateless_run_early(sb):
    r = run(
        sb,
        """
        import os, struct
        os.write(4, struct.pack('>4siii', b'ALPd', 1, 0, 0))
        print('claimed', flush=True)
        while True:
            pass
        """,
    )
    assert r.status == "timeout", r
    assert r.duration_s >= sb.limits.timeout_s * 0.9


@pytest.mark.parametrize(
    "payload",
    [
        # unencodable string, deep nesting, huge length, truncated header, plain garbage
        'b = b\'{"exit": 0, "exc": "\\\\ud800"}\'; os.write(4, len(b).to_bytes(4, \'big\') + b)',
        "b = b'[' * 200000 + b']' * 200000; os.write(4, len(b).to_bytes(4, 'big') + b)",
        "os.write(4, (2**31).to_bytes(4, 'big') + b'x' * 100)",
        "os.write(4, b'AL')",
        "os.write(4, os.urandom(4096))",
    ],
)
def test_malformed_records_fail_only_that_call_and_never_the_worker(one, payload):
    launchers = one.launcher_pids
    with one.session() as victim, one.session() as attacker:
        assert victim.run("answer = 42").ok
        assert attacker.run("y = 1").ok
        r = attacker.run(f"import os, time\n{payload}\ntime.sleep(0.5)\n")
        assert r.status in ("error", "ok", "timeout"), r  # scored, never sandbox_error
        after = victim.run("print(answer)")
        assert (after.status, after.stdout, after.stderr) == ("ok", "42\n", ""), after
    assert one.launcher_pids == launchers  # the worker was never restarted


def test_a_huge_cell_for_a_busy_kernel_does_not_stall_the_worker(one):
    launchers = one.launcher_pids
    with one.session() as victim, one.session() as attacker:
        assert victim.run("answer = 42").ok
        # The attacker's cell swaps the kernel's code pipe for one nobody writes, keeping
        # the real one open: its next cell (megabytes of code) is never read, the pipe fills.
        swap = "import os\nkeep = os.dup(3)\nr, w = os.pipe()\nos.dup2(r, 3)\n"
        assert attacker.run(swap).ok
        big = "x = 1\n" + "#" * (8 << 20) + "\n"
        t0 = time.monotonic()
        r = attacker.run(big)
        took = time.monotonic() - t0
        assert r.status == "timeout", r
        # a stalled worker would wait for the whole write; the bound leaves room for a loaded host
        assert took < one.limits.timeout_s + 10.0, took
        assert victim.run("print(answer)").stdout == "42\n"
    assert one.launcher_pids == launchers


def test_oversized_code_fails_that_call_and_never_the_worker(one):
    launchers = one.launcher_pids
    with one.session() as victim, one.session() as attacker:
        assert victim.run("answer = 42").ok
        big = "print(1)\n#" + "x" * (70 << 20)
        assert attacker.run(big).status == "error"
        assert one.run(big).status == "error"
        assert victim.run("print(answer)").stdout == "42\n"
    assert one.launcher_pids == launchers


def test_a_claimed_exit_code_never_looks_like_a_signal(sb):
    r = run(sb, "import sys\nsys.exit(-9)")
    assert (r.status, r.exit_code) == ("error", 247), r
    r = run(sb, "import sys\nsys.exit(256)")  # the OS keeps the low byte, as for python -c
    assert (r.status, r.exit_code) == ("ok", 0), r


def test_a_memory_error_claim_cannot_hide_a_timeout(sb):
    r = run(
        sb,
        """
        import os, struct
        os.write(4, struct.pack('>4siii', b'ALPd', 1, 1, 1))  # "MemoryError, exit 1"
        while True:
            pass
        """,
    )
    assert r.status == "timeout", r


# --------------------------------------------------------------------------- 2. earlier runs' memory

# Reads the kernel's own writable anonymous memory (heap, arenas, stacks) with ctypes: what
# it inherited at fork. (/proc/self/mem is closed to it: the uid change made it non-dumpable.)
SCAN = """
import ctypes
prefix, suffix = {prefix!r}, {suffix!r}
found = 0
with open("/proc/self/maps") as maps:
    regions = [line.split() for line in maps]
for fields in regions:
    if not fields[1].startswith("rw") or (len(fields) > 5 and not fields[5].startswith("[")):
        continue
    if len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vdso]"):
        continue
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    data = ctypes.string_at(lo, hi - lo)
    i = data.find(prefix)
    while i >= 0:
        if data[i + len(prefix) : i + len(prefix) + len(suffix)] == suffix:
            found += 1
        i = data.find(prefix, i + 1)
print("found", found)
"""


def _scan(prefix: bytes, suffix: bytes) -> str:
    return SCAN.format(prefix=prefix, suffix=suffix)


def test_a_run_cannot_read_earlier_runs_code_or_output_from_memory(one):
    # The earlier run: a secret in its code and a (computed) answer in its output.
    first = one.run("secret = 'CODESECRET_a1b2c3'\nprint('ANSWER-' + str(31337 * 3))\n")
    assert first.stdout == "ANSWER-94011\n"
    limits = dataclasses.replace(one.limits, timeout_s=30.0, cpu_s=30.0)
    for prefix, suffix in ((b"CODESEC", b"RET_a1b2c3"), (b"ANSWER-", b"94011")):
        r = one.run(_scan(prefix, suffix), limits=limits)
        assert (r.status, r.stdout) == ("ok", "found 0\n"), r


def test_a_session_cannot_read_another_sessions_output_from_memory(one):
    limits = dataclasses.replace(one.limits, timeout_s=30.0, cpu_s=30.0)
    with one.session() as victim:
        assert victim.run("print('BOXED{' + str(271828 * 2) + '}')").stdout == "BOXED{543656}\n"
        with one.session(limits=limits) as spy:
            r = spy.run(_scan(b"BOXED{", b"543656}"))
            assert (r.status, r.stdout) == ("ok", "found 0\n"), r


# --------------------------------------------------------------------------- 3. files


def _dataset_files() -> list[str]:
    files = glob.glob(os.path.join(REPO, "envs", "data", "*"))
    files += glob.glob("/work/shared/data/*")
    spec = importlib.util.find_spec("envs")
    if spec is not None and spec.origin:
        files += glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "*"))
    return sorted(set(files))


READ_ALL = """
import json, os
out = {}
for path in PATHS:
    try:
        with open(path, "rb") as f:
            out[path] = "read %d bytes" % len(f.read(100))
    except OSError as e:
        out[path] = type(e).__name__
print(json.dumps(out))
"""


def test_no_dataset_file_is_readable_from_a_source_checkout(sb):
    files = _dataset_files()
    assert files, "no dataset file found to attack"
    r = run(sb, f"PATHS = {files!r}\n" + READ_ALL)
    assert r.status == "ok", r
    outcome = json.loads(r.stdout)
    assert not [p for p, o in outcome.items() if o.startswith("read")], outcome


def test_no_dataset_file_is_readable_from_a_regular_install(tmp_path):
    """The package installed as plain files in a site-packages directory (no .pth, no
    editable finder) and used from there: its envs/data must stay invisible."""
    site = tmp_path / "site-packages"
    site.mkdir()
    shutil.copytree(os.path.join(REPO, "sandbox"), site / "sandbox")
    shutil.copytree(
        os.path.join(REPO, "envs"), site / "envs", ignore=shutil.ignore_patterns("__pycache__")
    )
    data = sorted(glob.glob(str(site / "envs" / "data" / "*")))
    assert data
    script = textwrap.dedent(
        f"""
        import json, sandbox
        assert sandbox.__file__.startswith({str(site)!r}), sandbox.__file__
        from sandbox import LocalSandbox
        with LocalSandbox(workers=1) as sb:
            if sb.isolation.level != "full":
                print(json.dumps({{"skip": str(sb.isolation)}}))
                raise SystemExit(0)
            code = "PATHS = " + repr({data!r}) + "\\n" + {READ_ALL!r}
            r = sb.run(code)
            imp = sb.run("import envs")
            print(json.dumps({{"status": r.status, "stdout": r.stdout, "imp": imp.stderr}}))
        """
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["status"] == "ok", result
    outcome = json.loads(result["stdout"])
    assert not [p for p, o in outcome.items() if o.startswith("read")], outcome
    assert "ModuleNotFoundError" in result["imp"], result


def test_only_the_allow_list_exists(sb):
    r = run(
        sb,
        f"""
        import os, sys
        gone = ["/home", "/sys", "/opt", "/srv", "/mnt", "/var/lib", "/etc/hostname",
                "/etc/machine-id", "/proc/1/environ", "/root/.bashrc",
                "/work/shared", "/tmp/../work/main/README.md", {REPO + "/README.md"!r},
                {REPO + "/envs"!r}]
        # the checkout may exist only as the path to a virtualenv inside it (make's .venv)
        prefixes = tuple({{os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}})
        if os.path.isdir({REPO!r}):
            gone += [os.path.join({REPO!r}, e) for e in os.listdir({REPO!r})
                     if not any(p.startswith(os.path.join({REPO!r}, e)) for p in prefixes)]
        print([p for p in gone if os.path.exists(p)])
        # /work or /root may exist only as the path to the interpreter: every file below
        # them belongs to the Python installation.
        stray = []
        for top in ("/work", "/root"):
            for d, dirs, files in os.walk(top):
                stray += [os.path.join(d, f) for f in files
                          if not os.path.join(d, f).startswith(prefixes)]
        print(stray[:5])
        """,
        timeout_s=10,
    )
    assert r.status == "ok", r
    assert r.stdout == "[]\n[]\n", r.stdout


def test_no_inherited_descriptor_opens_a_directory(sb):
    # A directory fd from outside the root (the launcher keeps one of the host's /proc) would
    # let openat() walk around the allow list: kernels hold only their pipes and /dev/null.
    code = """
        import os, stat
        dirs = []
        for fd in range(4096):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                dirs.append(fd)
        print(dirs)
        """
    assert run(sb, code).stdout == "[]\n"
    with sb.session() as session:
        r = session.run(textwrap.dedent(code))
        assert (r.status, r.stdout) == ("ok", "[]\n"), r


def test_the_base_interpreters_site_packages_are_filtered_too(sb):
    import sysconfig

    base = os.path.join(sysconfig.get_paths()["stdlib"], "site-packages")
    if not os.path.isdir(base) or not set(os.listdir(base)) - {"README.txt"}:
        pytest.skip("the base interpreter has no site-packages of its own here")
    r = run(sb, f"import os\nprint(sorted(os.listdir({base!r})))")
    assert r.status == "ok", r
    shown = eval(r.stdout)  # noqa: S307 - our own snippet's output
    allowed = ("numpy", "sympy", "mpmath", "scipy", "networkx")
    assert all(e.split(".")[0].split("-")[0] in allowed for e in shown), shown


def test_other_packages_and_the_project_are_not_importable(sb):
    r = run(
        sb,
        """
        out = []
        for name in ("envs", "alp_agents", "sandbox", "yaml", "torch", "numpy", "sympy"):
            try:
                __import__(name)
                out.append(name)
            except ImportError:
                pass
        print(out)
        """,
    )
    assert r.stdout == "['numpy', 'sympy']\n", r


def test_host_unix_sockets_are_unreachable(sb):
    directory = tempfile.mkdtemp(prefix="alp-sock-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "host.sock")
    listeners = []
    for address in (path, "\0alp-host-abstract"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(4)
        s.setblocking(False)
        listeners.append(s)
    try:
        r = run(
            sb,
            f"""
            import socket
            for address in ({path!r}, "\\0alp-host-abstract"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(address)
                    print("connected")
                except OSError as e:
                    print("refused", type(e).__name__)
            """,
        )
        accepted = 0
        for s in listeners:
            with contextlib.suppress(BlockingIOError):
                s.accept()
                accepted += 1
    finally:
        for s in listeners:
            s.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert r.status == "ok", r
    assert "connected" not in r.stdout and r.stdout.count("refused") == 2, r
    assert accepted == 0


def test_the_tree_is_read_only_outside_scratch(sb):
    r = run(
        sb,
        """
        import os, sys, numpy
        out = []
        for path in (os.path.dirname(numpy.__file__) + "/evil.py", sys.prefix + "/evil",
                     "/usr/evil", "/etc/evil", "/evil", "/proc/evil"):
            try:
                open(path, "w").write("x")
                out.append(path)
            except OSError:
                pass
        print(out)
        """,
    )
    assert r.stdout == "[]\n", r


# --------------------------------------------------------------------------- 4. seccomp

CLONE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_clone, SYS_clone3 = 56, 435
SIGCHLD = 17
out = {}
for name, flag in (("user", 0x10000000), ("net", 0x40000000), ("pid", 0x20000000),
                   ("mnt", 0x00020000), ("ipc", 0x08000000), ("uts", 0x04000000),
                   ("cgroup", 0x02000000)):
    pid = libc.syscall(SYS_clone, flag | SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        out[name] = "created"
    else:
        out[name] = errno.errorcode[ctypes.get_errno()]
args = (ctypes.c_uint64 * 11)(0x10000000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
pid = libc.syscall(SYS_clone3, ctypes.byref(args), ctypes.sizeof(args))
if pid == 0:
    os._exit(0)
out["clone3"] = "created" if pid > 0 else errno.errorcode[ctypes.get_errno()]
print(out)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers for x86_64")
def test_clone_with_namespace_flags_and_clone3_are_refused(sb):
    r = run(sb, CLONE)
    assert r.status == "ok", r
    out = eval(r.stdout)  # noqa: S307 - our own snippet's output
    assert out.pop("clone3") == "ENOSYS", out
    assert set(out.values()) == {"EPERM"}, out


def test_exotic_socket_families_and_inotify_are_refused(sb):
    r = run(
        sb,
        """
        import ctypes, errno, os, socket
        out = {}
        for name, family in (("vsock", 40), ("netlink", 16), ("packet", 17), ("alg", 38),
                             ("bluetooth", 31), ("can", 29), ("unknown", 200)):
            try:
                socket.socket(family, socket.SOCK_STREAM if family == 40 else socket.SOCK_RAW).close()
                out[name] = "created"
            except OSError as e:
                out[name] = errno.errorcode.get(e.errno, str(e.errno))
        libc = ctypes.CDLL(None, use_errno=True)
        out["inotify"] = "created" if libc.inotify_init1(0) >= 0 else errno.errorcode[ctypes.get_errno()]
        out["fanotify"] = "created" if libc.fanotify_init(0, 0) >= 0 else "refused"
        a, b = socket.socketpair()  # AF_UNIX pairs stay available (asyncio, multiprocessing)
        a.sendall(b"x"); out["socketpair"] = b.recv(1).decode()
        print(out)
        """,
    )
    assert r.status == "ok", r
    out = eval(r.stdout)  # noqa: S307
    assert out.pop("socketpair") == "x"
    assert "created" not in out.values(), out


def test_file_locks_cannot_signal_between_sessions(one):
    with one.session() as a, one.session() as b:
        lock = "import fcntl, os, numpy\nf = open(numpy.__file__, 'rb')\n"
        r = a.run(
            lock + "out = []\n"
            "for how in (lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB),\n"
            "            lambda: fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)):\n"
            "    try:\n        how(); out.append('locked')\n"
            "    except OSError as e:\n        out.append(e.errno)\n"
            "print(out)"
        )
        assert r.status == "ok" and "locked" not in r.stdout, r
        r = b.run(
            lock + "import struct\ntry:\n"
            "    fcntl.fcntl(f, fcntl.F_GETLK, struct.pack('hhllhh', fcntl.F_WRLCK, 0, 0, 0, 0, 0))\n"
            "    print('asked')\nexcept OSError as e:\n    print(e.errno)"
        )
        assert r.status == "ok" and "asked" not in r.stdout, r


def test_the_slot_cgroup_path_is_not_visible(sb):
    r = run(sb, "print(open('/proc/self/cgroup').read())")
    assert r.status == "ok" and "alp-sandbox" not in r.stdout, r


def test_asyncio_and_multiprocessing_still_work(sb):
    r = run(
        sb,
        """
        import asyncio, multiprocessing as mp
        async def main():
            await asyncio.sleep(0)
            return 6 * 7
        with mp.get_context("fork").Pool(2) as pool:
            squares = pool.map(abs, range(0, -5, -1))
        print(asyncio.run(main()), squares)
        """,
        timeout_s=10,
    )
    assert (r.status, r.stdout) == ("ok", "42 [0, 1, 2, 3, 4]\n"), r


# --------------------------------------------------------------------------- 5. other slots


def test_abstract_unix_sockets_do_not_connect_sessions(one):
    with one.session() as a, one.session() as b:
        r = a.run(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.bind('\\0alp-covert')\n"
            "s.listen(1)\nprint('listening')"
        )
        assert r.stdout == "listening\n", r
        r = b.run(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
            "    s.connect('\\0alp-covert')\n    print('connected')\n"
            "except OSError as e:\n    print(type(e).__name__)"
        )
        assert r.status == "ok" and "connected" not in r.stdout, r
        # and a stateless run on the same server cannot reach it either
        r = one.run(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
            "    s.connect('\\0alp-covert')\n    print('connected')\n"
            "except OSError as e:\n    print(type(e).__name__)"
        )
        assert "connected" not in r.stdout, r


PID_SCAN = """
import os
seen = []
for pid in range(1, 70000):
    try:
        os.kill(pid, 0)
        seen.append(pid)
    except PermissionError:
        seen.append(pid)
    except ProcessLookupError:
        pass
groups = []
for pid in seen:
    try:
        groups.append(os.getpgid(pid))
    except OSError:
        pass
print(sorted(set(seen) - {os.getpid()}), os.path.exists("/sys/fs/cgroup"))
"""


def test_pids_of_other_kernels_cannot_be_discovered(one):
    with one.session() as a, one.session() as b:
        a.run("import subprocess\np = subprocess.Popen(['sleep', '30'])")
        r = b.run(PID_SCAN)
        assert r.status == "ok", r
        # only the slot's own init (the zygote, PID 1 of the slot's namespace) exists for it
        assert r.stdout == "[1] False\n", r


# --------------------------------------------------------------------------- 6. between calls

BURN = """
import os, threading
def burn():
    while True:
        pass
threading.Thread(target=burn, daemon=True).start()
if os.fork() == 0:
    burn()
print("burning")
"""


def test_a_session_cannot_compute_between_calls(one):
    with one.session() as s:
        assert s.run(BURN).stdout == "burning\n"
        before = _slot_cpu_s(one)
        time.sleep(1.5)
        used = _slot_cpu_s(one) - before
        assert used < 0.15, f"the session burnt {used:.2f} CPU s between calls"
        assert s.run("print('still here')").stdout == "still here\n"


def test_a_forged_early_completion_in_a_session_is_not_believed(one):
    with one.session() as s:
        assert s.run("x = 1").ok
        t0 = time.monotonic()
        r = s.run(
            "import os, struct\nos.write(4, struct.pack('>4siii', b'ALPd', 2, 0, 0))\n"
            "while True:\n    pass\n"
        )
        # the claim is ignored while the kernel's main thread is still computing
        assert r.status == "timeout", r
        assert time.monotonic() - t0 >= one.limits.timeout_s * 0.9
        before = _slot_cpu_s(one)
        time.sleep(1.0)
        assert _slot_cpu_s(one) - before < 0.15  # and nothing of it runs after the call


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to tell")
def test_a_call_uses_at_most_one_core(sb):
    r = run(
        sb,
        """
        import os, threading, time
        stop = time.monotonic() + 1.0
        def burn():
            while time.monotonic() < stop:
                pass
        threads = [threading.Thread(target=burn) for _ in range(4)]
        if os.fork() == 0:
            burn(); os._exit(0)
        t0, c0 = time.monotonic(), time.process_time()
        for t in threads: t.start()
        for t in threads: t.join()
        os.wait()
        usage = os.times()
        cpu = usage.user + usage.system + usage.children_user + usage.children_system
        print(round(cpu / (time.monotonic() - t0), 2))
        """,
        timeout_s=10,
        cpu_s=20,
    )
    assert r.status == "ok", r
    assert float(r.stdout) <= 1.25, r.stdout
    # (on a loaded machine the timing alone cannot tell: the quota is checked too)
    quotas = glob.glob("/sys/fs/cgroup/cpu/alp-sandbox-*/cpu.cfs_quota_us")
    ours = [q for q in quotas if any(f"-{p}-" in q for p in sb.launcher_pids)]
    if ours:
        for path in ours:
            with open(path) as f, open(path.replace("quota", "period")) as g:
                assert int(f.read()) == int(g.read()), path


# --------------------------------------------------------------------------- 7. scratch quota


def test_the_scratch_quota_is_shared_by_all_scratch_directories(sb):
    r = run(
        sb,
        """
        import os
        written = 0
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
            try:
                with open(f"{d}/fill", "wb") as f:
                    for _ in range(15):  # 15 x 1 MiB per file (below max_file_mb)
                        f.write(b"z" * (1 << 20))
                        written += 1 << 20
            except OSError:
                pass
        print(written >> 20, len({os.stat(d).st_dev for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")}))
        """,
        max_disk_mb=32,
        timeout_s=10,
    )
    assert r.status == "ok", r
    total, devices = map(int, r.stdout.split())
    assert total <= 32 and devices == 1, r.stdout


# --------------------------------------------------------------------------- 8. closed streams


def test_closed_stdout_and_stderr_do_not_make_the_server_spin(one):
    server = _server_pid(one.launcher_pids[0])
    before = _cpu_s(server)
    r = one.run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(1.2)\n")
    used = _cpu_s(server) - before
    assert r.status == "ok", r
    assert used < 0.4, f"the server burnt {used:.2f} CPU s while the snippet slept 1.2 s"


# --------------------------------------------------------------------------- 9. memory


def test_a_huge_numpy_allocation_fails_fast_as_memory(sb):
    r = run(sb, "import numpy as np\nx = np.ones(1_600_000_000)\nprint(x.sum())\n", timeout_s=10)
    assert r.status == "memory", r
    assert r.duration_s < 1.5, r.duration_s


def test_a_huge_numpy_allocation_fails_fast_with_the_default_limits():
    with LocalSandbox(limits=Limits(), workers=1) as sb:
        if sb.isolation.level != "full":
            pytest.skip(str(sb.isolation))
        r = sb.run("import numpy as np\nx = np.ones(1_600_000_000)\nprint(x.sum())\n")
        assert r.status == "memory", r
        assert r.duration_s < 1.5, r.duration_s
        # a legitimate large array still works
        ok = sb.run("import numpy as np\nx = np.ones(50_000_000)\nprint(int(x.sum()))\n")
        assert (ok.status, ok.stdout) == ("ok", "50000000\n"), ok


def test_pids_between_calls_are_frozen_not_killed(one):
    """Freezing keeps state: threads and children started in one call are still there."""
    with one.session() as s:
        s.run(
            "import threading, time\ncount = [0]\n"
            "def tick():\n    while True:\n        count[0] += 1\n        time.sleep(0.01)\n"
            "threading.Thread(target=tick, daemon=True).start()"
        )
        first = int(s.run("print(count[0])").stdout)
        time.sleep(1.0)
        second = int(s.run("print(count[0])").stdout)
        assert second - first < 20, (first, second)  # ~100 ticks if it had run meanwhile
        third = int(s.run("import time\ntime.sleep(0.3)\nprint(count[0])").stdout)
        assert third > second  # it runs during calls


def test_threads_used_as_a_side_channel_across_runs_do_not_exist(sb):
    """Nothing a stateless run starts outlives it (checked by the fixture) and a run
    cannot see the previous run's threads or files."""
    first = run(
        sb, "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\n"
    )
    assert first.status == "ok"
    r = run(sb, "import threading, os\nprint(threading.active_count(), os.listdir('/tmp'))")
    assert r.stdout == "1 []\n", r
