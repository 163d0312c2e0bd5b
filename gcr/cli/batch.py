"""`gcr batch`: every job of a YAML file."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from gcr.cli import options
from gcr.cli.common import JsonOut, RunsDir, check_args, handled, interrupted, open_store
from gcr.compilecache import use_compile_cache
from gcr.cli.results import print_compare
from gcr.errors import EXIT_UNSCORED
from gcr.records import LoopSettings
from gcr.strictjson import dumps


def batch(
    file: Annotated[Path, typer.Argument(help="YAML file with a `defaults:` block and a `jobs:` list (see examples.yaml).")],
    resume: Annotated[bool, typer.Option(help="Continue the last batch of this file: finished jobs are skipped, unfinished ones continue from their last stored round.")] = False,
    force: Annotated[bool, typer.Option(help="With --resume: restart unfinished jobs whose entry in the file changed.")] = False,
    check: Annotated[bool, typer.Option(help="Only validate the file; load no model.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Most jobs that advance together (their critiques share one batched critic call per round).")] = 8,
    gen_batch: Annotated[int, typer.Option(min=1, max=64, help="Images per generator call. >1 is faster for small images but makes pixels depend (slightly) on which jobs share a call.")] = 1,
    judge: options.Judge = None,
    workers: options.Workers = None,
    ray_address: options.RayAddress = None,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
):
    """Run every job of a YAML file: validated up front, models loaded once, resumable.

    \b
    Examples:
      gcr batch examples.yaml --check      # validate only
      gcr batch examples.yaml              # run every job
      gcr batch examples.yaml --resume     # after a crash or Ctrl-C
      gcr batch examples.yaml --workers 4  # on a local Ray cluster (a GPU each)
    """
    args = dict(locals())
    from rich.text import Text

    from gcr.batchfile import load_batch_file
    from gcr.view import Progress, err, out, text

    with handled():
        check_args(args)
        cluster = None if check else options.cluster_options(workers, ray_address)  # before the file is read
        spec = load_batch_file(file)  # every problem in the file, at once, before any model loads
        if judge is not None:  # for every job that names no judge of its own
            from gcr.batchfile import with_judge

            options.check_critic_choices(critic_url=None, critic_engine=None, vllm_bin=None, critic_decode=None,
                                         critic_quant=None, judge=judge)
            spec = with_judge(spec, options.judge_spec(judge))
        if check:
            edits = sum(1 for j in spec.jobs if j.image)
            err.print(Text.assemble(("ok", "green"), ": ", text(file), f" has {len(spec.jobs)} valid jobs "
                                    f"({len(spec.jobs) - edits} text-to-image, {edits} edit)"))
            if json_out:
                print(dumps({"file": str(file), "ok": True, "jobs": [j.id for j in spec.jobs]}))
            return
        from gcr.batch import run_batch
        from gcr.runner import ModelCache

        store = open_store(runs_dir)
        use_compile_cache(store.root)   # compiled critic decoders persist under the runs home
        again = f"gcr batch {shlex.quote(str(file))} --resume" + (
            f" --runs-dir {shlex.quote(str(runs_dir))}" if runs_dir else "") + (cluster.flags() if cluster else "") + (
            f" --judge {shlex.quote(judge)}" if judge else "")
        rounds = max((j.options.get("rounds") or LoopSettings.rounds) for j in spec.jobs)
        try:
            # Critic engines started for the batch stop when the cache closes, whatever happens.
            with Progress(rounds, enabled=not quiet) as progress, \
                    ModelCache(runs_dir=store.root, notice=lambda msg: err.print(text(msg)),
                               status=progress.update) as cache:
                record = run_batch(store, spec, resume=resume, force=force, batch_size=batch_size,
                                   gen_batch=gen_batch, progress=progress, log=progress.log,
                                   resume_command=again, cache=cache, cluster=cluster)
        except KeyboardInterrupt:
            raise interrupted("completed rounds", again) from None
        failed = [j for j in record["jobs"] if j["status"] != "completed"]
        if json_out:
            print(dumps(record))
        else:
            print_compare(store, [j["run_id"] for j in record["jobs"] if j["run_id"]], None, True,
                           title=f"batch {record['id']}")
            for j in failed:
                out.print(Text.assemble(("failed", "red"), " ", text(j["id"]), ": ", text(j["error"])))
            out.print(Text.assemble("batch ", text(record["id"], style="bold"), f": {len(record['jobs']) - len(failed)} "
                                    f"of {len(record['jobs'])} jobs completed · report: gcr report ", text(record["id"])))
        if record["status"] != "completed":
            listed = "; ".join(f"{j['id']} ({(j['error'] or j['status']).rstrip('.')})" for j in failed)
            err.print(text(f"error: {len(failed)} of {len(record['jobs'])} jobs failed: {listed}; retry "
                           f"them with `{again}`."), soft_wrap=True)
            raise typer.Exit(1)
        if record["jobs"] and all(j["best_overall"] is None for j in record["jobs"]):
            # Like `gcr refine`: the batch completed, but no round of any job could be scored.
            if not json_out:
                err.print(Text.assemble(("no round of any job could be scored", "yellow"), ": read a "
                                        "critique with `gcr show RUN --round 1`"))
            raise typer.Exit(EXIT_UNSCORED)
