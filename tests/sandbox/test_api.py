"""Behaviour of the public API against the real sandbox: statuses, output, tracebacks,
sessions, concurrency, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sandbox import STATUSES, ExecutionResult, Limits, LocalSandbox, SandboxUnavailable
from sandbox.audit import cgroups_of_servers, processes_of_servers
from sandbox.result import HeadTailBuffer


def test_ok_result_fields(sb):
    r = sb.run("print('hello')")
    assert isinstance(r, ExecutionResult)
    assert (r.stdout, r.stderr, r.status, r.exit_code, r.truncated) == (
        "hello\n",
        "",
        "ok",
        0,
        False,
    )
    assert r.ok and r.duration_s > 0
    assert r.status in STATUSES


def test_isolation_is_reported(sb):
    report = sb.isolation
    assert report.level in ("full", "partial", "none")
    assert report.level in str(report)
    assert report.to_dict()["level"] == report.level


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("x = 1", "ok"),
        ("raise ValueError('bad')", "error"),
        ("import time\ntime.sleep(10)", "timeout"),
        ("print('x' * 100000)", "output_limit"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed"),
        ("x = bytearray(64 * 1024**3)", "memory"),
        ("def broken(:\n    pass", "error"),
    ],
)
def test_statuses(sb, code, status):
    assert sb.run(code).status == status


def test_error_traceback_uses_the_snippets_line_numbers(sb):
    r = sb.run("a = 1\nb = 0\nprint(a / b)\n")
    assert r.status == "error" and r.exit_code == 1
    assert 'File "<snippet>", line 3, in <module>' in r.stderr
    assert "print(a / b)" in r.stderr
    assert "ZeroDivisionError: division by zero" in r.stderr
    assert "sandbox" not in r.stderr.replace("<snippet>", "")  # none of our frames


def test_traceback_inside_a_function(sb):
    r = sb.run("def f(x):\n    return x[5]\n\nf([1])\n")
    assert 'File "<snippet>", line 4, in <module>' in r.stderr
    assert 'File "<snippet>", line 2, in f' in r.stderr


def test_syntax_error_points_at_the_line(sb):
    r = sb.run("x = 1\ny = (2 +\n")
    assert r.status == "error"
    assert "SyntaxError" in r.stderr and "<snippet>" in r.stderr and "line 2" in r.stderr


def test_input_sees_end_of_file(sb):
    r = sb.run("try:\n    input('? ')\nexcept EOFError:\n    print('eof')\n")
    assert (r.status, r.stdout) == ("ok", "? eof\n")


def test_output_over_the_cap_keeps_head_and_tail(sb):
    r = sb.run("import sys\nsys.stdout.write('A' * 3000)\nsys.stdout.write('B' * 3000)\n")
    assert r.status == "output_limit" and r.truncated
    assert r.stdout.startswith("A" * 2000)
    assert r.stdout.endswith("B" * 2000)
    assert "truncated" in r.stdout
    assert "output exceeded 4096 bytes" in r.stderr


def test_stderr_and_stdout_are_separate(sb):
    r = sb.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert (r.stdout, r.stderr) == ("out\n", "err\n")


def test_per_call_limits_override_the_default(sb):
    r = sb.run("while True: pass", limits=Limits(timeout_s=0.3))
    assert r.status == "timeout"
    assert "exceeded its 0.3 s limit" in r.stderr  # not the sandbox's 2 s default


def test_cpu_limit_is_a_timeout(sb):
    r = sb.run("while True: pass", limits=Limits(timeout_s=5.0, cpu_s=0.5))
    assert r.status == "timeout"


def test_run_many_keeps_input_order(sb):
    codes = [
        f"import time, random\ntime.sleep(random.random() / 50)\nprint({i})" for i in range(12)
    ]
    results = sb.run_many(codes)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert sb.run_many([]) == []


def test_arun_runs_concurrently_with_asyncio(sb):
    async def main():
        return await asyncio.gather(*(sb.arun(f"print({i} * {i})") for i in range(6)))

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]


def test_stateless_runs_share_nothing(sb):
    sb.run("x = 41\nimport math\nmath.tau = 0")
    r = sb.run("import math\nprint('x' in globals(), math.tau > 6)")
    assert r.stdout == "False True\n"


# --------------------------------------------------------------------------- sessions


def test_session_keeps_variables_imports_and_functions(sb):
    with sb.session() as s:
        assert s.run("import fractions\nx = 20").status == "ok"
        assert s.run("def double(v):\n    return 2 * v").status == "ok"
        r = s.run("print(double(x) + 2, fractions.Fraction(1, 3))")
        assert (r.status, r.stdout) == ("ok", "42 1/3\n")
        r = s.run("undefined_name")
        assert r.status == "error" and 'File "<cell 4>", line 1' in r.stderr
        assert s.run("print(x)").stdout == "20\n"  # an error does not lose state


def test_sessions_are_independent(sb):
    with sb.session() as a, sb.session() as b:
        a.run("v = 'a'")
        b.run("v = 'b'")
        assert (a.run("print(v)").stdout, b.run("print(v)").stdout) == ("a\n", "b\n")


def test_closing_a_session_kills_what_it_started(sb):
    launchers = sb.launcher_pids
    with sb.session() as s:
        r = s.run(
            "import subprocess\n"
            "p = subprocess.Popen(['sleep', '60'])\n"
            "import threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "print(p.pid > 0)"
        )
        assert r.stdout == "True\n"
        uids_with_two = [u for _, u in processes_of_servers(launchers)]
        assert any(uids_with_two.count(u) >= 2 for u in uids_with_two)  # kernel + sleep
        assert sb.audit()["stray_processes"]  # the audit does see the extra process
    deadline = time.monotonic() + 3
    while sb.audit()["stray_processes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sb.audit()["stray_processes"] == []


def test_session_timeout_restarts_with_a_note(sb):
    with sb.session() as s:
        s.run("x = 1")
        assert s.run("while True: pass").status == "timeout"
        r = s.run("print('x' in globals())")
        assert r.stdout == "False\n"
        assert "state was lost" in r.stderr
        assert s.restarts == 1
        assert s.run("print(2)").stderr == ""


def test_sys_exit_in_a_session_keeps_state(sb):
    with sb.session() as s:
        s.run("y = 5")
        r = s.run("import sys\nsys.exit(2)")
        assert (r.status, r.exit_code) == ("error", 2)
        assert s.run("print(y)").stdout == "5\n"


def test_closed_session_refuses(sb):
    s = sb.session()
    with s:
        s.run("pass")
    with pytest.raises(RuntimeError, match="closed"):
        s.run("pass")


# --------------------------------------------------------------------------- failures


def _kill_server_soon(sb, delay: float) -> threading.Thread:
    pids = list(sb.launcher_pids)

    def killer():
        time.sleep(delay)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    return t


def test_server_crash_mid_run_is_a_sandbox_error_and_the_next_run_works():
    with LocalSandbox(limits=Limits(timeout_s=5.0), workers=1) as sb:
        old = sb.launcher_pids
        killer = _kill_server_soon(sb, 0.5)
        r = sb.run("import time\ntime.sleep(3)")
        killer.join()
        assert r.status == "sandbox_error"
        assert "restarted" in r.stderr
        assert sb.run("print(7)").stdout == "7\n"
        assert sb.launcher_pids != old
        assert sb.isolation.level == "full" or sb.isolation.level == "partial"
        with sb.session() as s:
            s.run("z = 3")
            _kill_server_soon(sb, 0).join()
            time.sleep(0.2)
            # Our infrastructure lost the state: that call is a sandbox_error (never scored),
            # and the next one runs in a fresh process.
            r = s.run("print('z' in globals())")
            assert r.status == "sandbox_error" and "state was lost" in r.stderr
            r = s.run("print('z' in globals())")
            assert (r.status, r.stdout) == ("ok", "False\n")
        deadline = time.monotonic() + 3
        while cgroups_of_servers(old) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cgroups_of_servers(old) == []


def test_servers_die_with_their_host_process(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from sandbox import LocalSandbox
        sb = LocalSandbox(workers=2).start()
        with sb.session() as s:
            s.run("import subprocess; subprocess.Popen(['sleep', '60'])")
            print(*sb.launcher_pids, flush=True)
            os._exit(0)  # no clean-up at all
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    launchers = [int(p) for p in out.stdout.split()]
    assert len(launchers) == 2, out.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        any(os.path.exists(f"/proc/{p}") for p in launchers)
        or processes_of_servers(launchers)
        or cgroups_of_servers(launchers)
    ):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in launchers)
    assert processes_of_servers(launchers) == []
    assert cgroups_of_servers(launchers) == []


def test_the_launcher_removes_the_cgroups_of_a_server_that_died_with_its_host(tmp_path):
    # A server killed before it could clean up (e.g. while starting, when its host died)
    # leaves its slot cgroups to the launcher, whose /proc is the server's pid namespace's.
    script = textwrap.dedent(
        """
        import os, signal
        from sandbox import LocalSandbox
        from sandbox.audit import cgroups_of_servers
        sb = LocalSandbox(workers=1).start()
        with sb.session() as s:
            s.run("x = 1")
            launcher = sb.launcher_pids[0]
            print(launcher, len(cgroups_of_servers([launcher])), flush=True)
            with open(f"/proc/{launcher}/task/{launcher}/children") as f:
                server = int(f.read().split()[0])
            os.kill(server, signal.SIGKILL)  # no shutdown of its own
            os._exit(0)  # and no clean-up by the host
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    launcher, made = (int(v) for v in out.stdout.split())
    assert made > 0, "the server had slot cgroups"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        os.path.exists(f"/proc/{launcher}") or cgroups_of_servers([launcher])
    ):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{launcher}")
    assert cgroups_of_servers([launcher]) == []
    assert processes_of_servers([launcher]) == []


