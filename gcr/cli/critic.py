"""`gcr critic start|status|stop`: keep a critic engine warm between commands.

`refine` and `batch` use a running engine for the same critic instead of starting or loading one.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Annotated, Optional

import typer

from gcr.cli.common import JsonOut, RunsDir, handled
from gcr.cli.options import number
from gcr.strictjson import dumps
from gcr.critics.engine import START_TIMEOUT_S

app = typer.Typer(help="Keep a critic engine (vLLM or transformers serve) running between commands.",
                  no_args_is_help=True)

Critic = Annotated[Optional[str], typer.Option(
    help="Critic preset, hub id or local dir. Default: rationalrewards-t2i or rationalrewards-edit by task.",
    show_default=False)]
Task = Annotated[str, typer.Option(help="t2i or edit: the critiques it will write (an edit shows two images).")]


@app.command()
def start(
    critic: Critic = None,
    task: Task = "t2i",
    engine: Annotated[str, typer.Option(help="vllm (its own install, see --vllm-bin) or transformers-serve.")] = "vllm",
    vllm_bin: Annotated[Optional[str], typer.Option(help="The vllm executable. Default: $GCR_VLLM_BIN, else vllm on PATH.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=16, max=32768, help="Longest critique it must allow, in tokens.")] = 2048,
    allow_remote_code: Annotated[bool, typer.Option("--allow-remote-code", help="Allow the critic to run code from its repository (off: safer).")] = False,
    timeout: Annotated[float, number(1.0, help="Seconds to wait for the engine to answer.")] = START_TIMEOUT_S,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
):
    """Start a critic engine that keeps running after this command; stop it with `gcr critic stop`.

    \b
    Examples:
      gcr critic start --engine vllm --vllm-bin ~/vllm-env/bin/vllm
      gcr critic start --engine transformers-serve --critic ./my-critic --device cpu
    """
    from rich.text import Text

    from gcr.critics import engine as engines
    from gcr.critics.inprocess import resolve_critic
    from gcr.errors import UsageError
    from gcr.view import err

    with handled():
        if engine not in engines.ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(engines.ENGINES)}, not {engine!r}.")
        home = _home(runs_dir)
        model = resolve_critic(critic, task=task).location
        state, _ = engines.find_running(home, model, task, max_new_tokens)
        if state is None:
            with nullcontext() if quiet else err.status("starting the critic engine") as status:
                state = engines.start_engine(
                    engine=engine, spec=critic, task=task, home=home, device=device, dtype=dtype,
                    max_new_tokens=max_new_tokens, allow_remote_code=allow_remote_code, vllm_bin=vllm_bin,
                    ready_timeout=timeout, detach=True, longer="--timeout SECONDS",
                    log=(lambda msg: status.update(Text(msg))) if status else (lambda msg: None))
            verb = "started"
        else:
            verb = "already running"
        if json_out:
            print(dumps(_public(state)))
        else:
            err.print(Text(f"{verb}: the {state['engine']} critic engine for {state['critic']} at {state['url']} "
                           f"(pid {state['pid']}; log: {state['log']}). refine and batch use it; stop it with "
                           "gcr critic stop."))


@app.command()
def status(runs_dir: RunsDir = None, json_out: JsonOut = False):
    """List the critic engines under the runs directory and check that each answers."""
    from rich.table import Table
    from rich.text import Text

    from gcr.critics import engine as engines
    from gcr.view import err, out

    with handled():
        running, gone = engines.list_engines(_home(runs_dir))
        if json_out:
            print(dumps([_public(s) for s in running]))
            return
        for state in gone:
            err.print(Text(f"removed the record of the {state['engine']} critic engine for {state['critic']} "
                           f"(pid {state['pid']}): it is no longer running."))
        if not running:
            err.print("no critic engine is running.")
            return
        table = Table(expand=False)
        for column in ("engine", "critic", "task", "url", "pid", "state"):
            table.add_column(column, overflow="fold")
        for s in running:
            state = "ready" if s["answers"] else "not answering"
            if s.get("owner") is not None:
                state += f" (used by gcr pid {s['owner']})"
            table.add_row(*(Text(str(v)) for v in (s["engine"], s["critic"], s.get("task"), s["url"], s["pid"],
                                                   state)))
        out.print(table)


@app.command()
def stop(critic: Critic = None, task: Task = "t2i", runs_dir: RunsDir = None):
    """Stop the critic engines started by `gcr critic start` (only the one for --critic, if given)."""
    from rich.text import Text

    from gcr.critics import engine as engines
    from gcr.critics.inprocess import resolve_critic
    from gcr.view import err

    with handled():
        model = resolve_critic(critic, task=task).location if critic else None
        running, _ = engines.list_engines(_home(runs_dir))
        chosen = [s for s in running if s.get("owner") is None and (model is None or s["model"] == model)]
        if not chosen:
            err.print("no critic engine started by gcr critic start is running"
                      + (" for that critic." if critic else "."))
            return
        for state in chosen:
            engines.stop_engine(state)
            err.print(Text(f"stopped the {state['engine']} critic engine for {state['critic']} (pid {state['pid']})."))


def _home(runs_dir):
    from gcr.store import default_runs_dir

    return runs_dir or default_runs_dir()


def _public(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "server"}

