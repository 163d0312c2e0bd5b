"""What a person sees: the round table, the runs list, and progress while models work.

Results go to stdout; status and progress go to stderr, so `gcr refine ... --json > out.json` and
pipes stay clean.

Text is data. Anything that came from a person, a file, a model or the store reaches the terminal as
a `rich.text.Text` built by `text()`, never as a string Rich would read as markup (`[/]` in a prompt
would crash the print, `[link=...]` would forge a link, `:warning:` would become an emoji), and with
terminal control characters shown as escapes (`\x1b`, `\r`), so a critique cannot recolour, move the
cursor or rewrite what is on screen. Markup appears only in gcr's own literals. The stored text stays
verbatim; only what is printed is neutralized.
"""
from __future__ import annotations

import difflib
import re
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
# C0 controls except tab and newline, DEL, C1 controls, bidi overrides and isolates (they reorder what
# is shown), and lone surrogates (they cannot be encoded: printing one would crash).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\r": "\\r", "\x1b": "\\x1b"}


def terminal_safe(value) -> str:
    """`value` as a string that is safe to show on a terminal: control characters become visible
    escapes (ESC -> `\\x1b`, CR -> `\\r`); tabs, newlines and all printable text are kept."""
    s = value if isinstance(value, str) else str(value)
    s = s.replace("\r\n", "\n")
    return _UNSAFE.sub(_escape_char, s) if _UNSAFE.search(s) else s


def _escape_char(m) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def text(value, style: str = "") -> Text:
    """Untrusted text (user, file, model, store) as a Rich Text: printed literally, never as markup."""
    return Text(terminal_safe("" if value is None else value), style=style)


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
    current = terminal_safe(current)
    previous = None if previous is None else terminal_safe(previous)
    if previous is None or previous == current:
        return Text(current, style="dim" if previous == current else "")
    old, new = previous.split(), current.split()
    diff = Text()
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if j1 == j2:
            continue
        chunk = " ".join(new[j1:j2])
        diff.append(chunk, style="bold green" if op != "equal" else "")
        diff.append(" ")
    diff.rstrip()
    return diff


def _score(v) -> Text:
    if v is None:
        return Text("N/A")
    return Text(f"{v:.2f}") if isinstance(v, (int, float)) else text(v)  # a damaged store still prints


INCOMPLETE_NOTE = ("* incomplete critique: an expected dimension was not judged, so the round cannot "
                   "meet the target or beat a complete one")


def rounds_table(run: Run) -> Table:
    dims = [d for d in DIMENSION_LABELS if any(d in r.scores for r in run.rounds)]
    table = Table(title=text(run.request, style="bold"), title_justify="left", expand=False)
    table.add_column("#", justify="right")
    table.add_column("prompt", ratio=1, overflow="fold", min_width=24)
    for d in dims:
        table.add_column(DIMENSION_LABELS[d], justify="right")
    table.add_column("overall", justify="right")
    table.add_column("Δ best", justify="right")
    table.add_column("time", justify="right")

    best_so_far, previous, incomplete = None, None, False
    for r in run.rounds:
        mark = "★" if r.index == run.best_round else ""
        if r.error:
            cells = [Text("—")] * len(dims) + [Text("—"), Text(""), Text("")]
            prompt = text(f"{r.prompt}\n", style="dim").append_text(text(r.error, style="red"))
        else:
            overall = r.overall if isinstance(r.overall, (int, float)) else None
            delta = Text("")
            if overall is not None and best_so_far is not None:
                d = overall - best_so_far
                delta = Text(f"+{d:.2f}", "green") if d > 0 else Text(f"{d:.2f}", "red") if d < 0 else Text("±0")
            cells = [_score(r.scores[d]) if d in r.scores else Text("—") for d in dims]
            if overall is None:
                cells.append(Text("unscored", style="red"))
            elif not r.complete:
                cells.append(Text(f"{overall:.2f}*", style="yellow"))
                incomplete = True
            else:
                cells.append(Text(f"{overall:.2f}", style="bold"))
            total = r.timings.get("total_s", 0)
            cells += [delta, Text(f"{total:.1f}s" if isinstance(total, (int, float)) else "")]
            prompt = prompt_diff(previous, r.prompt)
            if overall is not None:
                best_so_far = overall if best_so_far is None else max(best_so_far, overall)
        table.add_row(text(f"{mark}{r.index}"), prompt, *cells, style="on grey11" if mark else "")
        previous = r.prompt
    if incomplete:
        table.caption, table.caption_justify = Text(INCOMPLETE_NOTE, style="yellow"), "left"
    return table