def test_two_sandboxes_at_once_use_distinct_slots(sb):
    with LocalSandbox(workers=1) as other:
        assert set(other.launcher_pids).isdisjoint(sb.launcher_pids)
        a = sb.run("import os; print(os.getuid())").stdout
        b = other.run("import os; print(os.getuid())").stdout
        assert a != b


def test_no_isolation_is_refused_unless_opted_in():
    with pytest.raises(SandboxUnavailable, match="NO ISOLATION"):
        LocalSandbox(workers=1, isolate=False).start()
    with (
        pytest.warns(UserWarning, match="NO ISOLATION"),
        LocalSandbox(workers=1, isolate=False, allow_unisolated=True) as sb,
    ):
        assert sb.isolation.level == "none"
        assert sb.run("print(3)").stdout == "3\n"


# --------------------------------------------------------------------------- values


def test_limits_validate_and_round_trip():
    limits = Limits(timeout_s=1.5, memory_mb=100)
    assert Limits.from_dict(limits.to_dict()) == limits
    with pytest.raises(ValueError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="memry_mb"):
        Limits.from_dict({"memry_mb": 3})
    assert (Limits().timeout_s, Limits().memory_mb) == (3.0, 2048)


def test_head_tail_buffer():
    buf = HeadTailBuffer(8)
    buf.write(b"0123")
    assert (buf.getvalue(), buf.truncated) == (b"0123", False)
    buf.write(b"456789abcdef")
    assert buf.truncated and buf.total == 16
    value = buf.getvalue()
    assert value.startswith(b"0123") and value.endswith(b"cdef") and b"8 bytes truncated" in value


