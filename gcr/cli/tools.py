"""`gcr generators` and `gcr selftest`: what is available, and whether the install works."""
from __future__ import annotations

from dataclasses import asdict

import typer

from gcr.cli.common import JsonOut, handled
from gcr.strictjson import dumps


def generators(json_out: JsonOut = False):
    """List the generator presets and what they are."""
    from rich.table import Table

    from gcr.presets import GENERATOR_PRESETS
    from gcr.view import out, text

    if json_out:
        print(dumps({name: asdict(p) for name, p in GENERATOR_PRESETS.items()}))
        return
    # Five narrow columns and one for the hub id over the description: fits 80 columns, and the
    # description's own words ("FLUX.1 [dev]") stay on one line, as Text (never markup).
    table = Table(title="Generator presets (--generator also takes any hub id or local directory)",
                  title_justify="left")
    for col in ("preset", "task", "steps", "guidance", "size"):
        table.add_column(col, no_wrap=True)
    table.add_column("hub id · about", overflow="fold")
    for name, p in GENERATOR_PRESETS.items():
        size = f"{p.width}x{p.height}" if p.width and p.height else "source's"
        about = text(p.hub_id).append("\n").append_text(text(p.description, style="dim"))
        table.add_row(*(text(v) for v in (name, p.task, p.steps, p.guidance, size)), about)
    out.print(table)


def selftest(json_out: JsonOut = False):
    """Check the install offline: the whole loop on tiny random-weight models, in seconds."""
    from gcr.selftest import run_selftest
    from gcr.view import err

    with handled():
        report = run_selftest(log=None if json_out else err.print)
        if json_out:
            print(dumps(report))
        if not report["ok"]:
            raise typer.Exit(1)
