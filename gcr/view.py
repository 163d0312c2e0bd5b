"""What a person sees: the round table, the runs list, and progress while models work.

Results go to stdout; status and progress go to stderr, so `gcr refine ... --json > out.json` and
pipes stay clean.
"""
from __future__ import annotations

import difflib
from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .records import Run

out = Console()                      # results
err = Console(stderr=True)           # status, progress, errors

DIMENSION_LABELS = {
    "text_faithfulness": "Text",
    "image_faithfulness": "Image",
    "physical_quality": "Quality",
    "text_rendering": "Rendering",
}
STOP_EXPLAINED = {
    "target": "every applicable score reached the target",
    "max_rounds": "the round limit was reached",
    "plateau": "scores stopped improving",
    "time_budget": "the time budget was spent",
    "error": "a round failed",
    None: "did not finish",
}


def prompt_diff(previous: str | None, current: str) -> Text:
    """The prompt with words new since the previous round highlighted."""
    if previous is None or previous == current:
        return Text(current, style="dim" if previous == current else "")
    old, new = previous.split(), current.split()
    text = Text()
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if j1 == j2:
            continue
        chunk = " ".join(new[j1:j2])
        text.append(chunk, style="bold green" if op != "equal" else "")
        text.append(" ")
    text.rstrip()
    return text


def _score(v) -> str:
    return "N/A" if v is None else f"{v:.2f}"


def rounds_table(run: Run) -> Table:
    dims = [d for d in DIMENSION_LABELS if any(d in r.scores for r in run.rounds)]
    table = Table(title=f"[bold]{run.request}[/]", title_justify="left", expand=False)
    table.add_column("#", justify="right")
    table.add_column("prompt", ratio=1, overflow="fold", min_width=24)
    for d in dims:
        table.add_column(DIMENSION_LABELS[d], justify="right")
    table.add_column("overall", justify="right")
    table.add_column("Δ best", justify="right")
    table.add_column("time", justify="right")

    best_so_far, previous = None, None
    for r in run.rounds:
        mark = "★" if r.index == run.best_round else ""
        if r.error:
            cells = ["—"] * len(dims) + ["—", "", ""]
            prompt = Text(f"{r.prompt}\n", style="dim").append(r.error, style="red")
        else:
            overall = r.overall
            delta = ""
            if overall is not None and best_so_far is not None:
                d = overall - best_so_far
                delta = f"[green]+{d:.2f}[/]" if d > 0 else f"[red]{d:.2f}[/]" if d < 0 else "±0"
            cells = [_score(r.scores[d]) if d in r.scores else "—" for d in dims]
            cells += [f"[bold]{overall:.2f}[/]" if overall is not None else "[red]unscored[/]", delta,
                      f"{r.timings.get('total_s', 0):.1f}s"]
            prompt = prompt_diff(previous, r.prompt)
            if overall is not None:
                best_so_far = overall if best_so_far is None else max(best_so_far, overall)
        table.add_row(f"{mark}{r.index}", prompt, *cells, style="on grey11" if mark else "")
        previous = r.prompt
    return table


def print_run(run: Run, console: Console = out) -> None:
    console.print(rounds_table(run))
    reason = run.stop_reason
    if run.status == "running":
        who = f" in process {run.owner['pid']} on {run.owner['host']}" if run.owner else ""
        console.print(Text(f"status: running{who} ({len(run.rounds)} rounds stored so far)", style="yellow"))
    else:
        console.print(f"stopped: [bold]{reason or run.status}[/] — {STOP_EXPLAINED.get(reason, run.status)}")
    if run.error:
        console.print(Text("error: ", style="red").append(run.error, style=""))
    if run.status in ("interrupted", "failed"):
        console.print(Text(f"continue it with: gcr resume {run.id}"))
    if run.best_round:
        console.print(f"best round: {run.best_round} (overall {run.best_overall:.2f})")
    elif run.rounds:
        console.print("[yellow]no round could be scored[/]: see the raw critiques with `gcr show "
                      f"{run.id} --json`")
    if run.final_image:
        console.print(f"final image: [bold]{run.final_image}[/]")


def runs_table(rows: Sequence[dict]) -> Table:
    table = Table(expand=False)
    for col in ("id", "created", "status", "rounds", "best", "request"):
        table.add_column(col, justify="right" if col in ("rounds", "best") else "left",
                         overflow="fold" if col == "request" else "ellipsis", no_wrap=col != "request",
                         min_width=16 if col == "request" else None)
    for r in rows:
        best = f"{r['best_overall']:.2f}" if r["best_overall"] is not None else "—"
        table.add_row(r["id"], r["created"][5:16].replace("T", " "), r["status"],
                      str(r["n_rounds"]), best, r["request"])
    return table


class Progress:
    """Rich progress on stderr: round k of N, the stage, elapsed time. Used as the loop's stage hook."""

    def __init__(self, total_rounds: int, console: Console = err, enabled: bool = True):
        from rich.progress import Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.total = total_rounds
        self.bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                console=console, transient=True, disable=not enabled)
        self.task = None
        self.jobs = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("loading models", total=None)
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, text: str) -> None:
        self.bar.update(self.task, description=text)

    def start_jobs(self, total: int, done: int = 0) -> None:
        """Batch mode: an overall line of jobs done, with an ETA from the jobs finished so far."""
        import time

        self.jobs_total, self.jobs_done, self.jobs_started = total, done, (time.monotonic(), done)
        self.jobs = self.bar.add_task(self._jobs_text(), total=None)

    def job_finished(self) -> None:
        if self.jobs is not None:
            self.jobs_done += 1
            self.bar.update(self.jobs, description=self._jobs_text())

    def _jobs_text(self) -> str:
        import time

        t0, done0 = self.jobs_started
        finished_here = self.jobs_done - done0
        eta = ""
        if finished_here:
            left = (time.monotonic() - t0) / finished_here * (self.jobs_total - self.jobs_done)
            eta = f" · ETA {int(left // 60)}m{int(left % 60):02d}s"
        return f"jobs {self.jobs_done}/{self.jobs_total}{eta}"

    def stage(self, round_index: int, stage: str, n_jobs: int) -> None:
        jobs = f" · {n_jobs} jobs" if n_jobs > 1 else ""
        self.update(f"round {round_index}/{self.total} · {stage}{jobs}")

    def log(self, message: str) -> None:
        if not self.bar.disable:
            self.bar.console.print(message)
