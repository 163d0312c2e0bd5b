"""`gcr score`: critique images that already exist (curation, evaluation), resumably."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from gcr.cli import options
from gcr.cli.common import JsonOut, RunsDir, check_args, handled, interrupted, open_store, print_error
from gcr.errors import EXIT_UNSCORED, UsageError
from gcr.strictjson import dumps

# What --json gives per image (plus `judge` with --judge, and `kept`/`copied_to`/`moved_to` with filters).
JSON_FIELDS = ("id", "image", "source", "prompt", "task", "scores", "overall", "complete", "missing", "problems",
               "refined_request", "summary", "attempts", "error")
CSV_DIMENSIONS = ("text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering")


def score(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="Images to score (with --prompt), or one manifest: a .yaml, .jsonl or .csv file listing image, prompt, optional source and id.", show_default=False)],
    prompt: Annotated[Optional[str], typer.Option(help="What the images should show (for an edit: the instruction). For images given as arguments.", show_default=False)] = None,
    source: Annotated[Optional[Path], typer.Option(help="The image that was edited: scores the images as edits of it (the edit critic).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the last score job of these images and options: images already scored are kept, the rest are scored.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Images critiqued together in one batched critic call.")] = 8,
    min_overall: Annotated[Optional[float], options.number(rich_help_panel="Curation", help="Keep the images whose overall is at least this (1-4); unscored and incomplete critiques never pass.", show_default=False)] = None,
    min_: Annotated[Optional[list[str]], typer.Option("--min", rich_help_panel="Curation", help="A minimum for one dimension, NAME=VALUE (repeatable), e.g. --min text_faithfulness=3.", show_default=False)] = None,
    copy_to: Annotated[Optional[Path], typer.Option(rich_help_panel="Curation", help="Copy the images that pass the filters into this folder (never overwriting: a taken name gets -2, -3 ...).", show_default=False)] = None,
    move_to: Annotated[Optional[Path], typer.Option(rich_help_panel="Curation", help="Move the images that pass the filters into this folder (never overwriting).", show_default=False)] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the results to this CSV file.", show_default=False)] = None,
    critic: options.Critic = None,
    critic_url: options.CriticUrl = None,
    critic_model: options.CriticModel = None,
    api_key_env: options.ApiKeyEnv = None,
    critic_timeout: options.CriticTimeout = options.DEFAULT_CRITIC_TIMEOUT,
    critic_engine: options.CriticEngine = None,
    vllm_bin: options.VllmBin = None,
    critic_decode: options.CriticDecode = "auto",
    critic_speculate: options.CriticSpeculate = None,
    critic_quant: options.CriticQuant = "none",
    max_new_tokens: options.MaxNewTokens = options.DEFAULT_MAX_NEW_TOKENS,
    judge: options.Judge = None,
    workers: options.Workers = None,
    ray_address: options.RayAddress = None,
    device: Annotated[str, typer.Option(rich_help_panel=options.CRITIC, help="Where the critic (and judge) run: auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(rich_help_panel=options.CRITIC, help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    allow_remote_code: Annotated[bool, typer.Option("--allow-remote-code", rich_help_panel=options.CRITIC, help="Allow models to run code from their repository (off: safer).")] = False,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
):
    """Critique existing images against their prompts: scores, problems, a refined request per image.

    Results go to the run store as they complete; after a crash or Ctrl-C, the same command with
    --resume scores only the images not yet scored.

    \b
    Examples:
      gcr score img1.png img2.png --prompt "a fox reading a newspaper"
      gcr score edited.png --source original.png --prompt "make the sky stormy"
      gcr score manifest.yaml --min-overall 3.2 --copy-to keep/ --csv scores.csv
      gcr score manifest.csv --judge clipscore --json
    """
    args = {k: v for k, v in locals().items() if k != "ctx"}
    from rich.text import Text

    from gcr.view import Progress, err, text

    with handled():
        # 1. Check every input before any model loads: the options, then the images (all of them).
        check_args(args)
        options.check_critic_choices(critic_url=critic_url, critic_engine=critic_engine, vllm_bin=vllm_bin,
                                     critic_decode=critic_decode, critic_quant=critic_quant, judge=judge,
                                     device=device, dtype=dtype)
        from gcr.curate import check_destination, parse_filters

        cluster = options.cluster_options(workers, ray_address)
        if cluster is not None and critic_engine:
            raise UsageError("--critic-engine starts a critic server for one process and cannot serve Ray workers: "
                             "start one server (`gcr critic start`, or vllm serve) and give its URL as "
                             "--critic-url, or drop --workers.")
        filters = parse_filters(min_overall, min_ or [])
        if copy_to is not None and move_to is not None:
            raise UsageError("--copy-to and --move-to both say where the kept images go: pass one.")
        destination, move = (move_to, True) if move_to is not None else (copy_to, False)
        if destination is not None:
            check_destination(destination, "--move-to" if move else "--copy-to")
        if csv is not None:
            _check_csv_path(csv)
        entries, source_name = _entries(inputs, prompt, source)
        _check_critic(critic, critic_url, {e.task for e in entries})

        from gcr.runner import ModelCache, ModelOptions
        from gcr.scorejob import run_score_job

        opts = ModelOptions(generator="none", device=device, dtype=dtype, allow_remote_code=allow_remote_code,
                            **options.critic_fields(
                                critic=critic, critic_url=critic_url, critic_model=critic_model,
                                api_key_env=api_key_env, critic_timeout=critic_timeout, critic_engine=critic_engine,
                                vllm_bin=vllm_bin, max_new_tokens=max_new_tokens, critic_decode=critic_decode,
                                critic_speculate=critic_speculate, critic_quant=critic_quant, judge=judge))
        store = open_store(runs_dir)
        again = _resume_command(ctx)

        # 2. Score: each batch of critiques is stored as it completes. A critic engine started here
        #    stops when the cache closes, whatever happens.
        try:
            with Progress(1, enabled=not quiet) as progress, \
                    ModelCache(runs_dir=store.root, notice=lambda msg: err.print(text(msg)),
                               status=progress.update) as cache:
                record = run_score_job(store, entries, opts, source=source_name, resume=resume,
                                       batch_size=batch_size, cache=cache, progress=progress,
                                       log=lambda msg: err.print(text(msg)) if not quiet else None,
                                       resume_command=again, cluster=cluster)
        except KeyboardInterrupt:
            raise interrupted("scored images", again) from None

        # 3. Curate, then report: the table for people, the records for scripts, the CSV for both.
        results = record["results"]
        placed = _curate(store, record, filters, destination, move) if (filters.active or destination) else None
        if csv is not None:
            _write_csv(csv, results, bool(judge), placed is not None)
        if json_out:
            print(dumps([_json(r, bool(judge), placed is not None) for r in results]))
        else:
            _print_results(record, bool(judge), placed is not None, filters, destination, move)
        if record["status"] != "completed":
            print_error(record["error"] or f"the score job ended {record['status']}")
            raise typer.Exit(1)
        if results and all(r.get("overall") is None for r in results):
            if not json_out:
                err.print(Text.assemble(("no image could be scored", "yellow"),
                                        ": every critique was unreadable (see `problems`)"))
            raise typer.Exit(EXIT_UNSCORED)


def _entries(inputs: list[Path], prompt: Optional[str], source: Optional[Path]):
    """The entries to score and what the job records as its source (the manifest, or "arguments")."""
    from gcr.manifest import entries_from_args, is_manifest, load_manifest

    manifests = [p for p in inputs if is_manifest(p)]
    if manifests:
        if len(inputs) > 1:
            raise UsageError(f"Give one manifest ({manifests[0]}) or images, not both: a manifest lists its own "
                             "images.")
        if prompt is not None or source is not None:
            raise UsageError("--prompt and --source are for images given as arguments; a manifest gives each "
                             "entry its own prompt and source.")
        return load_manifest(manifests[0]), str(manifests[0].expanduser().resolve())
    if prompt is None:
        raise UsageError("Images given as arguments need --prompt (what they should show), or pass a manifest "
                         "(.yaml, .jsonl or .csv) that gives each image its prompt.")
    return entries_from_args(inputs, prompt, source), "arguments"


def _check_critic(critic: Optional[str], critic_url: Optional[str], tasks: set) -> None:
    """A critic named by preset judges one task: it must be the task of every entry (checked before
    loading, like refine's)."""
    if critic is None or critic_url:
        return
    from gcr.modelspec import critic_task

    judged, problem = critic_task(critic)
    if problem:
        raise UsageError(problem[:1].upper() + problem[1:].rstrip(".") + ".")
    other = tasks - {judged} if judged else set()
    if other:
        kind = "edits" if "edit" in other else "text-to-image entries"
        raise UsageError(f"The critic '{critic}' judges {judged} results but there are {kind} to score: leave "
                         "--critic out (each entry gets the critic of its task), or score them separately.")


def _check_csv_path(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"--csv {path} is a folder: give a file name, e.g. --csv scores.csv.")
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--csv {path}: the folder {parent} does not exist: create it or choose another path.")


def _resume_command(ctx) -> str:
    """This command as typed (every option that differs from its default), with --resume: what
    continues the same job after Ctrl-C or a crash."""
    parts = [ctx.command_path]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "resume":
            continue
        if param.param_type_name == "argument":
            parts += [str(v) for v in value or ()]
            continue
        if value is None or value == param.default or (param.multiple and not value):
            continue
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag if value else (param.secondary_opts or [flag])[0])
        else:
            for v in (value if param.multiple else [value]):
                parts += [flag, str(v)]
    return shlex.join([*parts, "--resume"]).replace(f"'{ctx.command_path}'", ctx.command_path, 1)


