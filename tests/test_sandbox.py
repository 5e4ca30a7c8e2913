"""Hostile code is contained: reward 0 (or a failed run), bounded time, host unaffected."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from r1jax.rl import sandbox
from r1jax.rl.rewards import code

FAST = sandbox.SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_bytes=256 * 2**20)

pytestmark = pytest.mark.skipif(sandbox.isolation_problem() is not None,
                                reason=f"the sandbox refuses to run here: {sandbox.isolation_problem()}")


def _leftover_pids():
    """Live processes of any sandbox uid (zombies are dead already; their parent reaps them)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                lines = (d / "status").read_text().splitlines()
                uid = int(next(l for l in lines if l.startswith("Uid:")).split()[1])
                state = next(l for l in lines if l.startswith("State:")).split()[1]
            except (OSError, StopIteration, ValueError):
                continue
            if sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_COUNT and state != "Z":
                out.append(int(d.name))
    return out


def test_ordinary_code_runs():
    r = sandbox.run_python("import sys\nprint(int(sys.stdin.read()) * 3)", stdin="14", limits=FAST)
    assert r.ok and r.stdout.strip() == "42"


def test_infinite_loop_is_stopped_by_cpu_limit():
    t = time.perf_counter()
    r = sandbox.run_python("while True:\n    pass", limits=FAST)
    assert not r.ok and time.perf_counter() - t < FAST.wall_seconds + 2


def test_sleeping_forever_is_stopped_by_wall_limit():
    t = time.perf_counter()
    r = sandbox.run_python("import time\ntime.sleep(1000)", limits=FAST)
    assert r.timed_out and time.perf_counter() - t < FAST.wall_seconds + 2


def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n        os.setsid()\n    except OSError:\n        pass"
    t = time.perf_counter()
    r = sandbox.run_python(bomb, limits=FAST)
    assert not r.ok and time.perf_counter() - t < FAST.wall_seconds + 3
    # Every process is SIGKILLed by then; on a loaded host the dying ones may take a moment to exit.
    deadline = time.monotonic() + 10
    while _leftover_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftover_pids() == []
    assert sandbox.run_python("print('still fine')", limits=FAST).ok  # host can still spawn


def test_memory_bomb_fails_inside():
    r = sandbox.run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", limits=FAST)
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o755)
    r = sandbox.run_python(f"open({str(target)!r}, 'w').write('pwned')", limits=FAST)
    assert not r.ok and target.read_text() == "original"
    r = sandbox.run_python(f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')", limits=FAST)
    assert not r.ok and not (tmp_path / "new.txt").exists()


def test_huge_file_is_cut_by_file_size_limit():
    r = sandbox.run_python("f = open('big', 'wb')\nf.write(b'0' * (64 * 2**20))\nprint('wrote')", limits=FAST)
    assert not r.ok and "wrote" not in r.stdout


def test_socket_cannot_reach_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    hits = []
    threading.Thread(target=lambda: hits.append(server.accept()), daemon=True).start()
    r = sandbox.run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                           "print('connected')", limits=FAST)
    server.close()
    assert not r.ok and "connected" not in r.stdout and not hits


def test_parent_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("R1JAX_TEST_SECRET", "hunter2")
    r = sandbox.run_python("import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())",
                           limits=FAST)
    assert r.ok and "hunter2" not in r.stdout and "R1JAX_TEST_SECRET" not in r.stdout


def test_code_reward_on_hostile_and_honest_solutions():
    tests = [[{"input": "2 3", "output": "5"}, {"input": "10 -4", "output": "6"}]] * 4
    solutions = [
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "```python\nwhile True:\n    pass\n```",
        "```python\nimport os\nprint(os.environ.get('HOME'))\n```",
        "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n```",
    ]
    t = time.perf_counter()
    rewards = code(["p"] * 4, solutions, tests=tests, cpu_seconds=1, wall_seconds=3, max_concurrency=4)
    assert rewards == [1.0, 0.0, 0.0, 0.5]
    assert time.perf_counter() - t < 15
    assert code(["p"], ["no code here"], tests=tests[:1]) == [0.0]


def test_untrusted_code_runs_at_low_priority():
    r = sandbox.run_python("import os\nprint(os.nice(0))", limits=FAST)
    assert r.ok and int(r.stdout) == 19
    with pytest.raises(sandbox.ConfigError, match="sandbox.nice"):
        sandbox.SandboxLimits(nice=25)
