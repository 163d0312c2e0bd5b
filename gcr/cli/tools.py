"""`gcr generators` and `gcr selftest`: what is available, and whether the install works."""
from __future__ import annotations

import json
from dataclasses import asdict

import typer

from gcr.cli.common import JsonOut, handled


def generators(json_out: JsonOut = False):
    """List the generator presets and what they are."""
    from rich.table import Table

    from gcr.presets import GENERATOR_PRESETS
    from gcr.view import out

    if json_out:
        print(json.dumps({name: asdict(p) for name, p in GENERATOR_PRESETS.items()}, indent=2))
        return
    table = Table(title="Generator presets (--generator also takes any hub id or local directory)")
    for col in ("preset", "task", "hub id", "steps", "guidance", "size", "about"):
        table.add_column(col)
    for name, p in GENERATOR_PRESETS.items():
        size = f"{p.width}x{p.height}" if p.width and p.height else "source's"
        table.add_row(name, p.task, p.hub_id, str(p.steps), str(p.guidance), size, p.description)
    out.print(table)


def selftest(json_out: JsonOut = False):
    """Check the install offline: the whole loop on tiny random-weight models, in seconds."""
    from gcr.selftest import run_selftest
    from gcr.view import err

    with handled():
        report = run_selftest(log=None if json_out else err.print)
        if json_out:
            print(json.dumps(report, indent=2))
        if not report["ok"]:
            raise typer.Exit(1)
