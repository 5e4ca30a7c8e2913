"""Without namespaces the code reward refuses to run unless `allow_weak_isolation` is set; then the weak
fallback (rl/sandbox_weak.py) still reads output as it comes and does not wait for detached children.
Runs wherever a child process can be made: the missing isolation is simulated."""

import fcntl
import os
import struct
import time

import pytest

from r1jax.config import RewardSpec
from r1jax.rl import sandbox
from r1jax.rl.rewards import code, reward_set

FAST = sandbox.SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_bytes=256 * 2**20)


def timed(src: str, limits) -> sandbox.SandboxResult:
    t = time.perf_counter()
    r = sandbox.run_python(src, limits=limits)
    assert time.perf_counter() - t < limits.wall_seconds + 2
    return r


def test_refuses_without_namespaces_unless_weak_isolation_is_allowed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda limits=None: "unshare(...): Operation not permitted")
    with pytest.raises(sandbox.SandboxUnavailable, match="allow_weak_isolation"):
        sandbox.run_python("print(1)", limits=FAST)
    with pytest.raises(sandbox.SandboxUnavailable, match="Operation not permitted"):
        reward_set([RewardSpec("code")])
    reward_set([RewardSpec("code", kwargs={"allow_weak_isolation": True})])
    tests = [[{"input": "2 3", "output": "5"}]]
    good = ["```python\na, b = map(int, input().split())\nprint(a + b)\n```"]
    with caplog.at_level("WARNING", logger="r1jax.rl.sandbox"):
        assert code(["p"], good, tests=tests, allow_weak_isolation=True, cpu_seconds=2, wall_seconds=4) == [1.0]
    assert "weak isolation" in caplog.text and "Operation not permitted" in caplog.text
    # The weak path also reads output as it comes and does not wait for a detached child.
    weak = sandbox.SandboxLimits(cpu_seconds=2, wall_seconds=4, allow_weak_isolation=True)
    r = timed("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\nprint('done')", limits=weak)
    assert r.ok and r.wall_seconds < 2
    r = timed("import sys\nwhile True:\n    sys.stdout.write('z' * 4096)", limits=weak)
    assert r.output_truncated and len(r.stdout) == weak.max_output_bytes


def test_uid_leases_are_exclusive_until_released():
    """Each lease is its own open file description, so leases exclude each other within a process as
    across processes (an OFD lock per uid); closing the fd gives the uid back."""
    held = [sandbox.lease_uid() for _ in range(8)]
    uids = [u for u, _ in held]
    assert len(set(uids)) == 8 and all(sandbox.UID_BASE <= u < sandbox.UID_BASE + sandbox.UID_COUNT for u in uids)
    probe = os.open(os.readlink(f"/proc/self/fd/{held[0][1]}"), os.O_RDWR)
    try:
        def free(uid):
            try:
                fcntl.fcntl(probe, fcntl.F_OFD_SETLK,
                            struct.pack(sandbox._FLOCK, fcntl.F_WRLCK, os.SEEK_SET, uid - sandbox.UID_BASE, 1, 0))
            except OSError:
                return False
            fcntl.fcntl(probe, fcntl.F_OFD_SETLK,
                        struct.pack(sandbox._FLOCK, fcntl.F_UNLCK, os.SEEK_SET, uid - sandbox.UID_BASE, 1, 0))
            return True

        assert not any(free(u) for u in uids)
        os.close(held[0][1])
        assert free(uids[0]) and not any(free(u) for u in uids[1:])
    finally:
        os.close(probe)
        for _, fd in held[1:]:
            os.close(fd)
