"""What every command shares: option types, error handling, the store, reading inputs."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from gcr.errors import GcrError, UsageError

RunsDir = Annotated[Optional[Path], typer.Option(
    "--runs-dir", help="Where runs are stored (SQLite + PNGs). Default: $GCR_HOME or ./gcr-runs.",
    show_default=False)]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


@contextmanager
def handled():
    """Expected failures: one sentence on stderr, the documented exit code, no traceback."""
    from rich.markup import escape

    from gcr.view import err

    try:
        yield
    except GcrError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed rounds are kept in the run store.")
        raise typer.Exit(130) from None
    except Exception as e:  # the disk under the store failing where no layer named it: still one sentence
        from gcr.storefaults import is_storage_fault, storage_error

        if not is_storage_fault(e) or not _from_storage(e):
            raise
        fault = storage_error(e, "read or write the files gcr needs", Path(getattr(e, "filename", None) or "."))
        err.print(f"[bold red]error:[/] {escape(str(fault))}", highlight=False, soft_wrap=True)
        raise typer.Exit(fault.exit_code) from None


def _from_storage(e: Exception) -> bool:
    """sqlite3 errors, and the OS errors only a disk or file system gives (not network ones)."""
    import errno
    import sqlite3

    storage = {errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.ENOTDIR, errno.EISDIR, getattr(errno, "EDQUOT", errno.ENOSPC)}
    return isinstance(e, sqlite3.Error) or (isinstance(e, OSError) and e.errno in storage)


def open_store(runs_dir: Optional[Path], write: bool = True):
    """The run store; `write=False` for commands that only read (they also read a read-only one)."""
    from gcr.store import RunStore, default_runs_dir

    return RunStore(runs_dir or default_runs_dir(), write=write)


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"The image {path} does not exist: check the path given to --image.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"The image {path} cannot be read ({e.__class__.__name__}): "
                         "pass a PNG, JPEG or WebP file.") from None


def parse_gen_args(pairs: list[str]) -> dict:
    """`--gen-arg key=value`: values are parsed as JSON when they can be (numbers, booleans, lists)."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--gen-arg '{pair}' is not key=value: write e.g. --gen-arg max_sequence_length=256.")
        try:
            extra[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.strip()] = value
    return extra
