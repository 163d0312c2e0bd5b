"""A server run as a child process that cannot outlive gcr.

A critic engine holds gigabytes of GPU memory, so an orphaned one is expensive. Three layers keep it
from outliving the command that started it:

1. it runs in its own session and process group, so stopping it reaches every process it spawned
   (vLLM's engine core and workers), and a Ctrl-C in the terminal reaches gcr alone, which then
   stops the group in order;
2. on Linux the kernel sends it a parent-death signal (prctl PR_SET_PDEATHSIG) when gcr dies, even
   by `kill -9`, when nothing in gcr gets to run (the signal follows the THREAD that started the
   server: start servers from the main thread, or from one that lives as long as they should);
3. gcr stops the group on every exit it sees: the caller's `with`/`finally`, and an atexit hook for
   anything still running at interpreter exit.

`detach=True` skips (2) and (3): `gcr critic start` wants the server to outlive it, and
`gcr critic stop` ends it later with `stop_group`.

Stdlib only; importing this module is free.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from gcr.errors import GcrError

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>
POLL_S = 0.5                  # how often start-up is checked
PROGRESS_EVERY_S = 1.0        # how often the progress line changes
PROBE_TIMEOUT_S = 2.0         # a health probe that takes longer counts as "not answering"
_LOG_TAIL_CHARS = 200

_live: set["ServerProcess"] = set()
_live_lock = threading.Lock()


class EngineStartError(GcrError):
    """The server exited or never answered during start-up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> list[str] | None:
    """The model ids an OpenAI-compatible server at `url` (ending in /v1) lists, or None when it does
    not answer with a model list."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout) as reply:
            payload = json.loads(reply.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


class ServerProcess:
    """One server child process and its process group."""

    def __init__(self, popen: subprocess.Popen, *, name: str, url: str, log_path: Path, grace: float,
                 detached: bool):
        self.popen, self.name, self.url, self.log_path = popen, name, url, log_path
        self.grace = grace          # seconds between SIGTERM and SIGKILL when stopping
        self.detached = detached
        self.on_stop: Callable[[], None] | None = None   # runs once the group is gone (e.g. drop its record)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout: float, progress: Callable[[str], None] = lambda msg: None,
                   longer: str = "a longer timeout") -> list[str]:
        """Poll the model list until it answers; return the served model ids. On an early exit or the
        timeout the group is stopped and EngineStartError names the log (and `longer`: how to wait more)."""
        start = time.monotonic()
        shown = -PROGRESS_EVERY_S
        while True:
            models = probe(self.url)
            if models:
                return models
            elapsed = time.monotonic() - start
            code = self.popen.poll()
            if code is not None:
                self.stop()
                raise EngineStartError(
                    f"the {self.name} critic engine exited during start-up (exit code {code}"
                    f"{_last_line(self.log_path)}): see its log at {self.log_path}.")
            if elapsed >= timeout:
                self.stop()
                raise EngineStartError(
                    f"the {self.name} critic engine did not answer on {self.url} within {timeout:.0f} s: "
                    f"see its log at {self.log_path}, or allow longer with {longer}.")
            if elapsed - shown >= PROGRESS_EVERY_S:
                shown = elapsed
                progress(f"starting the {self.name} critic engine · {elapsed:.0f} s · log: {self.log_path}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever is left after the grace period."""
        with _live_lock:
            _live.discard(self)
        try:
            stop_group(self.pid, self.grace, child=self.popen)
        except KeyboardInterrupt:  # Ctrl-C while it stops: no more grace
            _signal_group(self.pid, signal.SIGKILL)
            raise
        finally:
            if self.on_stop is not None:
                self.on_stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(command: Sequence[str], *, name: str, url: str, log_path: Path, env: dict | None = None,
          detach: bool = False, death_signal: int = signal.SIGTERM, grace: float = 10.0) -> ServerProcess:
    """Start `command` with its output in `log_path`. Unless `detach`, the server dies with this process
    (`death_signal` from the kernel, or `stop` at exit)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode("utf-8", errors="replace"))
        log.flush()
        try:
            popen = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                close_fds=True, start_new_session=True,
                preexec_fn=None if detach else _die_with_parent(death_signal))
        except OSError as exc:
            raise EngineStartError(f"cannot run {command[0]} ({exc.strerror or exc}): check that it is "
                                   "installed and executable.") from None
    server = ServerProcess(popen, name=name, url=url, log_path=log_path, grace=grace, detached=detach)
    if not detach:
        with _live_lock:
            _live.add(server)
    return server


def stop_group(pgid: int, grace: float, child: subprocess.Popen | None = None) -> bool:
    """Stop process group `pgid` (its leader's pid): SIGTERM, then SIGKILL after `grace` seconds.
    Returns False when the group was already gone."""
    if not _signal_group(pgid, signal.SIGTERM):
        _reap(child)
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(child)
        if not _group_alive(pgid):
            return True
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    if child is not None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
    return True


def process_start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux), so a recorded pid is not mistaken for a
    later process that got the same number. None where /proc is not available or the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """True until the process has wholly exited (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat(Path(f"/proc/{pid}"))
    return fields is None or not _exited(Path(f"/proc/{pid}"), fields)


def _stat(proc: Path) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; the command name before it may hold spaces."""
    try:
        return (proc / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _exited(proc: Path, fields: list[str]) -> bool:
    """A zombie whose threads are all gone. A killed multi-threaded process shows its leader as a
    zombie while other threads still tear down and hold its files (a listening socket among them)."""
    if not fields or fields[0] != "Z":
        return False
    try:
        return len(os.listdir(proc / "task")) <= 1
    except OSError:
        return True


def _group_alive(pgid: int) -> bool:
    if sys.platform.startswith("linux"):
        # Zombies still count as group members for kill(); ask /proc for live ones.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(entry)
                if fields and len(fields) > 2 and fields[2] == str(pgid) and not _exited(entry, fields):
                    return True
        return False
    return _signal_group(pgid, 0)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # not ours (the pid was reused): leave it alone
        return False


def _reap(child: subprocess.Popen | None) -> None:
    if child is not None:
        child.poll()


def _die_with_parent(sig: int):
    """A preexec_fn that asks the kernel to send `sig` to the child when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def _last_line(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    last = lines[-1]
    return f"; last line: {last[:_LOG_TAIL_CHARS]}" + ("..." if len(last) > _LOG_TAIL_CHARS else "")


@atexit.register
def _stop_all() -> None:
    """Whatever is still running when the interpreter exits (an exception, sys.exit, Ctrl-C)."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()
