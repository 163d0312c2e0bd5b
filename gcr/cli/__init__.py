"""The `gcr` command line: one module per command family, registered here.

Exit codes, the same for refine and batch: 0 ok · 1 runtime failure (a batch: any job failed) · 2 usage
error (Click's own included, printed as one line by GcrGroup) · 3 completed but no round could be
scored (a batch: no round of any job).
Commands import what they need when they run, so `gcr --help` starts instantly; the CLI imports the
library, never the other way round.
"""
from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from gcr.cli import batch, bench, critic, demo, refine, results, resume, score, tools


# Click's exception classes as this Typer uses them (recent Typer versions vendor their own Click).
_CLICK_MRO = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException, ClickUsageError = _CLICK_MRO["ClickException"], _CLICK_MRO["UsageError"]


class GcrGroup(TyperGroup):
    """Typer's group, with Click's own usage errors (unknown option, missing argument, a value out of
    range) printed like every other gcr error: one line, `error: ...`, no frame, exit 2. It lives in
    the app, so it holds for `main()`, `python -m gcr.cli` and tests that invoke `app` directly."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except ClickException as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # bare `gcr`: the help was printed
                print_click_error(e)
            sys.exit(e.exit_code)
        except typer.Abort:
            print_click_error(ClickException("aborted"))
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def print_click_error(e) -> None:
    from rich.text import Text

    from gcr.view import err, text

    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if isinstance(e, ClickUsageError):
        message += f": see `{ctx.command_path if ctx is not None else 'gcr COMMAND'} --help`"
    err.print(Text.assemble(("error:", "bold red"), " ", text(message + ".")), soft_wrap=True)


app = typer.Typer(
    cls=GcrGroup,
    help="Generate-Critique-Refine: make a frozen image generator follow your request better, "
         "round by round, with the RationalRewards critic.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(refine.refine)
app.command()(resume.resume)
app.command()(results.show)
app.command()(batch.batch)
app.command()(score.score)
app.command()(results.compare)
app.command()(results.report)
app.command()(results.runs)
app.command()(tools.generators)
app.command()(tools.selftest)
app.command()(demo.demo)
app.command("bench")(bench.bench)
app.add_typer(critic.app, name="critic")


def main() -> None:
    from gcr.storefaults import ignore_file_size_signal

    ignore_file_size_signal()  # past `ulimit -f`, writes must fail (and be reported), not kill gcr
    try:
        app()
    except SystemExit as e:
        if e.code == 130:  # Ctrl-C, already handled: the runs are closed and the message printed
            # Tearing down an interpreter that holds torch takes seconds (a final garbage collection
            # of every module), and Ctrl-C must end the process at once: flush and leave.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(130)
        raise


if __name__ == "__main__":
    main()