def _curate(store, record: dict, filters, destination: Optional[Path], move: bool) -> dict:
    """Mark each result kept or not; put the kept images in `destination`. Returns position -> where
    the image went (None: not kept, or kept without a destination)."""
    from gcr.curate import place

    placed = {}
    target = destination.expanduser().resolve() if destination else None
    how = "moved_to" if move else "copied_to"
    for r in record["results"]:
        r["kept"] = filters.passes(r)
        placed[r["position"]] = None
        if not r["kept"] or target is None:
            continue
        before = r.get("placed") or {}
        done = before.get("path") and (before.get("how") == "moved_to" or (
            before.get("dir") == str(target) and Path(before["path"]).is_file()))
        if done:  # this job put it there already (an earlier run of the same command)
            placed[r["position"]] = before
            r[before["how"]] = before["path"]
            continue
        try:
            path = place(r, target, move)
        except OSError as e:
            raise UsageError(f"Could not {'move' if move else 'copy'} {r['image']} to {target} "
                             f"({e.strerror or e}): check the folder, then run the command again with --resume "
                             "(scored images are kept).") from None
        r["placed"] = {"dir": str(target), "path": str(path), "how": how}
        r[how] = str(path)
        placed[r["position"]] = r["placed"]
        store.update_score(record["id"], r["position"], placed=r["placed"])
    return placed


