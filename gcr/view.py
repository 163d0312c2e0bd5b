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
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .records import Run
from .tables import Column, FitTable

class LiveConsole(Console):
    """A Console that reads the terminal's size (and $COLUMNS) each time it prints, not once when it
    is made: these module-level consoles outlive a single command (tests, library use)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if kwargs.get("width") is None:
            self._width = None
        if kwargs.get("height") is None:
            self._height = None


out = LiveConsole()                  # results
err = LiveConsole(stderr=True)       # status, progress, errors

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
    "converged": "the critic proposed a prompt already run with these seeds",
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


def rounds_table(run: Run) -> FitTable:
    """One row per round; the prompt wraps first, so scores and times always show whole."""
    dims = [d for d in DIMENSION_LABELS if any(d in r.scores for r in run.rounds)]
    judged = any(r.judge is not None for r in run.rounds)  # the independent judge's column (gcr.judge)
    columns = [Column("#", "right"), Column("prompt", free=True, min_width=16),
               *(Column(DIMENSION_LABELS[d], "right") for d in dims),
               Column("overall", "right"), Column("Δ best", "right"), *([Column("judge", "right")] if judged else []),
               Column("time", "right")]
    table = FitTable(columns, title=text(run.request, style="bold"))

    best_so_far, previous, incomplete = None, None, False
    for r in run.rounds:
        mark = "★" if r.index == run.best_round else ""
        judge = [_judge_cell(r.judge)] if judged else []
        if r.error:
            cells = [Text("—")] * len(dims) + [Text("—"), Text(""), *judge, Text("")]
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
            cells += [delta, *judge, Text(f"{total:.1f}s" if isinstance(total, (int, float)) else "")]
            prompt = prompt_diff(previous, r.prompt)
            if overall is not None:
                best_so_far = overall if best_so_far is None else max(best_so_far, overall)
        table.add_row(text(f"{mark}{r.index}"), prompt, *cells, style="on grey11" if mark else "")
        previous = r.prompt
    caption = trend_line(run)
    if incomplete:
        caption.append("\n").append(INCOMPLETE_NOTE, style="yellow")
    if judged:
        from .judge import DISAGREE_NOTE, judge_name

        caption.append("\n").append_text(text(f"judge: {judge_name(run) or 'unnamed'} (reported, never optimized)",
                                               style="dim"))
        if _disagrees(run):
            caption.append("\n").append(DISAGREE_NOTE, style="yellow")
    table.caption = caption
    return table


def _disagrees(run: Run) -> bool:
    """The critic's overall rose from round 1 to the best round while the judge's score fell."""
    from .decide import best_round
    from .judge import disagree

    index = run.best_round if run.best_round is not None else best_round(run.rounds)
    first = next((r for r in run.rounds if r.index == 1), None)
    best = next((r for r in run.rounds if r.index == index), None)
    if first is None or best is None or first.overall is None or best.overall is None:
        return False
    return bool(disagree(round(best.overall - first.overall, 6), first.judge, best.judge))


def _judge_cell(v) -> Text:
    return Text("—") if not isinstance(v, (int, float)) else Text(f"{v:.3f}")


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence) -> Text:
    """One character per round: the overall on the 1-4 scale as a bar height; · unscored, × failed."""
    out = Text()
    for v in values:
        if v == "error":
            out.append("×", style="red")
        elif not isinstance(v, (int, float)):
            out.append("·", style="dim")
        else:
            level = round((min(max(v, 1.0), 4.0) - 1.0) / 3.0 * (len(SPARKS) - 1))
            out.append(SPARKS[level], style="green")
    return out


def trend_line(run: Run) -> Text:
    """The overall round by round at a glance: `trend ▂▄▇ 2.10 → 3.40 (best: round 3)`."""
    values = ["error" if r.error else r.overall for r in run.rounds]
    line = Text("trend ", style="dim").append_text(sparkline(values))
    scored = [v for v in values if isinstance(v, (int, float))]
    if scored:
        line.append(f"  {scored[0]:.2f} → {scored[-1]:.2f}")
        if run.best_round is not None:
            line.append(f" (best: round {run.best_round})", style="dim")
    return line


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
        console.print(Text.assemble(("no round could be scored", "yellow"), ": read what the critic wrote "
                                    "with `gcr show ", text(run.id), " --round 1`"))
    if run.final_image:
        console.print(Text.assemble("final image: ", text(run.final_image, style="bold")))


def runs_table(rows: Sequence[dict]) -> FitTable:
    """Recent runs. `overall` is the best round's overall, as in `gcr compare`; the request wraps or
    moves below its row, so ids, statuses and scores always show whole (gcr.tables)."""
    table = FitTable([Column("id"), Column("status"), Column("rounds", "right"), Column("overall", "right"),
                      Column("request", free=True, min_width=12)])
    for r in rows:
        best = f"{r['best_overall']:.2f}" if isinstance(r["best_overall"], (int, float)) else "—"
        table.add_row(text(r["id"]), text(r["status"]), text(r["n_rounds"]), Text(best), text(r["request"]))
    return table


# What the critic calls each dimension (its own headings), for reading a critique as text.
DIMENSION_NAMES = {
    "text_faithfulness": "Text faithfulness",
    "image_faithfulness": "Image faithfulness",
    "physical_quality": "Physical and visual quality",
    "text_rendering": "Text rendering",
}
RAW_SHOWN = 4000  # characters of an unreadable critique shown as text; --json has all of it


def pick_critique(run: Run, index: int, candidate: int | None = None):
    """(round, 0-based candidate) for `gcr show --round K [--candidate N]`; N is 1-based and None
    means the round's chosen candidate. A round or candidate that does not exist is a UsageError."""
    from .errors import UsageError

    if not run.rounds:
        raise UsageError(f"Run {run.id} has no rounds yet: there is no critique to show.")
    r = next((x for x in run.rounds if x.index == index), None)
    if r is None:
        raise UsageError(f"Run {run.id} has rounds {run.rounds[0].index} to {run.rounds[-1].index}: pick "
                         "--round in that range.")
    n = len(r.candidates)
    if candidate is not None and not n:
        raise UsageError(f"Round {index} of run {run.id} failed before it made an image: leave --candidate out.")
    if candidate is not None and not 1 <= candidate <= n:
        raise UsageError(f"Round {index} of run {run.id} has {n} candidate{'s' if n != 1 else ''}: pick "
                         f"--candidate between 1 and {n}.")
    return r, (r.chosen if candidate is None else candidate - 1)


