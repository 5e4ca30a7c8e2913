"""Run untrusted code (model completions) isolated from the host (docs/grpo.md "The code sandbox").

Each run lives in its own mount, pid, ipc, net and uts namespaces (plus a user namespace when not
root), made by `rl/isolation.py`: a read-only view of /usr and the interpreter only, a private tmpfs
of `disk_bytes` for /tmp (its working directory) and /dev/shm, a fresh /proc showing only its own
processes, no network and no host socket. When started as root the program runs as a uid leased to
this run alone across every process on the host (an OFD lock per uid). rlimits bound its CPU time,
memory, processes, open files and file size; its output is read as it comes and cut at
`max_output_bytes`; at the end its pid namespace is killed whole, so nothing it started survives and
a detached daemon costs no wall time. Where the kernel refuses a namespace the sandbox refuses to run
unless `allow_weak_isolation` is set (then `rl/sandbox_weak.py`, logged with what is missing).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1jax.errors import ConfigError, R1JaxError
from r1jax.rl import sandbox_weak

log = logging.getLogger(__name__)

# When started as root each concurrent run, in any process, leases its own unused uid, so RLIMIT_NPROC
# counts only its processes and no run can signal or read another's.
UID_BASE, UID_COUNT = 61000, 4096
LEASE_FILES = ("/run/r1jax-sandbox-uids.lock", "/tmp/r1jax-sandbox-uids.lock")
_FLOCK = "@hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid
CHUNK = 1 << 16
CLOSE_GRACE = 2.0  # seconds to wait for the pipes to close once the program has ended or was killed
ISOLATION = str(Path(__file__).with_name("isolation.py"))


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
    max_output_bytes: int = 1 * 2**20  # per stream; past it the stream is closed (writes fail with EPIPE)
    allow_network: bool = False  # weak fallback only: run even where no network namespace can be made
    # Scheduling niceness (0..19) of the untrusted processes: a fork bomb of max_processes spinners at
    # nice 0 would starve the trainer (and the sandbox's own cleanup) of CPU on a small host.
    nice: int = 19
    python: str = ""  # interpreter for Python code; "" = /usr/bin/python3 when root, else this one
    disk_bytes: int = 64 * 2**20  # the one tmpfs the run may write: /tmp and /dev/shm together
    read_only_paths: tuple[str, ...] = ()  # more host paths to show read-only (libraries outside /usr)
    allow_weak_isolation: bool = False  # run without the namespaces where the kernel refuses them

    def __post_init__(self):
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_open_files", "max_output_bytes", "disk_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sandbox.{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"sandbox.nice: must be in 0..19, got {self.nice}")
        for p in self.read_only_paths:
            if not os.path.isabs(p):
                raise ConfigError(f"sandbox.read_only_paths: {p!r} must be an absolute path")


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# ---- uid leases


def lease_uid() -> tuple[int, int]:
    """-> (uid, fd): a uid no other run on this host holds while fd stays open. One open file
    description per lease (OFD locks), so threads of one process exclude each other as processes do;
    the kernel releases it when the fd is closed or the process dies."""
    fd = None
    for path in LEASE_FILES:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            break
        except OSError:
            continue
    if fd is None:
        raise SandboxUnavailable(f"cannot open a uid lease file ({', '.join(LEASE_FILES)})")
    start = random.randrange(UID_COUNT)
    for k in range(UID_COUNT):
        i = (start + k) % UID_COUNT
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, i, 1, 0))
            return UID_BASE + i, fd
        except OSError:
            continue
    os.close(fd)
    raise SandboxUnavailable(f"all {UID_COUNT} sandbox uids are leased; lower max_concurrency")


# ---- reading a run's output


def _collect(proc: subprocess.Popen, data: bytes, limits: SandboxLimits, *, done, kill, status: int | None = None):
    """Feed stdin and read stdout/stderr (and the launcher's status pipe) as they come, keeping at most
    `max_output_bytes` of each stream: a flood costs the trainer nothing. When `done(status_bytes)` or
    the wall deadline, `kill()` once, then read what is left until the pipes close (at most
    CLOSE_GRACE more). -> (stdout, stderr, status, truncated, timed_out)."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    got = bytearray()
    if status is not None:
        os.set_blocking(status, False)
        sel.register(status, selectors.EVENT_READ)
    pending = memoryview(data)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    deadline = time.monotonic() + limits.wall_seconds
    timed_out = truncated = False
    ended = None
    while True:
        now = time.monotonic()
        if ended is None and (done(got) or now >= deadline):
            timed_out = not done(got)
            kill()
            ended = now
        if ended is not None and (not sel.get_map() or now > ended + CLOSE_GRACE):
            break
        for key, _ in sel.select(0.05):
            f = key.fileobj
            if f is proc.stdin:
                try:
                    pending = pending[os.write(f.fileno(), pending[:CHUNK]):]
                except BlockingIOError:
                    continue
                except OSError:  # the program closed its stdin
                    pending = pending[:0]
                if not pending:
                    sel.unregister(f)
                    f.close()
                continue
            try:
                chunk = os.read(f if f is status else f.fileno(), CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(f)
            elif f is status:
                got += chunk
            else:
                buf = bufs[f]
                room = limits.max_output_bytes - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:  # cut: later writes fail with EPIPE, the run goes on
                    truncated = True
                    sel.unregister(f)
                    f.close()
    sel.close()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), bytes(got), truncated, timed_out


def _result(rc, out: bytes, err: bytes, timed_out: bool, truncated: bool, t0: float) -> SandboxResult:
    return SandboxResult(rc, out.decode(errors="replace"), err.decode(errors="replace"), timed_out,
                         time.perf_counter() - t0, truncated)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the isolated run


def _interpreter(limits: SandboxLimits) -> str:
    if limits.python:
        return limits.python
    if os.geteuid() == 0 and Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"  # the project's interpreter may live under /root, unreadable to the run's uid
    return sys.executable


def _view(program: str, limits: SandboxLimits) -> tuple[list[str], str]:
    """The host paths shown read-only (/usr, the program's prefix, the loader's cache) and the
    directory the new root is assembled on (one that none of them lies under)."""
    paths = ["/usr", "/etc/ld.so.cache", "/etc/localtime"]
    prefix = os.path.dirname(os.path.dirname(program))
    if not any(prefix == p or prefix.startswith(p + "/") for p in paths):
        paths.append(prefix)
    paths += list(limits.read_only_paths)
    for staging in ("/mnt", "/media", "/srv", "/opt", "/tmp"):
        if os.path.isdir(staging) and not os.path.islink(staging) and \
                not any(p == staging or p.startswith(staging + "/") for p in paths):
            return paths, staging
    raise SandboxUnavailable("no directory to assemble the sandbox's root on (/mnt, /media, /srv, /opt, /tmp)")


def _run_isolated(argv: list[str], stdin: str, files: dict[str, str], limits: SandboxLimits) -> SandboxResult:
    program = os.path.realpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
    read_only, staging = _view(program, limits)
    uid, lease = lease_uid() if os.geteuid() == 0 else (None, None)
    try:
        cfg = {"uid": uid, "staging": staging, "read_only": read_only, "files": files,
               "disk_bytes": limits.disk_bytes, "inodes": max(1024, limits.disk_bytes // 8192),
               "argv": [program, *argv[1:]],
               "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
                       "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
               "limits": {"cpu": int(limits.cpu_seconds), "memory": limits.memory_bytes,
                          "file": limits.max_file_bytes, "open_files": limits.max_open_files,
                          "processes": limits.max_processes, "nice": limits.nice}}
        cfg_r, cfg_w = os.pipe()
        status_r, status_w = os.pipe()
        t0 = time.perf_counter()
        try:
            launcher = [sys.executable, "-I", "-S", ISOLATION, str(cfg_r), str(status_w), str(os.getpid())]
            proc = subprocess.Popen(launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(cfg_r, status_w), env={}, cwd="/", start_new_session=True)
        except BaseException:
            for fd in (cfg_w, status_r):
                os.close(fd)
            raise
        finally:
            os.close(cfg_r)
            os.close(status_w)
        try:
            with os.fdopen(cfg_w, "wb") as f:
                f.write(json.dumps(cfg).encode())
        except BrokenPipeError:  # the launcher died: its status or exit code says why
            pass
        try:
            # Ended when init reports the exit status (the namespace dies right after) or the launcher exits;
            # killing the launcher kills init (parent-death signal), which kills the whole namespace.
            out, err, status, truncated, timed_out = _collect(
                proc, stdin.encode(), limits, status=status_r, kill=proc.kill,
                done=lambda got: b"rc " in got or proc.poll() is not None)
        finally:
            os.close(status_r)
            proc.kill()
            _reap(proc)
    finally:
        if lease is not None:
            os.close(lease)
    rc = None
    for line in status.decode(errors="replace").splitlines():
        kind, _, value = line.partition(" ")
        if kind == "error":
            raise SandboxUnavailable(f"the sandbox could not isolate the run: {value}")
        if kind == "rc":
            rc = int(value)
    if rc is None and not timed_out:
        rc = proc.returncode if proc.returncode else -signal.SIGKILL
    return _result(-signal.SIGKILL if rc is None else rc, out, err, timed_out, truncated, t0)


_problems: dict[tuple, str | None] = {}
_problems_lock = threading.Lock()
_warned: set[str] = set()


def isolation_problem(limits: SandboxLimits = SandboxLimits()) -> str | None:
    """None when a program runs in the namespaces here (probed once per interpreter and view), else
    what the kernel refused."""
    python = _interpreter(limits)
    key = (python, limits.read_only_paths)
    with _problems_lock:
        if key in _problems:
            return _problems[key]
        probe = dataclasses.replace(SandboxLimits(), python=python, read_only_paths=limits.read_only_paths)
        try:
            r = _run_isolated([python, "-I", "-S", "-c", "print(6 * 7)"], "", {}, probe)
            problem = None if r.ok and r.stdout.strip() == "42" else \
                f"a probe program failed inside the namespaces (exit {r.returncode}): {r.stderr.strip()[-500:]}"
        except (SandboxUnavailable, OSError) as e:
            problem = str(e)
        _problems[key] = problem
        return problem


def require_isolation(allow_weak_isolation: bool = False, limits: SandboxLimits = SandboxLimits()) -> None:
    """Raise SandboxUnavailable (naming what is missing) unless runs can be isolated here or weak
    isolation is allowed; called when the code reward is configured, before any sampling."""
    problem = isolation_problem(limits)
    if problem is not None and not allow_weak_isolation:
        raise SandboxUnavailable(
            f"refusing to run untrusted code: {problem}. The code reward needs mount, pid, ipc and network "
            "namespaces (root, or unprivileged user namespaces); set `allow_weak_isolation: true` in the "
            "code reward's kwargs to run it with rlimits and a network namespace only (docs/grpo.md)")
    if problem is not None and problem not in _warned:
        _warned.add(problem)
        log.warning("sandbox: weak isolation (allow_weak_isolation): %s; host files, /proc and unix "
                    "sockets are visible to untrusted code", problem)


# ---- the weak fallback


def _run_weak(argv: list[str], stdin: str, files: dict[str, str], limits: SandboxLimits) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    marker = f"R1JAX_SANDBOX={uuid.uuid4().hex}"
    uid, lease = lease_uid() if os.geteuid() == 0 else (None, None)
    try:
        for name, text in files.items():
            Path(workdir, name).write_text(text)
            if uid is not None:
                os.chown(Path(workdir, name), uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": workdir,
               "PYTHONDONTWRITEBYTECODE": "1", marker.split("=")[0]: marker.split("=")[1]}
        t0 = time.perf_counter()
        need_net = not (limits.allow_network or limits.allow_weak_isolation)
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, close_fds=True,
                                preexec_fn=sandbox_weak.preexec(limits, workdir, uid, need_net))
        try:
            out, err, _, truncated, timed_out = _collect(
                proc, stdin.encode(), limits, done=lambda _: proc.poll() is not None,
                kill=lambda: sandbox_weak.kill_everything(proc, marker, uid))
        finally:
            sandbox_weak.kill_everything(proc, marker, uid)  # nothing of the run may outlive it
            _reap(proc)
        if proc.returncode == 125 and b"cannot create a network namespace" in err:
            raise SandboxUnavailable("no network namespace can be created here (needs root or user namespaces); "
                                     "refusing to run untrusted code with network access (set allow_network "
                                     "to accept the risk)")
        return _result(proc.returncode, out, err, timed_out, truncated, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if lease is not None:
            os.close(lease)


# ---- public


def run(argv: list[str], *, stdin: str = "", files: dict[str, str] | None = None,
        limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run argv inside the sandbox; `files` are written into its working directory (/tmp) first."""
    for name in files or {}:
        if "/" in name or name.startswith(".") or not name:
            raise ConfigError(f"sandbox file name {name!r}: must be a plain file name")
    require_isolation(limits.allow_weak_isolation, limits)
    runner = _run_weak if isolation_problem(limits) is not None else _run_isolated
    return runner(argv, stdin, dict(files or {}), limits)


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run Python source in the sandbox (isolated mode: no user site-packages, no PYTHON* env)."""
    return run([_interpreter(limits), "-I", "-B", "main.py"], stdin=stdin, files={"main.py": code}, limits=limits)


def run_many(jobs: list[dict], *, limits: SandboxLimits = SandboxLimits(), max_concurrency: int = 4) -> list[SandboxResult]:
    """run_python over many {code, stdin} jobs with bounded concurrency, results in order."""
    if max_concurrency < 1:
        raise ConfigError(f"sandbox.max_concurrency: must be >= 1, got {max_concurrency}")
    with ThreadPoolExecutor(max_concurrency) as pool:
        return list(pool.map(lambda j: run_python(j["code"], stdin=j.get("stdin", ""), limits=limits), jobs))