def _json(r: dict, judged: bool, curated: bool) -> dict:
    out = {k: r.get(k) for k in JSON_FIELDS}
    if judged:
        out["judge"] = r.get("judge")
    if curated:
        out["kept"] = r.get("kept", False)
        for how in ("copied_to", "moved_to"):
            if r.get(how):
                out[how] = r[how]
    return out


def _write_csv(path: Path, results: list[dict], judged: bool, curated: bool) -> None:
    """One row per image; N/A scores as N/A, missing ones empty. Written whole, then renamed."""
    import csv as csvlib
    import os

    columns = ["id", "image", "source", "prompt", "task", *CSV_DIMENSIONS, "overall", "complete",
               *(["judge"] if judged else []), *(["kept", "placed"] if curated else []),
               "problems", "summary", "refined_request", "error"]
    path = path.expanduser()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csvlib.writer(f)
            w.writerow(columns)
            for r in results:
                scores = r.get("scores") or {}
                row = {**{k: r.get(k) for k in columns}, **{d: ("N/A" if d in scores and scores[d] is None
                                                               else scores.get(d)) for d in CSV_DIMENSIONS},
                       "problems": "; ".join(r.get("problems") or []),
                       "placed": (r.get("placed") or {}).get("path")}
                w.writerow([_cell(row[c]) for c in columns])
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"Could not write --csv {path} ({e.strerror or e}); the scores are kept: run the "
                         "command again with --resume to write it.") from None


