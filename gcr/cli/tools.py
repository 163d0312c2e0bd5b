"""`gcr generators` and `gcr selftest`: what is available, and whether the install works."""
from __future__ import annotations

from dataclasses import asdict

import typer

from gcr.cli.common import JsonOut, handled
from gcr.strictjson import dumps


def generators(json_out: JsonOut = False):
    """List the generator presets and what they are."""
    from gcr.presets import GENERATOR_PRESETS
    from gcr.tables import Column, FitTable
    from gcr.view import out, text

    if json_out:
        print(dumps({name: asdict(p) for name, p in GENERATOR_PRESETS.items()}))
        return
    # Preset names (what you type) and the numbers never shrink; the hub id and description wrap.
    table = FitTable([Column("preset"), Column("task"), Column("steps", "right"), Column("guidance", "right"),
                      Column("size"), Column("gated"), Column("hub id · about", free=True, min_width=40)],
                     title="Generator presets (--generator also takes any hub id or local directory)",
                     caption="gated: accept the licence on the model's hub page, then `hf auth login`")
    for name, p in GENERATOR_PRESETS.items():
        size = f"{p.width}x{p.height}" if p.width and p.height else "source's"
        about = text(p.hub_id).append("\n").append_text(text(p.description, style="dim"))
        table.add_row(*(text(v) for v in (name, p.task, p.steps, p.guidance, size, "yes" if p.gated else "no")),
                      about)
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
