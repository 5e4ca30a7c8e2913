"""The hostile battery of issue 17: what a policy's code tries against the host, each contained.

Every case checks the run against the wall limit (+2 s), and that nothing of it is left on the host:
no file it wrote, no process it started (found by a token in their command line or file names).
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from r1jax.rl import sandbox

FAST = sandbox.SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_bytes=256 * 2**20)
SHORT = sandbox.SandboxLimits(cpu_seconds=1, wall_seconds=2, memory_bytes=256 * 2**20)  # runs that last to the wall
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sandbox.isolation_problem() is not None,
                                reason=f"no namespaces here: {sandbox.isolation_problem()}")


@pytest.fixture
def token():
    return f"r1jaxhostile{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def no_host_leftovers():
    """An isolated run makes nothing on the host (the weak fallback's work dirs are r1jax-sandbox-*)."""
    def entries():
        return {p for d in ("/tmp", "/var/tmp", "/dev/shm") for p in Path(d).glob("r1jax-sandbox-*")}
    before = entries()
    yield
    assert entries() <= before


def timed(src: str, limits=FAST, **kw) -> sandbox.SandboxResult:
    t = time.perf_counter()
    r = sandbox.run_python(textwrap.dedent(src), limits=limits, **kw)
    assert time.perf_counter() - t < limits.wall_seconds + 2
    return r


def host_pids_with(token: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and token.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def world_writable_dirs() -> list[str]:
    """Every world-writable directory of the host, three levels deep (what a run could leave files in)."""
    found = []
    for top, dirs, _ in os.walk("/"):
        if top.count("/") >= 3 or top.startswith(("/proc", "/sys")):
            dirs[:] = []
        try:
            if stat.S_IMODE(os.stat(top).st_mode) & stat.S_IWOTH:
                found.append(top)
        except OSError:
            pass
    known = {"/tmp", "/var/tmp", "/dev/shm"} | ({"/run/lock"} if Path("/run/lock").is_dir() else set())
    return sorted(set(found) | known)


def rss_peak_kb() -> int:
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")).split()[1])


def test_escape_writes_do_not_outlive_the_run(token):
    dirs = world_writable_dirs()
    writer = f"""
        import json, os
        wrote = []
        for d in {json.dumps(dirs)}:
            try:
                with open(os.path.join(d, {token!r}), "w") as f:
                    f.write("MARKER")
                wrote.append(d)
            except OSError:
                pass
        print(json.dumps(wrote))
    """
    r = timed(writer)
    assert r.ok and {"/tmp", "/dev/shm", "/var/tmp"} <= set(json.loads(r.stdout))  # its private ones
    reader = f"""
        import os
        print([d for d in {json.dumps(dirs)} if os.path.exists(os.path.join(d, {token!r}))])
    """
    r = timed(reader)
    assert r.ok and r.stdout.strip() == "[]"  # the next run starts clean
    assert [d for d in dirs if os.path.exists(os.path.join(d, token))] == []  # and the host never saw it


def test_host_unix_sockets_are_unreachable(tmp_path, token):
    os.chmod(tmp_path, 0o777)
    paths = [str(tmp_path / "s.sock"), f"/tmp/{token}.sock"]
    servers = []
    for p in paths:
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        os.chmod(p, 0o777)
        servers.append(s)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0{token}")  # abstract names are per network namespace
    servers.append(abstract)
    hits = []

    def accept(server):
        try:
            hits.append(server.accept())
        except OSError:  # closed at the end of the test: nobody came
            pass

    for s in servers:
        s.listen(1)
        threading.Thread(target=accept, args=(s,), daemon=True).start()
    try:
        r = timed(f"""
            import socket
            for addr in {paths!r} + ["\\0{token}"]:
                try:
                    c = socket.socket(socket.AF_UNIX)
                    c.connect(addr)
                    c.sendall(b"hello")
                    print("connected", addr)
                except OSError as e:
                    print("refused", type(e).__name__)
        """)
        assert r.ok and "connected" not in r.stdout and r.stdout.count("refused") == 3
        time.sleep(0.2)
        assert hits == []
    finally:
        for s in servers:
            s.close()
        os.unlink(paths[1])


def test_host_processes_and_caller_files_are_invisible(token):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", f"{token}-cmdline"])
    answers = Path("/tmp", f"{token}-answers.txt")  # world-readable, in a world-writable directory
    answers.write_text(f"{token}-answers")
    answers.chmod(0o644)
    try:
        r = timed(f"""
            import os
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        print(pid, open(f"/proc/{{pid}}/cmdline", "rb").read())
                    except OSError as e:
                        print(pid, e)
            for path in [{str(answers)!r}, {__file__!r}]:
                try:
                    print(open(path).read())
                except OSError as e:
                    print("no read", type(e).__name__)
                try:
                    os.unlink(path)
                    print("deleted", path)
                except OSError as e:
                    print("no delete", type(e).__name__)
        """)
        assert r.ok and token not in r.stdout + r.stderr and "deleted" not in r.stdout
        assert r.stdout.count("no read") == 2 and answers.read_text() == f"{token}-answers" and Path(__file__).exists()
    finally:
        victim.kill()
        victim.wait()
        answers.unlink()
    pids = [line.split()[0] for line in r.stdout.splitlines() if line.split()[0].isdigit()]
    assert set(pids) <= {"1", "2", "3"}  # its own init and itself: no host process


@pytest.mark.parametrize("stream", [1, 2])
def test_output_floods_are_cut_while_the_trainer_stays_small(stream):
    rss_before = rss_peak_kb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    r = timed(f"""
        import os
        chunk = b"x" * 65536
        while True:
            try:
                os.write({stream}, chunk)
            except OSError:
                pass
    """, limits=SHORT)
    growth_mb = (rss_peak_kb() - min(rss_before, rss_peak_kb())) / 1024
    out = r.stdout if stream == 1 else r.stderr
    assert r.output_truncated and len(out) == SHORT.max_output_bytes and set(out) == {"x"}
    assert growth_mb < 100, growth_mb


def test_output_cap_ends_a_naive_flood_early():
    r = timed("import sys\nwhile True:\n    sys.stderr.write('y' * 4096)")
    assert not r.ok and not r.timed_out and r.wall_seconds < 2 and len(r.stderr) == FAST.max_output_bytes


def test_fork_bomb_is_contained(token):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n        os.setsid()\n    except OSError:\n        pass"
    r = timed(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {token!r}])", limits=SHORT)
    assert not r.ok
    deadline = time.monotonic() + 5
    while host_pids_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_pids_with(token) == []
    assert timed("print('still fine')").ok


def test_detached_daemon_costs_no_wall_time_and_dies(token):
    r = timed(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # keeps stdout and stderr open, sleeps "forever"
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)", {token!r}])
            os._exit(0)
        print("done")
    """)
    assert r.ok and r.stdout.strip() == "done" and r.wall_seconds < 2, r
    time.sleep(0.2)
    assert host_pids_with(token) == []


def test_work_dir_quota():
    limits = sandbox.SandboxLimits(disk_bytes=4 * 2**20, max_file_bytes=64 * 2**20, wall_seconds=4)
    r = timed("""
        import os
        total = 0
        for i, d in enumerate(["/tmp", "/dev/shm"] * 4):
            try:
                with open(f"{d}/f{i}", "wb") as f:
                    f.write(b"0" * 2**20 * 2)
                total += 2
            except OSError:
                pass
        print(total)
    """, limits=limits)
    assert r.ok and int(r.stdout) <= 4  # /tmp and /dev/shm share one 4 MiB tmpfs


TWO_PROCESSES = """
import json, os, sys
from r1jax.rl import sandbox
limits = sandbox.SandboxLimits(cpu_seconds=2, wall_seconds=4 if sys.argv[1] == "honest" else 5)
if sys.argv[1] == "honest":
    jobs = [{"code": "import os, time\\ntime.sleep(0.5)\\nprint(os.getuid(), int(input()) * 2)", "stdin": str(i)}
            for i in range(8)]
    res = sandbox.run_many(jobs, limits=limits, max_concurrency=4)
else:
    hostile = "import os\\nprint(os.getuid(), flush=True)\\nwhile True:\\n" \\
              "    try:\\n        os.kill(-1, 9)\\n        os.fork()\\n    except OSError:\\n        pass"
    res = sandbox.run_many([{"code": hostile}] * 4, limits=limits, max_concurrency=4)
print(json.dumps([[r.ok, r.stdout] for r in res]))
"""


def test_two_processes_scoring_at_once_do_not_disturb_each_other():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {}
    for kind in ("hostile", "honest"):  # the hostile runs (5 s each, killed at the wall) span the honest ones
        procs[kind] = subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, kind], stdout=subprocess.PIPE, env=env)
        time.sleep(0.7)
    results = {kind: json.loads(p.communicate(timeout=60)[0]) for kind, p in procs.items()}
    honest = [stdout.split() for ok, stdout in results["honest"] if ok]
    assert [int(v) for _, v in honest] == [2 * i for i in range(8)]
    assert not any(ok for ok, _ in results["hostile"])
    hostile_uids = {stdout.split()[0] for _, stdout in results["hostile"] if stdout.strip()}
    if os.geteuid() == 0:  # leased uids: no run in either process shares one with a concurrent run
        assert not hostile_uids & {u for u, _ in honest}


NON_ROOT = """
import os, sys
from r1jax.rl import sandbox
assert sandbox.isolation_problem() is None, sandbox.isolation_problem()
mine = sys.argv[1]
r = sandbox.run_python(f"import os\\nopen('/tmp/{os.path.basename(mine)}', 'w').write('x')\\n"
                       f"try:\\n    print(open({mine!r}).read())\\nexcept OSError as e:\\n    print('no', e)\\n"
                       f"try:\\n    os.unlink({mine!r})\\nexcept OSError as e:\\n    print('no', e)")
print(r.ok, sum(l.startswith("no ") for l in r.stdout.splitlines()), open(mine).read())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
                    reason="needs root to switch to an unprivileged user, setpriv and /usr/bin/python3")
