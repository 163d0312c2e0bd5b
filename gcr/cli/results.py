"""Reading the store: `gcr show`, `gcr runs`, `gcr compare`, `gcr report`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gcr.cli.common import JsonOut, RunsDir, check_args, handled, open_store
from gcr.strictjson import dumps


def show(
    run_id: Annotated[str, typer.Argument(help="A run id, a batch id, a score job id, a unique prefix of one, or 'last'.")],
    round_: Annotated[Optional[int], typer.Option("--round", "-r", min=1, help="Print this round's critique as text: scores with their justifications, summary, comments, refined request.", show_default=False)] = None,
    candidate: Annotated[Optional[int], typer.Option("--candidate", "-c", min=1, help="With --round: the critique of this candidate (1-based) instead of the round's chosen one.", show_default=False)] = None,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
):
    """Show a run's round table again, from the store (for a batch: the compare table of its jobs).

    \b
    Examples:
      gcr show last                  # the round table
      gcr show last --round 2        # round 2's critique as text
      gcr show RUN -r 1 -c 2         # the critique of round 1's second candidate
    """
    args = dict(locals())
    from gcr.errors import UsageError
    from gcr.view import pick_critique, print_critique, print_run

    with handled():
        check_args(args)
        if candidate is not None and round_ is None:
            raise UsageError("--candidate picks a candidate of a round: add --round K.")
        store = open_store(runs_dir, write=False)
        if run_id.startswith("score-") and round_ is None and store.find_score_job(run_id):
            from gcr.cli.score import show_score_job

            show_score_job(store, store.find_score_job(run_id)["id"], json_out)
            return
        batch = store.find_batch(run_id) if run_id != "last" else None
        if batch and round_ is not None:
            raise UsageError(f"--round reads one run's critique, and {batch['id']} is a batch: give the id of one "
                             f"of its runs (listed by `gcr show {batch['id']}`).")
        if round_ is not None:
            run = store.get_run(run_id)
            if json_out:
                r, pick = pick_critique(run, round_, candidate)
                record = r.to_dict()
                print(dumps(record if candidate is None else record["candidates"][pick]))
            else:
                print_critique(run, round_, candidate)
            return
        if batch:
            from gcr.batch import batch_record

            record = batch_record(store, batch["id"])
            if json_out:
                print(dumps(record))
            else:
                print_compare(store, [j["run_id"] for j in record["jobs"] if j["run_id"]], None, True,
                              title=f"batch {batch['id']} · {batch['file']} · {batch['status']}")
            return
        run = store.get_run(run_id)
        if json_out:
            print(dumps(run.to_dict()))
        else:
            print_run(run)


def runs_for(store, refs: list[str]) -> list:
    """Runs named by run ids or batch ids (a batch stands for all its jobs' runs), in order."""
    runs = []
    for ref in refs:
        batch = store.find_batch(ref)
        ids = [j["run_id"] for j in batch["jobs"] if j["run_id"]] if batch else [store.resolve_id(ref)]
        runs += [store.get_run(i) for i in ids]
    return runs


def print_compare(store, run_ids, sort, descending, title=None) -> None:
    """The compare table; `title` is data (it may name a batch file): printed literally."""
    from gcr.compare import compare_rows, compare_table, sort_rows
    from gcr.view import out, text

    rows = compare_rows([store.get_run(i) for i in run_ids])
    if sort:
        rows = sort_rows(rows, sort, descending)
    table = compare_table(rows)
    if title:
        table.title = text(title)
    out.print(table)


def compare(
    refs: Annotated[list[str], typer.Argument(help="Run ids and/or batch ids (a batch stands for all its jobs).")],
    sort: Annotated[Optional[str], typer.Option(help="Column to sort by, e.g. best_overall, gain, rounds, time_s.", show_default=False)] = None,
    descending: Annotated[bool, typer.Option("--desc/--asc", help="Sort order.")] = True,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
):
    """Compare runs side by side: rounds used, best scores, gain over round 1, stop reason, time."""
    args = dict(locals())
    from gcr.compare import compare_rows, sort_rows

    with handled():
        check_args(args)
        store = open_store(runs_dir, write=False)
        runs_ = runs_for(store, refs)
        if json_out:
            rows = compare_rows(runs_)
            print(dumps(sort_rows(rows, sort, descending) if sort else rows))
        else:
            print_compare(store, [r.id for r in runs_], sort, descending)


def report(
    ref: Annotated[str, typer.Argument(help="A batch id or a run id (or 'last').")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the report. Default: <runs-dir>/reports/<id>.", show_default=False)] = None,
    embed: Annotated[bool, typer.Option(help="Embed images in the HTML (one portable file) instead of linking them.")] = False,
    open_: Annotated[bool, typer.Option("--open", help="Open the report in the default browser.")] = False,
    runs_dir: RunsDir = None,
):
    """Write an HTML report (every round's image, scores, prompt diffs, critiques) and contact sheets."""
    args = dict(locals())
    from gcr.report import write_report

    with handled():
        check_args(args)
        store = open_store(runs_dir, write=False)
        batch_ = store.find_batch(ref) if ref != "last" else None
        runs_ = runs_for(store, [batch_["id"] if batch_ else ref])
        name = batch_["id"] if batch_ else runs_[0].id
        target = out_dir or store.root / "reports" / name
        from gcr.batch import batch_record

        path = write_report(runs_, target, title=f"gcr · {name}",
                            batch=batch_record(store, batch_["id"]) if batch_ else None, embed=embed)
        print(path)
        if open_:
            import webbrowser

            webbrowser.open(path.resolve().as_uri())


def runs(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs to list.")] = 20,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
):
    """List recent runs, newest first."""
    args = dict(locals())
    from gcr.view import err, out, runs_table

    with handled():
        check_args(args)
        rows = open_store(runs_dir, write=False).list_runs(limit)
        if json_out:
            keys = ("id", "request", "status", "created", "best_overall", "best_round", "n_rounds", "task",
                    "generator", "stop_reason")
            print(dumps([{k: r[k] for k in keys} for r in rows]))
        elif rows:
            out.print(runs_table(rows))
        else:
            err.print("no runs yet: start one with `gcr refine \"your request\"`")