def print_critique(run: Run, index: int, candidate: int | None = None, console: Console = out) -> None:
    """One round's critique as text: every dimension with its score and justification, the summary,
    the refinement comments, the refined request, what the parser could not read, and the other
    candidates (see `pick_critique` for `candidate`)."""
    from .records import DIMENSIONS

    r, pick = pick_critique(run, index, candidate)
    n = len(r.candidates)
    c = r.candidates[pick] if r.candidates else None

    head = Text.assemble("run ", text(run.id, style="bold"), f" · round {r.index} of {len(run.rounds)}")
    if n > 1:
        head.append(f" · candidate {pick + 1} of {n}" + (" (the round's result)" if pick == r.chosen else ""))
    if c is not None:
        head.append(f" · seed {c.seed}")
    console.print(head)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("request", text(run.request))
    facts.add_row("prompt", text(r.prompt))
    if c is not None and c.image:
        facts.add_row("image", text(c.image))
    console.print(facts)
    if r.error:
        console.print(Text.assemble(("round failed: ", "bold red"), text(r.error)))
    if c is None:
        return

    if c.overall is None:
        console.print(Text("unscored: the critique could not be read", style="bold red"))
    else:
        done = "complete" if c.complete else f"incomplete: {', '.join(c.missing)} not judged"
        console.print(Text.assemble(("overall ", "bold"), (f"{c.overall:.2f}", "bold"), f" ({done})"))
    if c.judge is not None:
        from .judge import judge_name

        console.print(Text.assemble(("judge ", "bold"), f"{c.judge:.3f}", " (",
                                    text(judge_name(run) or "independent judge"), ": reported, never optimized)"))
    dims = [*DIMENSIONS.get(run.task, DIMENSION_NAMES), *[d for d in c.scores if d not in DIMENSIONS.get(
        run.task, DIMENSION_NAMES)]]
    for d in dims:
        if d in c.scores:
            score = _score(c.scores[d])
        else:
            score = Text("not judged", style="yellow")
        console.print(Text.assemble("\n", (DIMENSION_NAMES.get(d, d), "bold"), "  ", score))
        if c.justifications.get(d):
            console.print(_indented(c.justifications[d]))
    comments = c.refinement_comments or _reparsed_comments(c.raw_critique, run.task)
    for title, body in (("Summary", c.summary), ("Refinement comments", comments),
                        ("Refined request", c.refined_request)):
        if body:
            console.print(Text.assemble("\n", (title, "bold")))
            console.print(_indented(body))
    if pick == r.chosen and r.rewrite_note:
        console.print(Text.assemble("\n", ("next prompt: ", "bold"), text(r.rewrite_note)))
    if c.problems:
        console.print(Text.assemble("\n", ("What the parser could not read", "bold yellow")))
        for p in c.problems:
            console.print(Text("  - ").append_text(text(p)))
    if c.overall is None and c.raw_critique:
        raw = c.raw_critique[:RAW_SHOWN]
        console.print(Text.assemble("\n", ("The critic wrote", "bold")))
        console.print(_indented(raw))
        if len(c.raw_critique) > RAW_SHOWN:
            console.print(f"  ({len(c.raw_critique) - RAW_SHOWN:,} more characters: gcr show {run.id} --json)",
                          markup=False, highlight=False)
    others = [i for i in range(n) if i != pick]
    if others:
        listed = ", ".join(f"{i + 1} (seed {r.candidates[i].seed}, "
                           f"{'unscored' if r.candidates[i].overall is None else f'{r.candidates[i].overall:.2f}'})"
                           for i in others)
        console.print(Text.assemble("\n", ("other candidates: ", "bold"), listed,
                                    "; read one with --candidate N"))


def _indented(body: str) -> Padding:
    return Padding(text(body.strip()), (0, 0, 0, 2), expand=False)


def _reparsed_comments(raw: str, task: str) -> str:
    """Runs stored before candidates kept the refinement comments: read them from the raw text."""
    from .parse import parse_critique

    return parse_critique(raw, task).refinement_comments if raw else ""


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

    def start_jobs(self, total: int, done: int = 0, noun: str = "jobs") -> None:
        """Batch mode: an overall line of jobs (or images, for `gcr score`) done, with an ETA from the
        ones finished so far."""
        import time

        self.noun = noun
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
        return f"{getattr(self, 'noun', 'jobs')} {self.jobs_done}/{self.jobs_total}{eta}"

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
