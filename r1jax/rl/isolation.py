"""The sandbox's namespace launcher (docs/grpo.md "The code sandbox"). `rl/sandbox.py` runs this file as
a script with the trainer's interpreter (`python -I -S isolation.py CONFIG_FD STATUS_FD PARENT_PID`);
it imports only the standard library, so it needs nothing of the project inside the namespaces it makes.

    launcher (host pid namespace)       unshare mount, pid, ipc, net, uts (+ user when not root), fork:
       └─ init (pid 1 of a new pid ns)   builds a new root on a tmpfs with a fresh /proc, pivots into
            │                            it, forks, reaps, reports the exit status;
            └─ untrusted program         rlimits, no capabilities, no_new_privs, exec

The new root holds, read-only (nosuid, nodev): /usr, the top-level /bin, /lib* links, the
interpreter's prefix, /etc/ld.so.cache and /etc/localtime; five device nodes; and one tmpfs of
`disk_bytes` mounted at /tmp and /dev/shm (/var/tmp links to /tmp). Nothing else of the host is visible. When the
init process exits the kernel kills every process left in its pid namespace, and the namespaces and
their tmpfs go with them: nothing of a run outlives it.

Status lines on STATUS_FD: `rc N` (the program's exit status, negative for a signal) or `error MSG`
(a step was refused; the program never ran). The trainer kills the launcher on timeout; init has
the launcher's death as its parent-death signal, and with init the whole namespace dies.
"""

import ctypes
import json
import os
import platform
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
# Flags a user namespace may not clear on a bind of a mount it does not own: keep them as they are.
_LOCKED = {os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
           os.ST_RELATIME: MS_RELATIME, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV}
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception):
    pass


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _b(s):
    return None if s is None else s.encode()


