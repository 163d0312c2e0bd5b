"""Who is advancing a run or a batch, and whether that process is still alive.

A run (or a batch) is `running` only while a live process owns it. The owner holds an exclusive
flock on <runs-dir>/locks/<name>.lock for as long as it works; the kernel drops the lock the moment
the process ends, however it ends (kill -9, out of memory, a crash), so a lock that nobody holds
means a dead owner, with no timeout to tune and no heartbeat to miss. The store also records who
the owner is (host, pid, and the process's boot/start-time token, so a later process that reuses the
pid is not taken for it) to name it when a second process is refused, and to judge liveness by the
process table where a file system has no working locks.

A single run's lock is `run-<id>`; a batch's runs are owned through their batch's lock
(`batch-<id>`), so a batch of 500 jobs holds one lock, not 500. In a scale-out batch the driver is
the only writer of the store, so the driver is the owner and workers hold no locks.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the process record alone decides
    fcntl = None

LOCK_WAIT_S = 2.0   # readers hold a lock for a few milliseconds to probe it: an owner waits them out
MINE, HELD, FREE, UNKNOWN = "mine", "held", "free", "unknown"


@dataclass(frozen=True)
class Owner:
    """The process that owns a run or batch, as recorded in the store."""

    host: str
    pid: int
    process: str        # "<boot id>/<pid namespace>/<start ticks>": identifies the process, not just the pid
    lock: str           # the lock it holds: run-<id> or batch-<id>
    since: str          # when it took ownership (UTC, ISO 8601)

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"

    def is_me(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid() and self.process == _token(os.getpid())


def me(lock: str, since: str) -> Owner:
    return Owner(socket.gethostname(), os.getpid(), _token(os.getpid()) or "", lock, since)


def lock_name(kind: str, ident: str) -> str:
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]', '_', ident)}"


def process_alive(owner: Owner) -> bool | None:
    """Whether the recorded process still runs: None when it ran on another machine (or in another
    pid namespace), where this one cannot look."""
    mine = _token(os.getpid()) or ""
    if owner.host != socket.gethostname() or owner.process.rsplit("/", 1)[0] != mine.rsplit("/", 1)[0]:
        return None
    token = _token(owner.pid)
    if token is not None:
        return token == owner.process  # same pid, other start time: the pid was reused
    if Path("/proc").is_dir():
        return False
    try:  # no /proc (macOS): the pid alone, which cannot rule out reuse
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _token(pid: int) -> str | None:
    """boot id / pid namespace / start time in clock ticks: unique to one process on one machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised name
    return f"{_boot_id()}/{_pid_namespace()}/{start}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


class Locks:
    """The lock files of one runs directory. What this process holds is kept process-wide, so two
    stores opened on the same directory in one process agree."""

    _held: dict[str, int] = {}          # lock file path -> open descriptor holding the flock
    _guard = threading.Lock()

    def __init__(self, directory: Path):
        self.dir = Path(os.path.abspath(directory))  # one key per file, however the path was spelled

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.lock"

    def acquire(self, name: str, wait: float = LOCK_WAIT_S) -> bool:
        """Take the lock (True), or find another process holding it (False). Raises OSError when the
        lock file cannot be created; a file system without flock counts as taken."""
        key = str(self.path(name))
        with self._guard:
            if key in self._held:
                return True
        if fcntl is None:
            return True
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        return False
                    if e.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                        return True  # no locks here: the process record alone decides
                    raise
                time.sleep(0.02)
        with self._guard:
            self._held[key] = fd
        return True

    def release(self, name: str) -> None:
        with self._guard:
            fd = self._held.pop(str(self.path(name)), None)
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def release_all(self) -> None:
        prefix = f"{self.dir}{os.sep}"
        with self._guard:
            mine = [k for k in self._held if k.startswith(prefix)]
            fds = [self._held.pop(k) for k in mine]
        for fd in fds:
            os.close(fd)

    def holds(self, name: str) -> bool:
        with self._guard:
            return str(self.path(name)) in self._held

    def state(self, name: str) -> str:
        """MINE, HELD (by another process), FREE, or UNKNOWN (no locks on this file system)."""
        if self.holds(name):
            return MINE
        if fcntl is None:
            return UNKNOWN
        try:
            fd = os.open(self.path(name), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return FREE
        except OSError:
            return UNKNOWN
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe: never blocks an owner for long
            return FREE
        except OSError as e:
            return HELD if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else UNKNOWN
        finally:
            os.close(fd)

    def alive(self, owner: Owner | None, name: str) -> bool:
        """Whether the owner recorded under lock `name` (None: no record) is still at work."""
        state = self.state(name)
        if state in (MINE, HELD):
            return True
        if state == FREE or owner is None:
            return False
        alive = process_alive(owner)
        return True if alive is None else alive  # another machine, no locks: assume it works