def _cell(value) -> str:
    """A CSV cell that a spreadsheet shows as text: prompts and critiques are data, and a cell that
    starts with = + - @ (or a tab / CR) would be run as a formula (OWASP's CSV injection advice)."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _print_results(record: dict, judged: bool, curated: bool, filters, destination, move: bool) -> None:
    from rich.text import Text

    from gcr.tables import Column, FitTable
    from gcr.view import DIMENSION_LABELS, out, text

    results = record["results"]
    dims = [d for d in DIMENSION_LABELS if any(d in (r.get("scores") or {}) for r in results)]
    columns = [Column("image", free=True, min_width=12), *(Column(DIMENSION_LABELS[d], "right") for d in dims),
               Column("overall", "right"), *([Column("judge", "right")] if judged else []),
               *([Column("kept")] if curated else []), Column("problems", free=True, min_width=16)]
    table = FitTable(columns, title=Text.assemble("score job ", text(record["id"], style="bold")))
    incomplete = False
    for r in results:
        scores = r.get("scores") or {}
        cells = [text(r.get("label") or r["image"])]
        for d in dims:
            v = scores.get(d, "—") if d in scores else "—"
            cells.append(Text("N/A") if d in scores and v is None else Text(v if isinstance(v, str) else f"{v:.2f}"))
        if r.get("error") or r.get("overall") is None:
            cells.append(Text("failed" if r.get("error") else "unscored", style="red"))
        elif not r.get("complete"):
            cells.append(Text(f"{r['overall']:.2f}*", style="yellow"))
            incomplete = True
        else:
            cells.append(Text(f"{r['overall']:.2f}", style="bold"))
        if judged:
            cells.append(Text("—" if r.get("judge") is None else f"{r['judge']:.3f}"))
        if curated:
            cells.append(Text("yes", style="green") if r.get("kept") else Text("no", style="dim"))
        problem = r.get("error") or "; ".join(r.get("problems") or [])
        cells.append(text(problem, style="red" if r.get("error") else "dim"))
        table.add_row(*cells)
    scored = sum(1 for r in results if r.get("overall") is not None)
    complete = sum(1 for r in results if r.get("complete"))
    summary = Text(f"{len(results)} images: {scored} scored ({complete} complete critiques)")
    if curated:
        kept = sum(1 for r in results if r.get("kept"))
        where = f" → {'moved' if move else 'copied'} to {destination}" if destination else ""
        summary.append_text(text(f" · {kept} kept ({filters.describe()}){where}"))
    if incomplete:
        summary.append("\n* incomplete critique: a dimension was not judged, so it passes no filter", style="yellow")
    table.caption = summary
    out.print(table)


def show_score_job(store, job_id: str, json_out: bool) -> None:
    """`gcr show score-...`: a score job's results again, from the store."""
    from gcr.curate import Filters
    from gcr.scorejob import score_record
    from gcr.view import out, text

    record = score_record(store, job_id)
    judged = any(r.get("judge") is not None for r in record["results"])
    if json_out:
        print(dumps({**{k: v for k, v in record.items() if k not in ("results", "key")},
                     "results": [_json(r, judged, False) for r in record["results"]]}))
        return
    _print_results(record, judged, False, Filters(), None, False)
    status = f"{record['status']}: {record['scored']} of {record['items']} images scored"
    out.print(text(status + (f" · {record['error']}" if record.get("error") else "")))