def mount(src, target, fstype, flags, data=None) -> None:
    _ok(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {fstype or src} on {target}")


def prctl(option: int, arg: int = 0) -> None:
    _ok(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def unshare_all(cfg: dict) -> None:
    """Every namespace but user as root (the program drops to a leased uid instead); with the user
    namespace first otherwise, mapping the caller's own uid to 0 inside (all an unprivileged user may map)."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS
    if cfg["uid"] is None:
        uid, gid = os.geteuid(), os.getegid()
        _ok(_libc.unshare(CLONE_NEWUSER | flags), "unshare(user, mount, pid, ipc, net, uts)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    else:
        _ok(_libc.unshare(flags), "unshare(mount, pid, ipc, net, uts)")


def bind(src: str, dst: str, extra: int) -> None:
    """Bind `src` at `dst` read-only plus `extra`, keeping the source mount's locked flags."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    have = os.statvfs(src).f_flag
    locked = 0
    for st, ms in _LOCKED.items():
        if have & st:
            locked |= ms
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra | locked)


def build_root(cfg: dict) -> None:
    """The new root on a small tmpfs at `staging`, then pivot_root into it."""
    new = cfg["staging"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for name in sorted(os.listdir("/")):  # merged-/usr systems: /bin, /lib... are links into /usr
        if name.startswith(("bin", "sbin", "lib")) and os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), f"{new}/{name}")
        elif name.startswith(("bin", "sbin", "lib")) and os.path.isdir("/" + name):
            bind("/" + name, f"{new}/{name}", MS_NOSUID | MS_NODEV)
    for path in cfg["read_only"]:
        if os.path.exists(path):
            bind(path, new + path, MS_NOSUID | MS_NODEV)
    for dev in DEVICES:
        bind(f"/dev/{dev}", f"{new}/dev/{dev}", MS_NOSUID | MS_NOEXEC)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{new}/dev/{name}")
    os.symlink("/proc/self/fd", f"{new}/dev/fd")
    # One tmpfs is all the run may write: /tmp (its working directory) and /dev/shm share the quota.
    rw = f"{new}/.rw"
    os.makedirs(rw)
    mount("tmpfs", rw, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},nr_inodes={cfg['inodes']},mode=0755")
    for sub, at in (("tmp", "tmp"), ("shm", "dev/shm")):
        os.mkdir(f"{rw}/{sub}")
        os.chmod(f"{rw}/{sub}", 0o1777)
        os.makedirs(f"{new}/{at}")
        mount(f"{rw}/{sub}", f"{new}/{at}", None, MS_BIND)
    _ok(_libc.umount2(_b(rw), MNT_DETACH), "umount the quota tmpfs's staging mount")
    os.rmdir(rw)
    os.makedirs(f"{new}/var")
    os.symlink("/tmp", f"{new}/var/tmp")
    # A fresh proc of this pid namespace; mounted before the host's /proc is detached, since a user
    # namespace may mount proc only where a full proc is already visible. Containers that mask parts
    # of their /proc refuse it even so: then /proc stays empty, which hides more, not less.
    os.mkdir(f"{new}/proc")
    try:
        mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    os.chdir(new)
    nr = PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise SetupError(f"pivot_root: no syscall number known for {platform.machine()}")
    _ok(_libc.syscall(nr, b".", b"."), "pivot_root")
    _ok(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def limit_ipc(disk_bytes: int) -> None:
    """SysV shared memory and message queues of the run's ipc namespace live outside its address
    space (RLIMIT_AS does not see them): bound them by the disk quota. Best effort: a kernel that
    keeps these sysctls read-only in a user namespace leaves its defaults."""
    for name, value in (("shmmax", disk_bytes), ("shmall", max(1, disk_bytes // os.sysconf("SC_PAGE_SIZE"))),
                        ("shmmni", 64), ("msgmni", 16), ("msgmnb", 65536)):
        try:
            _write(f"/proc/sys/kernel/{name}", str(value))
        except OSError:
            pass


def write_files(cfg: dict) -> None:
    for name, text in cfg["files"].items():
        path = f"/tmp/{name}"
        with open(path, "w") as f:
            f.write(text)
        if cfg["uid"] is not None:
            os.chown(path, cfg["uid"], cfg["uid"])


def exec_program(cfg: dict, last_cap: int) -> None:
    """In the forked child of init: limits, no privileges, exec. Never returns."""
    try:
        os.closerange(3, 1 << 16)  # the status pipe above all: the program must not write its own verdict
        lim = cfg["limits"]
        for name, value in (("RLIMIT_CPU", (lim["cpu"], lim["cpu"] + 1)), ("RLIMIT_AS", lim["memory"]),
                            ("RLIMIT_FSIZE", lim["file"]), ("RLIMIT_NOFILE", lim["open_files"]),
                            ("RLIMIT_CORE", 0)):
            resource.setrlimit(getattr(resource, name), value if isinstance(value, tuple) else (value, value))
        os.nice(lim["nice"])
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        else:  # uid 0 of the user namespace: with an empty bounding set exec grants no capability
            for cap in range(last_cap + 1):
                prctl(PR_CAPBSET_DROP, cap)
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.umask(0o077)
        os.chdir("/tmp")
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report anything, then die: never return into init
        os.write(2, f"r1jax sandbox: cannot start the program: {e}\n".encode())
    os._exit(126)


def init(cfg: dict, status_fd: int, parent_alive: int, last_cap: int) -> None:
    """pid 1 of the run's pid namespace. Never returns; when it exits, the kernel kills the rest."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # no handler a program in the namespace could trigger
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # launcher gone (trainer killed) -> the namespace goes
        if select.select([parent_alive], [], [], 0)[0]:  # the launcher died before PDEATHSIG was set
            os._exit(1)
        prctl(PR_SET_DUMPABLE, 0)
        build_root(cfg)
        limit_ipc(cfg["disk_bytes"])
        write_files(cfg)
        _libc.sethostname(b"sandbox", 7)
        child = os.fork()
        if child == 0:
            exec_program(cfg, last_cap)
        while True:
            pid, status = os.waitpid(-1, 0)  # also reaps orphans re-parented to us
            if pid == child:
                os.write(status_fd, f"rc {os.waitstatus_to_exitcode(status)}\n".encode())
                break
    except BaseException as e:  # noqa: BLE001 - a refused step: report it, never run the program
        os.write(status_fd, f"error {e}\n".encode())
        os._exit(125)
    os._exit(0)


def main(config_fd: int, status_fd: int, parent: int) -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    with os.fdopen(config_fd, "rb") as f:
        cfg = json.loads(f.read())
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        unshare_all(cfg)
    except (SetupError, OSError) as e:
        os.write(status_fd, f"error {e}\n".encode())
        os._exit(125)
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        init(cfg, status_fd, alive_r, last_cap)
    os.close(alive_r)
    os.waitpid(pid, 0)
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
