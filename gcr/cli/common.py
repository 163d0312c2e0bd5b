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
    """Expected failures: one sentence on stderr, the documented exit code, no traceback. The message
    is data (it quotes paths, ids and model output): printed literally, never as markup."""
    from gcr.view import err

    try:
        yield
    except GcrError as e:
        print_error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed rounds are kept in the run store.")
        raise typer.Exit(130) from None
    except Exception as e:  # the disk under the store failing where no layer named it: still one sentence
        from gcr.storefaults import is_storage_fault, storage_error

        if not is_storage_fault(e) or not _from_storage(e):
            raise
        fault = storage_error(e, "read or write the files gcr needs", Path(getattr(e, "filename", None) or "."))
        print_error(str(fault))
        raise typer.Exit(fault.exit_code) from None


def print_error(message: str) -> None:
    """`error: <message>` on stderr, the message printed literally."""
    from rich.text import Text

    from gcr.view import err, text

    err.print(Text.assemble(("error:", "bold red"), " ", text(message)), soft_wrap=True)


def finish_run(run, json_out: bool, runs_dir: Path | None) -> None:
    """A single run's last words, the same for refine and resume: the table for people or the record
    for scripts; then its exit code: 1 when it failed (the reason and the command that continues it on
    stderr too, where a script reading --json finds them), 3 when it completed with nothing scored,
    else 0."""
    from gcr.errors import EXIT_UNSCORED
    from gcr.strictjson import dumps
    from gcr.view import print_run

    if json_out:
        print(dumps(run.to_dict()))
    else:
        print_run(run)
    if run.error:  # the reason may be a library's bare message: make it a sentence that names the way on
        print_error(f"run {run.id} failed ({run.error.rstrip('. ')}); its completed rounds are kept: "
                    f"continue with `{resume_command(run.id, runs_dir)}` once that is fixed.")
        raise typer.Exit(1)
    if run.best_round is None:
        raise typer.Exit(EXIT_UNSCORED)


def resume_command(run_id: str, runs_dir: Path | None) -> str:
    """The exact command that continues a run (printed after Ctrl-C and on failure)."""
    import shlex

    return f"gcr resume {shlex.quote(run_id)}" + (f" --runs-dir {shlex.quote(str(runs_dir))}" if runs_dir else "")


def interrupted(kept: str, again: str):
    """After Ctrl-C: say what is kept and the exact command that continues; exit 130. Raise what it
    returns (`raise interrupted(...) from None`)."""
    from gcr.view import err, text

    err.print(text(f"interrupted: {kept} are kept; continue with `{again}`.", style="yellow"), soft_wrap=True)
    return typer.Exit(130)


# How check_args names a command's positional arguments; options are named by their flag.
_ARGUMENT_NAMES = {"request": "the request", "run_id": "the run id", "ref": "the id", "refs": "the ids",
                   "file": "the batch file name", "inputs": "an image or manifest name", "min_": "--min"}


def check_args(args: dict) -> None:
    """Refuse command-line text that is not valid UTF-8. Python hands undecodable bytes over as lone
    surrogates, which can be neither stored (SQLite), nor printed, nor sent to a model: one sentence
    here instead of a crash later. `args` is the command's parameters by name (its `locals()`)."""
    from gcr.batchfile import cli_flag, lone_surrogate

    for name, value in args.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            bad = lone_surrogate(v if isinstance(v, str) else str(v)) if isinstance(v, (str, Path)) else None
            if bad:
                what = _ARGUMENT_NAMES.get(name) or cli_flag(name)
                fix = "rename it" if isinstance(v, Path) else "pass UTF-8 text"
                raise UsageError(f"{what[:1].upper()}{what[1:]} holds bytes that are not UTF-8 text ({bad}): {fix}.")


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


# A request is a sentence or a paragraph; this bounds what stdin or a file may hand over.
MAX_REQUEST_BYTES = 64 * 1024