def test_session_cpu_budget_is_per_call_not_per_session():
    limits = Limits(timeout_s=10.0, cpu_s=1.0)  # generous wall time: the CPU is shared
    with LocalSandbox(limits=limits, workers=1) as sb, sb.session() as s:
        burn = (
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass\n"
        )
        # 3 x 0.5 s of CPU > the 1 s per-call budget, but each call stays within it
        assert [s.run(burn).status for _ in range(3)] == ["ok"] * 3
        assert s.run("while True:\n    pass\n").status == "timeout"


def test_lazy_start_from_many_threads_starts_each_server_once():
    sb = LocalSandbox(workers=2)
    try:
        results = sb.run_many(["print(1)"] * 8)  # 8 threads race to start the sandbox
        assert [r.stdout for r in results] == ["1\n"] * 8
        assert len(set(sb.launcher_pids)) == 2
    finally:
        launchers = sb.launcher_pids
        sb.close()
    assert cgroups_of_servers(launchers) == []


def test_a_forged_completion_record_does_not_desynchronise_a_session(sb):
    with sb.session() as s:
        forged = (
            "import os, struct, time\n"
            "os.write(4, struct.pack('>4siii', b'ALPd', 1, 0, 0))\n"  # cell 1 claims completion
            "time.sleep(0.3)\n"
            "late = 'late'\n"
        )
        # A snippet may always end its call early; the session is frozen at once, so the
        # rest of the cell runs only while the next call's clock runs.
        assert s.run(forged).status == "ok"
        time.sleep(0.5)
        assert s.run("print(late)").stdout == "late\n"  # cell 1's own record was ignored
        assert s.run("print(2 + 2)").stdout == "4\n"


