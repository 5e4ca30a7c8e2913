"""Run untrusted code (model completions) in a separate, limited process.

Each run gets: an empty temporary working directory; CPU-time, wall-time, address-space, process
count, open-file and file-size limits (setrlimit); no network (a fresh network namespace with no
interfaces up — refused with a clear error where the kernel does not allow one, unless
`allow_network=True`); a minimal environment (no inherited secrets); when started as root, an
unprivileged uid (so the process limit applies and the host's files are read-only to it). The whole
process group, and any process that escaped it, is killed when the run ends.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1jax.errors import ConfigError, R1JaxError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
# When started as root each concurrent run gets its own unused uid, so RLIMIT_NPROC counts only its
# processes and every process it made, escaped or not, can be found and killed by uid.
UID_BASE, UID_COUNT = 61000, 4096
_free_uids = list(range(UID_BASE, UID_BASE + UID_COUNT))
_uid_lock = threading.Lock()


def _acquire_uid() -> int:
    with _uid_lock:
        if not _free_uids:
            raise SandboxUnavailable("all sandbox uids are in use; lower max_concurrency")
        return _free_uids.pop(0)


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _free_uids.append(uid)


class SandboxUnavailable(R1JaxError):
    """The isolation asked for cannot be provided on this machine."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20
    max_processes: int = 32
    max_file_bytes: int = 16 * 2**20
    max_open_files: int = 64
    max_output_bytes: int = 1 * 2**20
    allow_network: bool = False  # only if no network namespace can be made; never by default
    # Scheduling niceness (0..19) of the untrusted processes: a fork bomb of max_processes spinners at
    # nice 0 would starve the trainer (and the sandbox's own cleanup) of CPU on a small host.
    nice: int = 19
    python: str = ""  # interpreter for Python code; "" = /usr/bin/python3 when dropping root, else this one

    def __post_init__(self):
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sandbox.{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"sandbox.nice: must be in 0..19, got {self.nice}")


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


_libc = ctypes.CDLL(None, use_errno=True)


def _new_network_namespace() -> bool:
    """Unshare the network namespace of the calling (child) process; True on success."""
    if _libc.unshare(CLONE_NEWNET) == 0:
        return True
    # Unprivileged: a user namespace makes the network one allowed.
    return _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def network_isolation_available() -> bool:
    """Probe once in a throwaway child process."""
    try:
        p = subprocess.run(["/bin/true"], preexec_fn=lambda: os._exit(0 if _new_network_namespace() else 3),
                           timeout=10)
        return p.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _drop_root() -> bool:
    return os.geteuid() == 0


def _interpreter(limits: SandboxLimits) -> str:
    if limits.python:
        return limits.python
    if _drop_root() and Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"  # the project's interpreter may live under /root, unreadable to nobody
    import sys

    return sys.executable


def _preexec(limits: SandboxLimits, workdir: str, uid: int | None):
    def setup():
        os.setsid()
        os.nice(limits.nice)
        if not _new_network_namespace() and not limits.allow_network:
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


SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


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
    uid in one sweep, so a fork bomb cannot outrun it. setpriv + kill start by vfork/posix_spawn;
    without them a forked Python child drops to the uid (slower: it copies the trainer's page tables)."""
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


def _pids_with(marker: str | None, uid: int | None) -> list[int]:
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


def _kill_everything(proc: subprocess.Popen, marker: str, uid: int | None) -> None:
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


def run(argv: list[str], *, stdin: str = "", files: dict[str, str] | None = None,
        limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run argv inside the sandbox; `files` are written into its working directory first."""
    workdir = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    marker = f"R1JAX_SANDBOX={uuid.uuid4().hex}"
    uid = _acquire_uid() if _drop_root() else None
    try:
        for name, text in (files or {}).items():
            if "/" in name or name.startswith("."):
                raise ConfigError(f"sandbox file name {name!r}: must be a plain file name")
            Path(workdir, name).write_text(text)
            if uid is not None:
                os.chown(Path(workdir, name), uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": workdir,
               "PYTHONDONTWRITEBYTECODE": "1", marker.split("=")[0]: marker.split("=")[1]}
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_preexec(limits, workdir, uid), close_fds=True)
        timed_out = cleaned = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = cleaned = True
            _kill_everything(proc, marker, uid)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                # A survivor we could not find still holds the pipes open: stop reading, keep the result.
                for pipe in (proc.stdout, proc.stderr):
                    pipe.close()
                out, err = b"", b""
        finally:
            if not cleaned:  # also when communicate raised: nothing of the run may outlive it
                _kill_everything(proc, marker, uid)
        if proc.returncode == 125 and b"cannot create a network namespace" in err:
            raise SandboxUnavailable("no network namespace can be created here (needs root or user namespaces); "
                                     "refusing to run untrusted code with network access (set allow_network "
                                     "to accept the risk)")
        cap = limits.max_output_bytes
        return SandboxResult(proc.returncode, out[:cap].decode(errors="replace"), err[:cap].decode(errors="replace"),
                             timed_out, time.perf_counter() - t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _release_uid(uid)


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run Python source in the sandbox (isolated mode: no user site-packages, no PYTHON* env)."""
    return run([_interpreter(limits), "-I", "-B", "main.py"], stdin=stdin, files={"main.py": code}, limits=limits)


def run_many(jobs: list[dict], *, limits: SandboxLimits = SandboxLimits(), max_concurrency: int = 4) -> list[SandboxResult]:
    """run_python over many {code, stdin} jobs with bounded concurrency, results in order."""
    if max_concurrency < 1:
        raise ConfigError(f"sandbox.max_concurrency: must be >= 1, got {max_concurrency}")
    with ThreadPoolExecutor(max_concurrency) as pool:
        return list(pool.map(lambda j: run_python(j["code"], stdin=j.get("stdin", ""), limits=limits), jobs))