def read_request(request: Optional[str], request_file: Optional[Path]) -> str:
    """The request from the argument, from stdin (`-`) or from --request-file, as checked text."""
    import shlex

    if request is not None and request_file is not None:
        raise UsageError("Give the request once: as the argument or with --request-file, not both.")
    if request_file is not None:
        return _request_text(_read_request_file(request_file), f"The request file {request_file}")
    if request is None:
        raise UsageError("There is no request: give it as the argument (gcr refine \"a red fox\"), as - to read "
                         "it from stdin, or with --request-file PATH.")
    if request == "-":
        import sys

        if sys.stdin is not None and sys.stdin.isatty():
            from gcr.view import err

            err.print("reading the request from stdin (end it with Ctrl-D)", style="dim", highlight=False)
        return _request_text(typer.get_binary_stream("stdin").read(MAX_REQUEST_BYTES + 1), "The request on stdin")
    try:
        is_file = Path(request).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL: it is text
        is_file = False
    if is_file:  # almost surely meant as a file: refuse rather than generate "prompt.txt"
        raise UsageError(f"'{request}' is a file, not a request: to use its text as the request, pass "
                         f"--request-file {shlex.quote(request)}.")
    if len(request.encode("utf-8", "surrogatepass")) > MAX_REQUEST_BYTES:
        raise UsageError(f"The request is over {MAX_REQUEST_BYTES:,} bytes: shorten it to a paragraph.")
    return request


def _read_request_file(path: Path) -> bytes:
    if path.is_dir():
        raise UsageError(f"The request file {path} is a directory: give a text file to --request-file.")
    try:
        with open(path, "rb") as f:
            return f.read(MAX_REQUEST_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"The request file {path} does not exist: check the path given to --request-file.") from None
    except OSError as e:
        raise UsageError(f"The request file {path} cannot be read ({e.strerror or e}): check the path and "
                         "its permissions.") from None


def _request_text(data: bytes, what: str) -> str:
    if len(data) > MAX_REQUEST_BYTES:
        raise UsageError(f"{what} is over {MAX_REQUEST_BYTES:,} bytes: a request is a sentence or a "
                         "paragraph; shorten it.")
    try:
        text = data.decode("utf-8-sig")  # a BOM (Windows editors) is not part of the request
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} is not UTF-8 text (byte {e.start + 1} is not): save it as UTF-8.") from None
    if "\x00" in text:
        raise UsageError(f"{what} holds a NUL byte, so it is not text: give a plain text file.")
    if not text.strip():
        raise UsageError(f"{what} is empty: write what the image should show.")
    return text.strip()


def load_image(path: Path):
    """The --image file as an RGB image: the same check and pixel limit as batch files (gcr.images)."""
    from gcr.images import ImageProblem, read_image

    try:
        return read_image(path)[0]
    except ImageProblem as e:
        hint = "" if path.is_file() else ": check the path given to --image"
        raise UsageError(f"{str(e)[:1].upper()}{str(e)[1:]}{hint}.") from None


def parse_gen_args(pairs: list[str]) -> dict:
    """`--gen-arg key=value`: values are parsed as JSON when they can be (numbers, booleans, lists)."""
    from gcr.batchfile import json_value_problem

    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--gen-arg '{pair}' is not key=value: write e.g. --gen-arg max_sequence_length=256.")
        try:
            extra[key.strip()] = json.loads(value, parse_constant=_refuse_constant)
        except json.JSONDecodeError:
            extra[key.strip()] = value
        except (ValueError, RecursionError):  # NaN/Infinity, or nesting deeper than Python's stack
            raise UsageError(f"--gen-arg '{key.strip()}' has a value that is not finite JSON (NaN, "
                             "Infinity or nested too deep): give a plain number, text or a short list.") from None
        problem = json_value_problem(extra[key.strip()])
        if problem:
            raise UsageError(f"--gen-arg '{key.strip()}': {problem}.")
    return extra


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")
