"""The sandbox's weak fallback (only with `allow_weak_isolation: true`, where the kernel refuses the
namespaces of `rl/isolation.py`): a child process with rlimits, a network namespace where one can be
made, an unprivileged leased uid when started as root, and a host temporary directory. Host files,
other processes' /proc entries and unix sockets stay visible to it; escaped processes are found by
uid or by a marker in their environment and killed when the run ends. docs/grpo.md says what is lost.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
_libc = ctypes.CDLL(None, use_errno=True)


def new_network_namespace() -> bool:
    """Unshare the network namespace of the calling (child) process; True on success."""
    if _libc.unshare(CLONE_NEWNET) == 0:
        return True
    # Unprivileged: a user namespace makes the network one allowed.
    return _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def preexec(limits, workdir: str, uid: int | None, need_network_namespace: bool):
    def setup():
        os.setsid()
        os.nice(limits.nice)
        if not new_network_namespace() and need_network_namespace:
            os.write(2, b"r1jax sandbox: cannot create a network namespace\n")
            os._exit(125)
        cpu = int(limits.cpu_seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # After dropping root: root is exempt from RLIMIT_NPROC.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        os.umask(0o077)
    return setup


def _owned_by(pid_dir: Path, uid: int) -> bool:
    """A live process of `uid` that is not already dying: zombies are dead, only waiting to be reaped,
    and a process with SIGKILL pending dies as soon as it is scheduled (slowly, on a loaded host);
    sweeping again for either would only fork more killers."""
    state = owner = None
    pending = 0
    for line in (pid_dir / "status").read_text().splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("Uid:"):
            owner = int(line.split()[1])
        elif line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return owner == uid and state != "Z" and not pending & SIGKILL_BIT


def _kill_uid(uid: int) -> None:
    """kill(-1, SIGKILL) from a process running as `uid`: the kernel signals every process of that
    uid in one sweep, so a fork bomb cannot outrun it. The uid is leased to this run alone
    (sandbox.lease_uid), so no other run's process is hit."""
    setpriv, kill = shutil.which("setpriv"), shutil.which("kill")
    try:
        if setpriv and kill:
            subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", kill, "-9", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
            return

        def as_uid_kill_all():
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
            os._exit(0)

        subprocess.run(["/bin/true"], preexec_fn=as_uid_kill_all, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass


def _pids_with(marker: str, uid: int | None) -> list[int]:
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            mine = _owned_by(pid_dir, uid) if uid is not None else marker.encode() in (pid_dir / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if mine:
            found.append(int(pid_dir.name))
    return found


def kill_everything(proc: subprocess.Popen, marker: str, uid: int | None) -> None:
    if uid is not None and _pids_with(marker, uid):
        _kill_uid(uid)  # one kernel sweep first: the group, and whatever escaped it, stop forking now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)  # reap it, so only processes that escaped the group remain
    except subprocess.TimeoutExpired:
        pass
    # Processes that left the group (setsid): by the run's own uid when we have one, else by the
    # marker in their environment.
    for _ in range(20):
        pids = _pids_with(marker, uid)
        if not pids:
            return
        if uid is not None:
            _kill_uid(uid)
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.01)
