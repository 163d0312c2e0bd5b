"""`gcr resume`: continue an unfinished run from its last stored round."""
from __future__ import annotations

from typing import Annotated

import typer

from gcr.cli.common import JsonOut, RunsDir, finish_run, handled, interrupted, open_store, resume_command


def resume(
    run_id: Annotated[str, typer.Argument(help="The run to continue: its id, a unique prefix of it, or 'last'.")],
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
):
    """Continue an interrupted or failed run from its last stored round.

    It goes on with the run's recorded seeds, prompts, settings and models; a round that failed is
    done again. A run that another live process is advancing is refused.

    \b
    Examples:
      gcr resume last
      gcr resume 20261201-101500-a-fox-rea
    """
    from rich.text import Text

    from gcr.resume import AlreadyComplete, resume_run
    from gcr.view import Progress, err

    with handled():
        store = open_store(runs_dir)
        run_ref = run_id
        try:
            run = store.get_run(run_id)
            run_ref = run.id
            with Progress(int(run.settings.get("loop", {}).get("rounds") or 1), enabled=not quiet) as progress:
                run = resume_run(store, run.id, log=progress.update, progress=progress)
        except AlreadyComplete as done:
            err.print(Text(f"Run {done.run.id} is complete ({done.run.stop_reason or 'finished'}, "
                           f"{len(done.run.rounds)} rounds): there is nothing to resume; see it with "
                           f"`gcr show {done.run.id}`."), soft_wrap=True)
            return
        except KeyboardInterrupt:
            raise interrupted("completed rounds", resume_command(run_ref, runs_dir)) from None
        finish_run(run, json_out, runs_dir)
