"""`gcr demo`: the whole tool in about a minute, offline, on a CPU, with tiny models.

It builds (once, cached under the runs home) a tiny random Flux pipeline and a tiny critic taught a few
critiques, then runs what a user would: a refine, a two-job batch and a report, through the same
commands. The models are tiny and random: the point is to see the loop, the tables and the report.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import typer

from gcr.cli.common import RunsDir, handled


def demo(runs_dir: RunsDir = None):
    """Try gcr offline in about a minute: a refine, a batch and a report on tiny random models.

    \b
    The first run builds the demo models (about 30 s on two cores) and caches them under
    <runs-dir>/cache; later runs start at once. Nothing is downloaded.
    """
    from gcr.cli.batch import batch
    from gcr.cli.refine import refine
    from gcr.cli.results import report
    from gcr.store import default_runs_dir
    from gcr.tiny import demo as d
    from gcr.view import err, out, text

    import os

    # Offline by construction: the demo's models are local folders, so the hub is never asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = Path(runs_dir or default_runs_dir())
    with handled():
        err.print("[bold]gcr demo[/]: tiny RANDOM models, offline, on the CPU. The generator draws noise and "
                  "the critic was taught one critique per request: the scores mean nothing; the loop, "
                  "the tables and the report are real.", highlight=False)
        models = d.demo_models(home / "cache", log=lambda msg: err.print(text(msg, "dim")))
        small = {"steps": d.STEPS, "width": d.IMAGE_SIZE, "height": d.IMAGE_SIZE, "device": "cpu",
                 "max_new_tokens": d.MAX_NEW_TOKENS}

        # 1. One request, refined round by round.
        first = d.CRITIQUES[0]
        err.print(text("\n1. gcr refine ", "bold") + text(shlex.quote(first.request)))
        _keep_going(refine, request=first.request, generator=str(models.generator), critic=str(models.critic),
                    rounds=3, seed=d.SEED, runs_dir=home, **small)

        # 2. A batch of two more requests, advancing together.
        batch_file = home / "demo" / "demo-batch.yaml"
        batch_file.parent.mkdir(parents=True, exist_ok=True)
        batch_file.write_text(_batch_yaml(models, small, d))
        err.print(text("\n2. gcr batch ", "bold") + text(str(batch_file)))
        _keep_going(batch, file=batch_file, runs_dir=home)

        # 3. The report of the batch.
        from gcr.store import RunStore

        batch_id = RunStore(home).latest_batch_for(str(batch_file.resolve()))["id"]
        err.print("\n[bold]3. gcr report[/] (a self-contained HTML page)", highlight=False)
        report(ref=batch_id, runs_dir=home)

        flags = (f"--critic {models.critic} --steps {d.STEPS} --width {d.IMAGE_SIZE} "
                 f"--height {d.IMAGE_SIZE} --device cpu --max-new-tokens {d.MAX_NEW_TOKENS}")
        runs = "" if runs_dir is None else f" --runs-dir {shlex.quote(str(runs_dir))}"
        out.print("\n[bold]Try next[/] (same tiny models; use a preset such as -g flux-dev for real images):",
                  highlight=False)
        for line in (f'gcr refine "{d.CRITIQUES[1].request}" -g {models.generator} {flags}{runs}',
                     f"gcr batch {batch_file}{runs}",
                     f"gcr show last --round 2{runs}",
                     f"gcr report {batch_id} --open{runs}"):
            out.print(text(f"  {line}"), soft_wrap=True)


def _keep_going(command, **kwargs) -> None:
    """Run a command; its own non-zero exit (e.g. 3, nothing scored) is shown, not fatal to the demo."""
    try:
        command(**kwargs)
    except typer.Exit as e:
        if e.exit_code not in (0, None):
            raise


def _batch_yaml(models, small: dict, d) -> str:
    import yaml

    jobs = [{"id": f"demo-{i}", "prompt": c.request} for i, c in enumerate(d.CRITIQUES[1:], 1)]
    defaults = {"generator": str(models.generator), "critic": str(models.critic), "rounds": 3,
                "seed": d.SEED, **small}
    return ("# Written by `gcr demo`: two jobs on the demo's tiny models.\n"
            + yaml.safe_dump({"defaults": defaults, "jobs": jobs}, sort_keys=False))
