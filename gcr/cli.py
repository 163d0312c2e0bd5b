"""The `gcr` command line. Parses options, turns domain errors into exit codes, prints results.

Exit codes: 0 ok · 1 runtime failure · 2 usage error · 3 completed but no round could be scored.
Heavy libraries are imported only by the commands that load models, so `gcr --help` is instant.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EXIT_UNSCORED, GcrError, UsageError
from .records import LoopSettings

app = typer.Typer(
    help="Generate-Critique-Refine: make a frozen image generator follow your request better, "
         "round by round, with the RationalRewards critic.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RunsDir = Annotated[Optional[Path], typer.Option(
    "--runs-dir", help="Where runs are stored (SQLite + PNGs). Default: $GCR_HOME or ./gcr-runs.",
    show_default=False)]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


@contextmanager
def handled():
    """Expected failures: one sentence on stderr, the documented exit code, no traceback."""
    from rich.markup import escape

    from .view import err

    try:
        yield
    except GcrError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed rounds are kept in the run store.")
        raise typer.Exit(130) from None


def open_store(runs_dir: Optional[Path]):
    from .store import RunStore, default_runs_dir

    return RunStore(runs_dir or default_runs_dir())


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"The image {path} does not exist: check the path given to --image.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"The image {path} cannot be read ({e.__class__.__name__}): "
                         "pass a PNG, JPEG or WebP file.") from None


def parse_gen_args(pairs: list[str]) -> dict:
    """`--gen-arg key=value`: values are parsed as JSON when they can be (numbers, booleans, lists)."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--gen-arg '{pair}' is not key=value: write e.g. --gen-arg max_sequence_length=256.")
        try:
            extra[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.strip()] = value
    return extra