def test_garbage_on_the_record_descriptor_fails_only_that_call(sb):
    with sb.session() as s:
        s.run("x = 1")
        r = s.run("import os\nos.write(4, b'{\"exit\": 0}' * 8)\nimport time\ntime.sleep(5)")
        assert r.status == "error" and "malformed completion record" in r.stderr
        r = s.run("print(2 + 2)")
        assert (r.status, r.stdout) == ("ok", "4\n") and "state was lost" in r.stderr


def test_a_session_dropped_without_close_is_cleaned_up(sb):
    import gc

    s = sb.session()
    s.run("import subprocess\np = subprocess.Popen(['sleep', '60'])")
    assert sb.audit()["stray_processes"]  # the sleep
    del s
    gc.collect()
    sb.run("pass")  # the worker closes abandoned kernels before its next request
    deadline = time.monotonic() + 3
    while sb.audit()["stray_processes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sb.audit()["stray_processes"] == []


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def test_a_dead_template_restarts_the_worker_and_runs_go_on():
    with LocalSandbox(limits=Limits(timeout_s=5.0), workers=1) as sb:
        if not sb.isolation.clean_template:
            pytest.skip(str(sb.isolation))
        launcher = sb.launcher_pids[0]
        with open(f"/proc/{launcher}/task/{launcher}/children") as f:
            server = int(f.read().split()[0])
        with open(f"/proc/{server}/task/{server}/children") as f:
            template = int(f.read().split()[0])
        assert sb.run("print(1)").stdout == "1\n"
        os.kill(template, signal.SIGKILL)
        time.sleep(0.2)
        statuses = [sb.run("print(2)").status for _ in range(3)]
        assert statuses[-1] == "ok", statuses
        assert statuses.count("sandbox_error") <= 1, statuses  # never a scored failure
        assert set(statuses) <= {"ok", "sandbox_error"}, statuses


def test_closing_leaves_no_mount_and_no_process_on_the_host():
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    sb = LocalSandbox(workers=1).start()
    launchers = sb.launcher_pids
    tree = [p for launcher in launchers for p in _descendants(launcher)]
    with sb.session() as s:
        s.run("import subprocess\np = subprocess.Popen(['sleep', '60'])")
        assert sb.run("print(1)").ok
    sb.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in tree):
        time.sleep(0.05)
    assert [p for p in tree if os.path.exists(f"/proc/{p}")] == []
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts
    assert cgroups_of_servers(launchers) == []
