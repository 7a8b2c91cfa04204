"""Real attacks against the real sandbox. Each must be contained: the snippet gets a clear
non-ok status (or a harmless ok), the host and the server keep working, and the per-test
fixture checks that no process is left behind (the module fixture checks cgroups)."""

from __future__ import annotations

import dataclasses
import os
import socket
import textwrap
import threading

import pytest

pytestmark = pytest.mark.security


def run(sb, code: str, **limits):
    """Run an attack; ``limits`` override the module's tight limits. Attacks that end by
    themselves (memory, files) get a longer wall timeout so a loaded CPU cannot turn their
    verdict into ``timeout``; it costs nothing when they end early."""
    override = dataclasses.replace(sb.limits, **limits) if limits else None
    return sb.run(textwrap.dedent(code), limits=override)


# --------------------------------------------------------------------------- CPU and time


def test_infinite_loop_times_out(sb):
    r = run(sb, "while True:\n    pass\n")
    assert r.status == "timeout"
    assert "TimeoutError" in r.stderr


def test_busy_loop_ignoring_sigterm_times_out(sb):
    r = run(
        sb,
        """
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            signal.signal(s, signal.SIG_IGN)
        print("ignoring", flush=True)
        while True:
            pass
        """,
    )
    assert r.status == "timeout"
    assert r.stdout == "ignoring\n"


# --------------------------------------------------------------------------- processes


def test_fork_bomb_is_contained(sb):
    r = run(
        sb,
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
    )
    assert r.status in ("timeout", "error", "killed")


def test_thread_bomb_is_contained(sb):
    r = run(
        sb,
        """
        import threading, time
        threads = []
        while True:
            t = threading.Thread(target=time.sleep, args=(60,))
            t.start()
            threads.append(t)
        """,
    )
    assert r.status in ("error", "timeout")
    assert r.status == "timeout" or "thread" in r.stderr.lower()