@app.command()
def refine(
    request: Annotated[str, typer.Argument(help="What you want to see (or, with --image, the edit to make).")],
    image: Annotated[Optional[Path], typer.Option(rich_help_panel="Generator", help="Source image to edit (edit generators only). Every round edits this image.")] = None,
    generator: Annotated[Optional[str], typer.Option("--generator", "-g", rich_help_panel="Generator", help="A preset (see `gcr generators`), a hub id or a local diffusers directory. Default: flux-dev, or flux-kontext with --image.", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option(rich_help_panel="Generator", help="t2i or edit. Default: the preset's, or inferred from the pipeline.", show_default=False)] = None,
    critic: Annotated[Optional[str], typer.Option(rich_help_panel="Critic", help="Critic preset, hub id or local dir. Default: rationalrewards-t2i or rationalrewards-edit by task.", show_default=False)] = None,
    critic_url: Annotated[Optional[str], typer.Option(rich_help_panel="Critic", help="Use a served critic (vLLM or any OpenAI-compatible /v1 URL) instead of loading it in-process.", show_default=False)] = None,
    critic_model: Annotated[Optional[str], typer.Option(rich_help_panel="Critic", help="Model name on the critic server (default: the one it serves).", show_default=False)] = None,
    api_key_env: Annotated[Optional[str], typer.Option(rich_help_panel="Critic", help="Name of the environment variable holding the critic server's API key.", show_default=False)] = None,
    rounds: Annotated[int, typer.Option(rich_help_panel="Loop", min=1, max=100, help="Most rounds to run.")] = LoopSettings.rounds,
    target: Annotated[float, typer.Option(rich_help_panel="Loop", min=1.0, max=4.0, help="Stop when every applicable score is at least this (1-4).")] = LoopSettings.target,
    min_delta: Annotated[float, typer.Option(rich_help_panel="Loop", min=0.0, max=3.0, help="A gain smaller than this counts as no improvement.")] = LoopSettings.min_delta,
    patience: Annotated[int, typer.Option(rich_help_panel="Loop", min=1, max=100, help="Stop after this many rounds without improvement.")] = LoopSettings.patience,
    time_budget: Annotated[Optional[float], typer.Option(rich_help_panel="Loop", min=0.0, help="Stop starting new rounds after this many seconds.", show_default=False)] = None,
    candidates: Annotated[int, typer.Option(rich_help_panel="Loop", min=1, max=64, help="Images per round (one per seed); the best-scored is the round's result.")] = LoopSettings.candidates,
    seed: Annotated[Optional[int], typer.Option(rich_help_panel="Loop", min=0, max=2**31 - 1, help="Base seed. Default: random (recorded with the run).", show_default=False)] = None,
    seed_policy: Annotated[str, typer.Option(rich_help_panel="Loop", help="fixed: same seeds every round (isolates the prompt's effect); vary: new seeds each round.")] = LoopSettings.seed_policy,
    steps: Annotated[Optional[int], typer.Option(rich_help_panel="Generator", min=1, max=1000, help="Denoising steps (default: the preset's).", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(rich_help_panel="Generator", min=0.0, max=100.0, help="Guidance scale (default: the preset's).", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(rich_help_panel="Generator", min=8, max=8192, help="Image width in pixels.", show_default=False)] = None,
    height: Annotated[Optional[int], typer.Option(rich_help_panel="Generator", min=8, max=8192, help="Image height in pixels.", show_default=False)] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(rich_help_panel="Generator", help="Negative prompt, where the pipeline supports one.", show_default=False)] = None,
    gen_arg: Annotated[Optional[list[str]], typer.Option("--gen-arg", rich_help_panel="Generator", help="Extra pipeline argument key=value (repeatable), e.g. max_sequence_length=256.", show_default=False)] = None,
    device: Annotated[str, typer.Option(rich_help_panel="Generator", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(rich_help_panel="Generator", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    offload: Annotated[Optional[str], typer.Option(rich_help_panel="Generator", help="Generator CPU offload: none, model, group or sequential (slower, far less GPU memory). Default: chosen by --memory.", show_default=False)] = None,
    memory: Annotated[str, typer.Option(rich_help_panel="Generator", help="GPU memory plan: auto (from free memory and model sizes), resident, offload-model, swap, offload-group or critic-cpu.")] = "auto",
    critic_decode: Annotated[str, typer.Option(rich_help_panel="Critic", help="In-process critic decoding: auto (CUDA graphs on a GPU), compile (fastest after a ~2 min first call), graph, eager or off (plain generate).")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(rich_help_panel="Critic", min=16, max=32768, help="Longest critique the critic may write, in tokens.")] = 2048,
    allow_remote_code: Annotated[bool, typer.Option("--allow-remote-code", rich_help_panel="Generator", help="Allow models to run code from their repository (off: safer).")] = False,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
):
    """Generate, critique against your request, rewrite the prompt, repeat; keep the best round.

    \b
    Examples:
      gcr refine "a fox reading a newspaper on a park bench" --generator flux-dev --rounds 4
      gcr refine "make the sky stormy, keep the house" --image house.png --generator flux-kontext
      gcr refine "a red cube" -g ./my-pipeline --critic ./my-critic --steps 2 --device cpu --json
    """
    from .view import Progress, err, print_run

    with handled():
        # 1. Check every input before any model loads.
        if not request.strip():
            raise UsageError("The request is empty: say what the image should show, e.g. gcr refine \"a red fox\".")
        # Choices are checked against the one table batch files use too (gcr.batchfile.OPTION_SPECS).
        from .batchfile import check_option, cli_flag

        for name, value in (("task", task), ("seed_policy", seed_policy), ("offload", offload),
                            ("memory", memory), ("critic_decode", critic_decode)):
            if value is not None:
                try:
                    check_option(name, value)
                except ValueError as e:
                    raise UsageError(f"{cli_flag(name)}{str(e)[len(name):]}.") from None
        source = load_image(image) if image is not None else None
        from .generate import GenerationSettings
        from .runner import ModelOptions, load_models, refine_jobs, start_run
        from .loop import Job

        settings = LoopSettings(rounds=rounds, target=target, min_delta=min_delta, patience=patience,
                                time_budget=time_budget, candidates=candidates,
                                seed=seed if seed is not None else random.randrange(2**31),
                                seed_policy=seed_policy)
        opts = ModelOptions(
            generator=generator or ("flux-kontext" if image is not None else "flux-dev"), task=task,
            critic=critic, critic_url=critic_url, critic_model=critic_model, api_key_env=api_key_env,
            critic_max_new_tokens=max_new_tokens, device=device, dtype=dtype, offload=offload,
            memory=memory, critic_decode=critic_decode, allow_remote_code=allow_remote_code,
            generation=GenerationSettings(steps=steps, guidance=guidance, width=width, height=height,
                                          negative_prompt=negative_prompt,
                                          extra=parse_gen_args(gen_arg or [])))
        store = open_store(runs_dir)

        # 2. Load models, open the run, run the loop (every round is stored as it ends).
        with Progress(rounds, enabled=not quiet) as progress:
            models = load_models(opts, has_image=source is not None, log=progress.update)
            run = start_run(store, models, request, settings, str(image.resolve()) if image else None)
            if not quiet:
                err.print(f"run [bold]{run.id}[/] · seed {settings.seed} · {models.task} · "
                          f"{run.generator} → {run.critic}")
            job = Job(run.id, request, settings, source_image=source)
            run = refine_jobs(store, models, [job], {run.id: run}, progress)[run.id]

        # 3. Report: the table for people, the record for scripts.
        if json_out:
            print(json.dumps(run.to_dict(), indent=2))
        else:
            print_run(run)
        if run.error:
            raise typer.Exit(1)
        if run.best_round is None:
            raise typer.Exit(EXIT_UNSCORED)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id, a batch id, a unique prefix of one, or 'last'.")],
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
):
    """Show a run's round table again, from the store (for a batch: the compare table of its jobs)."""
    from .view import print_run

    with handled():
        store = open_store(runs_dir)
        batch = store.find_batch(run_id) if run_id != "last" else None
        if batch:
            from .batch import batch_record

            record = batch_record(store, batch["id"])
            if json_out:
                print(json.dumps(record, indent=2))
            else:
                _print_compare(store, [j["run_id"] for j in record["jobs"] if j["run_id"]], None, True,
                               title=f"batch {batch['id']} · {batch['file']} · {batch['status']}")
            return
        run = store.get_run(run_id)
        if json_out:
            print(json.dumps(run.to_dict(), indent=2))
        else:
            print_run(run)


def _runs_for(store, refs: list[str]) -> list:
    """Runs named by run ids or batch ids (a batch stands for all its jobs' runs), in order."""
    runs = []
    for ref in refs:
        batch = store.find_batch(ref)
        ids = [j["run_id"] for j in batch["jobs"] if j["run_id"]] if batch else [store.resolve_id(ref)]
        runs += [store.get_run(i) for i in ids]
    return runs


def _print_compare(store, run_ids, sort, descending, title=None) -> None:
    from .compare import compare_rows, compare_table, sort_rows
    from .view import out

    rows = compare_rows([store.get_run(i) for i in run_ids])
    if sort:
        rows = sort_rows(rows, sort, descending)
    table = compare_table(rows)
    if title:
        table.title = title
    out.print(table)


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="YAML file with a `defaults:` block and a `jobs:` list (see examples.yaml).")],
    resume: Annotated[bool, typer.Option(help="Continue the last batch of this file: finished jobs are skipped, unfinished ones continue from their last stored round.")] = False,
    force: Annotated[bool, typer.Option(help="With --resume: restart unfinished jobs whose entry in the file changed.")] = False,
    check: Annotated[bool, typer.Option(help="Only validate the file; load no model.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Most jobs that advance together (their critiques share one batched critic call per round).")] = 8,
    gen_batch: Annotated[int, typer.Option(min=1, max=64, help="Images per generator call. >1 is faster for small images but makes pixels depend (slightly) on which jobs share a call.")] = 1,
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
    """
    from .batchfile import load_batch_file
    from .view import Progress, err, out

    with handled():
        spec = load_batch_file(file)  # every problem in the file, at once, before any model loads
        if check:
            edits = sum(1 for j in spec.jobs if j.image)
            err.print(f"[green]ok[/]: {file} has {len(spec.jobs)} valid jobs "
                      f"({len(spec.jobs) - edits} text-to-image, {edits} edit)")
            if json_out:
                print(json.dumps({"file": str(file), "ok": True, "jobs": [j.id for j in spec.jobs]}, indent=2))
            return
        from .batch import run_batch

        store = open_store(runs_dir)
        rounds = max((j.options.get("rounds") or LoopSettings.rounds) for j in spec.jobs)
        with Progress(rounds, enabled=not quiet) as progress:
            record = run_batch(store, spec, resume=resume, force=force, batch_size=batch_size,
                               gen_batch=gen_batch, progress=progress, log=progress.log)
        if json_out:
            print(json.dumps(record, indent=2))
        else:
            _print_compare(store, [j["run_id"] for j in record["jobs"] if j["run_id"]], None, True,
                           title=f"batch {record['id']}")
            failed = [j for j in record["jobs"] if j["status"] != "completed"]
            for j in failed:
                out.print(f"[red]failed[/] {j['id']}: {j['error']}")
            out.print(f"batch [bold]{record['id']}[/]: {len(record['jobs']) - len(failed)} of "
                      f"{len(record['jobs'])} jobs completed · report: gcr report {record['id']}")
        if record["status"] != "completed":
            raise typer.Exit(1)


@app.command()
def compare(
    refs: Annotated[list[str], typer.Argument(help="Run ids and/or batch ids (a batch stands for all its jobs).")],
    sort: Annotated[Optional[str], typer.Option(help="Column to sort by, e.g. best_overall, gain, rounds, time_s.", show_default=False)] = None,
    descending: Annotated[bool, typer.Option("--desc/--asc", help="Sort order.")] = True,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
):
    """Compare runs side by side: rounds used, best scores, gain over round 1, stop reason, time."""
    from .compare import compare_rows, sort_rows

    with handled():
        store = open_store(runs_dir)
        runs_ = _runs_for(store, refs)
        if json_out:
            rows = compare_rows(runs_)
            print(json.dumps(sort_rows(rows, sort, descending) if sort else rows, indent=2))
        else:
            _print_compare(store, [r.id for r in runs_], sort, descending)


@app.command()
def report(
    ref: Annotated[str, typer.Argument(help="A batch id or a run id (or 'last').")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the report. Default: <runs-dir>/reports/<id>.", show_default=False)] = None,
    embed: Annotated[bool, typer.Option(help="Embed images in the HTML (one portable file) instead of linking them.")] = False,
    open_: Annotated[bool, typer.Option("--open", help="Open the report in the default browser.")] = False,
    runs_dir: RunsDir = None,
):
    """Write an HTML report (every round's image, scores, prompt diffs, critiques) and contact sheets."""
    from .report import write_report

    with handled():
        store = open_store(runs_dir)
        batch_ = store.find_batch(ref) if ref != "last" else None
        runs_ = _runs_for(store, [batch_["id"] if batch_ else ref])
        name = batch_["id"] if batch_ else runs_[0].id
        target = out_dir or store.root / "reports" / name
        from .batch import batch_record

        path = write_report(runs_, target, title=f"gcr · {name}",
                            batch=batch_record(store, batch_["id"]) if batch_ else None, embed=embed)
        print(path)
        if open_:
            import webbrowser

            webbrowser.open(path.resolve().as_uri())


@app.command()
def runs(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs to list.")] = 20,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
):
    """List recent runs, newest first."""
    from .view import err, out, runs_table

    with handled():
        rows = open_store(runs_dir).list_runs(limit)
        if json_out:
            keys = ("id", "request", "status", "created", "best_overall", "best_round", "n_rounds", "task",
                    "generator", "stop_reason")
            print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        elif rows:
            out.print(runs_table(rows))
        else:
            err.print("no runs yet: start one with `gcr refine \"your request\"`")


@app.command()
def generators(json_out: JsonOut = False):
    """List the generator presets and what they are."""
    from rich.table import Table

    from .presets import GENERATOR_PRESETS
    from .view import out

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


@app.command()
def selftest(json_out: JsonOut = False):
    """Check the install offline: the whole loop on tiny random-weight models, in seconds."""
    from .selftest import run_selftest
    from .view import err

    with handled():
        report = run_selftest(log=None if json_out else err.print)
        if json_out:
            print(json.dumps(report, indent=2))
        if not report["ok"]:
            raise typer.Exit(1)


from .bench import bench_command  # noqa: E402  (light: torch loads only when the command runs)

app.command("bench")(bench_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
