"""What went wrong with the disk under the run store, in words a user can act on.

SQLite reports a full disk, an I/O error and a file that hit `ulimit -f` as little more than
"disk I/O error" or "database or disk is full", and Pillow raises a bare OSError: this module turns
either into the cause (disk full, file-size limit, read-only, I/O error ...) and the fix, so the
store can raise one gcr.errors.StorageError sentence instead of a traceback.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import threading
from pathlib import Path

from .errors import StorageError

FREE_SPACE_FLOOR = 1 << 20  # less free than this when a write fails: the disk is full
WRITABLE = "make it writable, or pass another --runs-dir"


def ignore_file_size_signal() -> None:
    """A write past `ulimit -f` sends SIGXFSZ, whose default action kills the process on the spot
    (no status, no message). Ignored, the write fails with EFBIG instead, which the store reports."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def storage_error(exc: BaseException, action: str, root: Path, files=()) -> StorageError:
    """The StorageError for an OSError or sqlite3.Error raised while the store did `action`."""
    cause, fix, usage = explain(exc, root, files)
    return StorageError(action, cause, fix, usage)


def explain(exc: BaseException, root: Path, files=()) -> tuple[str, str, bool]:
    """(cause, fix, is the user's setup to fix) for a fault of the store at `root`. `files` are the
    paths being written, to tell a file-size limit from a full disk."""
    code = _errno(exc)
    name = _sqlite_name(exc)
    detail = _detail(exc)
    if code == errno.EFBIG or (_near_size_limit(root, files, exc) and _is_write_failure(code, name)):
        limit = _size_limit()
        return (f"a file reached the file-size limit{f' (ulimit -f: {_bytes(limit)})' if limit else ''}",
                "raise the limit (ulimit -f unlimited)", False)
    if code == getattr(errno, "EDQUOT", None):
        return f"the disk quota is used up ({detail})", "free some space or raise the quota", False
    if code == errno.ENOSPC or name.startswith("SQLITE_FULL") or (
            name.startswith("SQLITE_IOERR") and _free_bytes(root) < FREE_SPACE_FLOOR):
        return f"the disk is full ({detail})", "free some space", False
    if code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST) or \
            name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return _unwritable(root, detail), WRITABLE, True
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return (f"{root / 'gcr.sqlite3'} is not a gcr run store or is damaged ({detail})",
                "pass another --runs-dir (or restore the file from a backup)", True)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return ("another process kept the run store locked for too long", "try again when it is done",
                False)
    if code == errno.EIO or name.startswith("SQLITE_IOERR"):
        return f"the disk reported an I/O error ({detail})", "check the disk and its free space", False
    if code == errno.ENOLCK or code == errno.EMFILE or code == errno.ENFILE:
        return f"the system refused a file ({detail})", "close other programs and try again", False
    return (f"{type(exc).__name__}: {detail}", "check that the runs directory is a healthy, writable "
            "local folder", False)


def _unwritable(root: Path, detail: str) -> str:
    """Why the runs directory cannot hold a store: in the way, read-only, or not ours."""
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                return f"{path} is a file, where a directory is needed ({detail})"
            break
    db = root / "gcr.sqlite3"
    if db.is_dir():
        return f"{db} is a directory, where the database file is needed ({detail})"
    target = root if root.exists() else next((p for p in root.parents if p.exists()), root)
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return f"{target} is on a read-only file system ({detail})"
    except (OSError, AttributeError):
        pass
    if not os.access(target, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        return f"{target} is not writable by this user ({detail})"
    return f"the run store in {root} cannot be opened for writing ({detail})"


_SQLITE_MESSAGES = {  # for Pythons whose sqlite3 errors carry no sqlite_errorname (before 3.11)
    "database or disk is full": "SQLITE_FULL", "disk i/o error": "SQLITE_IOERR",
    "readonly database": "SQLITE_READONLY", "unable to open": "SQLITE_CANTOPEN",
    "not a database": "SQLITE_NOTADB", "malformed": "SQLITE_CORRUPT", "is locked": "SQLITE_BUSY",
}


def _sqlite_name(exc: BaseException) -> str:
    if not isinstance(exc, sqlite3.Error):
        return ""
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name
    text = str(exc).lower()
    return next((n for m, n in _SQLITE_MESSAGES.items() if m in text), "")


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def _is_write_failure(code: int | None, name: str) -> bool:
    return code in (errno.EFBIG, errno.ENOSPC, errno.EIO) or name.startswith(("SQLITE_FULL", "SQLITE_IOERR"))


def _size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _near_size_limit(root: Path, files, exc: BaseException) -> bool:
    """A file-size limit is set and a file being written is within reach of it."""
    limit = _size_limit()
    if limit is None:
        return False
    db = root / "gcr.sqlite3"
    candidates = [db, Path(f"{db}-wal"), Path(f"{db}-journal"), *map(Path, files)]
    if isinstance(exc, OSError) and exc.filename:
        candidates.append(Path(exc.filename))
    sizes = []
    for path in candidates:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            continue
    # A write that crossed the limit left the file at or just under it (SQLite writes pages of
    # 4 KiB, Pillow chunks of up to 64 KiB).
    return any(size + (64 << 10) >= limit for size in sizes)


def _free_bytes(root: Path) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 1 << 62


def _bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.0f} {unit}"
        n /= 1024
    return str(n)


def is_storage_fault(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, sqlite3.Error))

