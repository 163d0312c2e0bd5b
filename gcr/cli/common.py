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