def test_unprivileged_caller_uses_a_user_namespace(token):
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    if subprocess.run([*as_nobody, "import r1jax.rl.sandbox"], env=env, capture_output=True).returncode:
        pytest.skip("the checkout is not readable by an unprivileged user")
    home = Path(tempfile.mkdtemp(prefix=token))  # the caller's own private directory and file
    try:
        mine = home / "answers.txt"
        mine.write_text("the caller's secret")
        for p in (home, mine):
            os.chown(p, 65534, 65534)
        home.chmod(0o700)
        mine.chmod(0o600)
        p = subprocess.run([*as_nobody, NON_ROOT, str(mine)], capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[:2] == ["True", "2"] and "the caller's secret" in p.stdout
        assert not Path("/tmp", "answers.txt").exists() and mine.read_text() == "the caller's secret"
    finally:
        shutil.rmtree(home)


def test_sysv_shared_memory_is_bounded_by_the_quota():
    r = timed("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        IPC_CREAT = 0o1000
        print(libc.shmget(0, 2**20, IPC_CREAT | 0o600) >= 0)  # a small segment is fine
        print([libc.shmget(0, 200 * 2**20, IPC_CREAT | 0o600) for _ in range(3)])
    """)
    assert r.ok and r.stdout.split("\n")[:2] == ["True", "[-1, -1, -1]"]


KILLED_TRAINER = """
import os
from r1jax.rl import sandbox
sandbox.isolation_problem()
print("probed", flush=True)
sandbox.run_python("import os, sys, time\\nif os.fork() == 0:\\n    os.setsid()\\n"
                   f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1000)', {os.environ['TOKEN']!r}])\\n"
                   "time.sleep(1000)", limits=sandbox.SandboxLimits(wall_seconds=30))
"""


def test_a_killed_trainer_takes_its_runs_with_it(token):
    trainer = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "TOKEN": token})  # not in its cmdline
    assert trainer.stdout.readline().strip() == b"probed"
    deadline = time.monotonic() + 10
    while not host_pids_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_pids_with(token) and trainer.pid not in host_pids_with(token)  # the daemon runs
    trainer.kill()  # SIGKILL: no cleanup code of the trainer runs
    trainer.wait()
    deadline = time.monotonic() + 3
    while host_pids_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_pids_with(token) == []  # the launcher's and init's parent-death signals ended it all