def test_double_fork_daemon_does_not_outlive_the_run(sb):
    r = run(
        sb,
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            os._exit(0)
        os.wait()
        print("parent done")
        """,
    )
    assert r.status == "ok" and r.stdout == "parent done\n"
    # the `sb` fixture asserts that the daemon is gone


def test_kill_parent_kill_minus_one_and_pid_1_fail(sb):
    r = run(
        sb,
        """
        import os, signal
        results = []
        for target in (os.getppid(), 1):
            try:
                os.kill(target, signal.SIGKILL)
                results.append("killed")
            except PermissionError:
                results.append("denied")
            except ProcessLookupError:
                results.append("nosuch")
        print(results, flush=True)
        try:
            os.kill(-1, signal.SIGKILL)  # every process we may signal: only our own (none)
        except ProcessLookupError:
            pass
        print("survived kill(-1)", flush=True)
        os.killpg(0, signal.SIGKILL)  # our process group: the server is immune, we are not
        """,
    )
    assert r.stdout == "['denied', 'denied']\nsurvived kill(-1)\n", r
    assert r.status == "killed" and r.exit_code == -9
    # the `sb` fixture checks that the server still answers


def test_sys_exit_and_os_exit(sb):
    assert run(sb, "import sys; sys.exit(0)").status == "ok"
    r = run(sb, "import sys; print('a'); sys.exit(3)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, "a\n")
    r = run(sb, "import os; print('b', flush=True); os._exit(7)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 7, "b\n")
    r = run(sb, "import sys; sys.exit('fatal message')")
    assert r.status == "error" and "fatal message" in r.stderr


def test_ctypes_segfault_is_reported_as_killed(sb):
    r = run(sb, "import ctypes\nctypes.string_at(0)\n")
    assert r.status == "killed"
    assert "SIGSEGV" in r.stderr


# --------------------------------------------------------------------------- memory


def test_single_huge_allocation(sb):
    r = run(sb, "x = bytearray(64 * 1024**3)\nprint('allocated')\n", timeout_s=10)
    assert r.status == "memory"
    assert "allocated" not in r.stdout


def test_touched_allocation_beyond_cgroup_limit(sb):
    r = run(sb, "import numpy as np\nx = np.ones(10**9 // 8 * 4)\nprint(x.sum())\n", timeout_s=10)
    assert r.status == "memory"


def test_gradual_memory_growth(sb):
    r = run(sb, "chunks = []\nwhile True:\n    chunks.append(b'x' * 10**6)\n", timeout_s=10)
    assert r.status == "memory"


def test_deep_recursion_with_raised_limit(sb):
    r = run(
        sb,
        """
        import sys
        sys.setrecursionlimit(10**8)
        def f(n):
            return f(n + 1) + 1
        f(0)
        """,
        timeout_s=10,
    )
    assert r.status in ("killed", "memory", "error")


# --------------------------------------------------------------------------- files


def test_ten_gigabyte_file_hits_max_file_size(sb):
    r = run(
        sb,
        """
        chunk = b"x" * (1 << 20)
        with open("/tmp/big", "wb") as f:
            for _ in range(10 * 1024):
                f.write(chunk)
        """,
        timeout_s=10,
    )
    assert r.status == "error"
    assert "File too large" in r.stderr


def test_sparse_ten_gigabyte_file_is_refused(sb):
    r = run(sb, "f = open('big', 'wb')\nf.seek(10 * 1024**3)\nf.write(b'x')\nf.close()\n")
    assert r.status == "error" and "File too large" in r.stderr


def test_many_medium_files_fill_only_the_private_tmpfs(sb):
    r = run(
        sb,
        """
        import os
        chunk = b"y" * (8 << 20)
        for i in range(1000):
            with open(f"/tmp/medium{i}", "wb") as f:
                f.write(chunk)
        """,
        timeout_s=10,
    )
    assert r.status in ("error", "memory")
    assert r.status == "memory" or "No space left" in r.stderr


def test_writes_outside_the_scratch_space_fail(sb, tmp_path):
    host_targets = [os.path.join(os.getcwd(), "alp_attack_cwd"), "/etc/alp_attack", "/alp_attack"]
    r = run(
        sb,
        f"""
        outcomes = {{}}
        for path in {host_targets!r}:
            try:
                open(path, "w").write("pwned")
                outcomes[path] = "written"
            except OSError as e:
                outcomes[path] = type(e).__name__
        # the scratch space is private: these land in the snippet's own tmpfs
        for path in ("/tmp/alp_attack_tmp", "/dev/shm/alp_attack_shm", "/var/tmp/alp_attack"):
            open(path, "w").write("pwned")
            outcomes[path] = "written"
        print(outcomes)
        """,
    )
    assert r.status == "ok", r
    for path in host_targets:
        assert f"'{path}': 'written'" not in r.stdout
        assert not os.path.exists(path)
    for path in ("/tmp/alp_attack_tmp", "/dev/shm/alp_attack_shm", "/var/tmp/alp_attack"):
        assert not os.path.exists(path), f"{path} reached the host"


def test_nothing_survives_into_the_next_run(sb):
    first = run(
        sb,
        """
        import builtins, math, os
        open("/tmp/marker", "w").write("left behind")
        open("marker2", "w").write("left behind")
        math.pi = 3
        builtins.print = lambda *a, **k: None
        os.environ["INJECTED"] = "1"
        """,
    )
    assert first.status == "ok", first
    second = run(
        sb,
        """
        import math, os
        print(os.path.exists("/tmp/marker"), os.path.exists("marker2"), math.pi, "INJECTED" in os.environ)
        """,
    )
    assert second.stdout == f"False False {__import__('math').pi} False\n", second


# --------------------------------------------------------------------------- output


def test_a_gigabyte_of_stdout_is_cut(sb):
    r = run(
        sb,
        """
        import sys
        block = "z" * 65536
        for _ in range(16384):
            sys.stdout.write(block)
        """,
    )
    assert r.status == "output_limit" and r.truncated
    assert len(r.stdout) <= 4096 + 100
    assert r.stdout.startswith("zzz") and r.stdout.rstrip().endswith("z")


# --------------------------------------------------------------------------- secrets


def test_shadow_is_unreadable(sb):
    r = run(sb, "print(open('/etc/shadow').read())")
    assert r.status == "error" and "PermissionError" in r.stderr
    assert "root:" not in r.stdout


def test_trainer_environment_does_not_leak(sb, fake_secret):
    assert "ALP_FAKE_SECRET" not in os.environ  # it was only there while the servers started
    r = run(
        sb,
        f"""
        import os
        found = [k for k, v in os.environ.items() if "alp-fake-secret" in v]
        blobs = []
        for pid in os.listdir("/proc"):
            if pid.isdigit() or pid == "self":
                for part in ("environ", "cmdline"):
                    try:
                        blobs.append(open(f"/proc/{{pid}}/{{part}}", "rb").read())
                    except OSError:
                        pass
        for pid in (1, {os.getpid()}, {os.getppid()}):
            try:
                blobs.append(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError:
                pass
        print(found, any(b"alp-fake-secret" in b for b in blobs), sorted(os.environ))
        """,
    )
    assert r.status == "ok", r
    assert fake_secret not in r.stdout and fake_secret not in r.stderr
    assert r.stdout.startswith("[] False")


def test_other_processes_are_invisible(sb):
    r = run(
        sb,
        f"""
        import os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(pids == [os.getpid()], os.path.exists("/proc/{os.getpid()}/cmdline"))
        try:
            print(open("/proc/1/cmdline").read())
        except OSError as e:
            print(type(e).__name__)
        """,
    )
    assert r.status == "ok", r
    lines = r.stdout.splitlines()
    assert lines[0] == "True False"
    assert "sandbox" not in lines[1]


def test_home_and_callers_directory_are_hidden(sb):
    r = run(
        sb,
        f"""
        import os
        print(sorted(os.listdir("/root")), os.listdir({os.getcwd()!r}) if os.path.isdir({os.getcwd()!r}) else "gone")
        """,
    )
    assert r.status == "ok", r
    assert ".bashrc" not in r.stdout and "pyproject.toml" not in r.stdout


# --------------------------------------------------------------------------- network


class _Listener:
    """A real TCP listener on 127.0.0.1 that records whether anything connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


def test_network_is_empty(sb):
    listener = _Listener()
    try:
        # sanity: the host itself can connect to the listener
        socket.create_connection(("127.0.0.1", listener.port), timeout=1).close()
        r = run(
            sb,
            f"""
            import socket
            for addr in (("127.0.0.1", {listener.port}), ("192.0.2.1", 80)):
                try:
                    socket.create_connection(addr, timeout=0.5).close()
                    print("connected", addr)
                except OSError as e:
                    print("blocked", addr[0], type(e).__name__)
            """,
        )
    finally:
        listener.close()
    assert r.status == "ok", r
    assert "connected" not in r.stdout
    assert r.stdout.count("blocked") == 2
    assert listener.connections == 1  # only the host's own sanity connection


def test_shared_memory_does_not_survive_the_run(sb):
    first = run(
        sb,
        """
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(name="alp_attack_shm", create=True, size=4096)
        shm.buf[:5] = b"hello"
        print("created")
        """,
    )
    assert first.stdout == "created\n", first
    second = run(
        sb,
        """
        from multiprocessing import shared_memory
        try:
            shared_memory.SharedMemory(name="alp_attack_shm")
            print("found")
        except FileNotFoundError:
            print("gone")
        """,
    )
    assert second.stdout == "gone\n", second
    assert not os.path.exists("/dev/shm/alp_attack_shm")
