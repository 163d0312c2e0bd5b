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
    table = Table(title="Generator presets (--generator also takes any hub id or local directory)")
    for col in ("preset", "task", "hub id", "steps", "guidance", "size", "about"):
        table.add_column(col)
    for name, p in GENERATOR_PRESETS.items():  # Text cells: "FLUX.1 [dev]" is not markup
        size = f"{p.width}x{p.height}" if p.width and p.height else "source's"
        table.add_row(*(text(v) for v in (name, p.task, p.hub_id, p.steps, p.guidance, size, p.description)))
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