def print_run(run: Run, console: Console = out) -> None:
    console.print(rounds_table(run))
    reason = run.stop_reason
    if run.status == "running":
        who = f" in process {run.owner['pid']} on {run.owner['host']}" if run.owner else ""
        console.print(text(f"status: running{who} ({len(run.rounds)} rounds stored so far)", style="yellow"))
    else:
        console.print(Text.assemble("stopped: ", text(reason or run.status, style="bold"), " — ",
                                    text(STOP_EXPLAINED.get(reason, run.status))))
    if run.error:
        console.print(Text.assemble(("error:", "red"), " ", text(run.error)))
    if run.status in ("interrupted", "failed"):
        console.print(text(f"continue it with: gcr resume {run.id}"))
    if run.best_round:
        best = run.best
        overall = f"overall {run.best_overall:.2f}" if best and best.overall is not None else "unscored"
        complete = "" if best is None or best.complete else ", incomplete critique"
        console.print(f"best round: {run.best_round} ({overall}{complete})", markup=False, highlight=False)
    elif run.rounds:
        console.print(Text.assemble(("no round could be scored", "yellow"), ": see the raw critiques with "
                                    "`gcr show ", text(run.id), " --json`"))
    if run.final_image:
        console.print(Text.assemble("final image: ", text(run.final_image, style="bold")))


def runs_table(rows: Sequence[dict]) -> Table:
    table = Table(expand=False)
    for col in ("id", "created", "status", "rounds", "best", "request"):
        table.add_column(col, justify="right" if col in ("rounds", "best") else "left",
                         overflow="fold" if col == "request" else "ellipsis", no_wrap=col != "request",
                         min_width=16 if col == "request" else None)
    for r in rows:
        best = f"{r['best_overall']:.2f}" if isinstance(r["best_overall"], (int, float)) else "—"
        table.add_row(text(r["id"]), text(str(r["created"] or "")[5:16].replace("T", " ")), text(r["status"]),
                      text(r["n_rounds"]), Text(best), text(r["request"]))
    return table


class Progress:
    """Rich progress on stderr: round k of N, the stage, elapsed time. Used as the loop's stage hook."""

    def __init__(self, total_rounds: int, console: Console = err, enabled: bool = True):
        from rich.progress import Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.total = total_rounds
        # markup=False: descriptions carry model paths and other user text, printed literally.
        self.bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                                console=console, transient=True, disable=not enabled)
        self.task = None
        self.jobs = None
        self.workers: dict = {}   # a batch on Ray: one line per worker

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("loading models", total=None)
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, message: str) -> None:
        """A plain-text status line (what loads, what runs): shown literally."""
        self.bar.update(self.task, description=terminal_safe(message))

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

    def worker(self, name: str, status: str) -> None:
        """A batch on Ray: one line per worker (its process, jobs and stage), shown literally."""
        line = terminal_safe(f"{name} · {status}")
        if name in self.workers:
            self.bar.update(self.workers[name], description=line)
        else:
            self.workers[name] = self.bar.add_task(line, total=None)

    def stage(self, round_index: int, stage: str, n_jobs: int) -> None:
        jobs = f" · {n_jobs} jobs" if n_jobs > 1 else ""
        self.update(f"round {round_index}/{self.total} · {stage}{jobs}")

    def log(self, message) -> None:
        """A line above the progress bar: a Rich Text as built (see `text()`), or plain text, shown
        literally (library code logs plain text and never markup)."""
        if not self.bar.disable:
            self.bar.console.print(message if isinstance(message, Text) else text(message))
