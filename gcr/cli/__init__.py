"""The `gcr` command line: one module per command family, registered here.

Exit codes: 0 ok · 1 runtime failure · 2 usage error · 3 completed but no round could be scored.
Commands import what they need when they run, so `gcr --help` starts instantly; the CLI imports the
library, never the other way round.
"""
from __future__ import annotations

import os
import sys

import typer

from gcr.cli import batch, bench, critic, demo, refine, results, resume, tools

app = typer.Typer(
    help="Generate-Critique-Refine: make a frozen image generator follow your request better, "
         "round by round, with the RationalRewards critic.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(refine.refine)
app.command()(resume.resume)
app.command()(results.show)
app.command()(batch.batch)
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
