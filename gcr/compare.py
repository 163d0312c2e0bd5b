"""`gcr compare`: one row per run, so many runs (or a whole batch) can be read side by side.

Rows are plain dicts of str/int/float/bool/None, in a fixed column order, so the same rows feed the
Rich table, `--json` and the HTML report. Every run gets every dimension column (None where the run's
task has no such dimension, or the critic said N/A): scripts then see one stable shape.

With an independent judge (gcr.judge), a row also has the judge's score at round 1 and at the best
round, and `disagree`: True when the critic's overall went up from round 1 to the best round while
the judge's score went down ("critic and judge disagree": refinement pleased the critic, not the
judge, which is what reward hacking looks like from outside). None when either is unknown.
"""
from __future__ import annotations

from typing import Sequence

from rich.text import Text

from .decide import best_round
from .errors import UsageError
from .judge import DISAGREE_NOTE, disagree, judge_name
from .records import Run
from .tables import Column, FitTable
from .view import text

DIMENSION_COLUMNS = ("text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering")

# Column key -> header shown in the table. Order here is the row and table order.
COLUMNS = {
    "id": "run",
    "job": "job",
    "request": "request",
    "status": "status",
    "rounds": "rounds",
    "best_round": "best round",   # the round number of the best round
    "best_overall": "overall",
    "text_faithfulness": "Text",
    "image_faithfulness": "Image",
    "physical_quality": "Quality",
    "text_rendering": "Rendering",
    "gain": "gain",
    "judge": "judge",             # which independent judge (gcr.judge) scored the run, if any
    "judge_first": "judge r1",    # the judge's score of round 1
    "judge_best": "judge best",   # the judge's score of the best round (chosen by the critic)
    "disagree": "disagree",       # critic up, judge down (DISAGREE_NOTE)
    "stop_reason": "stop",
    "time_s": "time",
}
_NUMERIC = {"rounds", "best_round", "best_overall", "gain", "time_s", "judge_first", "judge_best",
            *DIMENSION_COLUMNS}
JUDGE_COLUMNS = ("judge_first", "judge_best", "disagree")


def compare_row(run: Run) -> dict:
    """The row of one run. Best round = the stored one, or the best scored round of an unfinished run."""
    best_index = run.best_round if run.best_round is not None else best_round(run.rounds)
    best = next((r for r in run.rounds if r.index == best_index), None)
    first = next((r for r in run.rounds if r.index == 1), None)
    best_overall = best.overall if best else None
    first_overall = first.overall if first else None
    scores = best.scores if best else {}
    gain = None
    if best_overall is not None and first_overall is not None:
        gain = round(best_overall - first_overall, 6)  # 6 places: no 0.30000000000000004 in JSON
    job = run.settings.get("job_id") if isinstance(run.settings, dict) else None
    judge_first, judge_best = (_num(first.judge) if first else None), (_num(best.judge) if best else None)
    row = {
        "id": run.id,
        "job": None if job is None else str(job),
        "request": run.request,
        "status": run.status,
        "rounds": len(run.rounds),
        "best_round": best.index if best else None,
        "best_overall": _num(best_overall),
        **{d: _num(scores.get(d)) for d in DIMENSION_COLUMNS},
        "gain": gain,
        "judge": judge_name(run),
        "judge_first": judge_first,
        "judge_best": judge_best,
        "disagree": disagree(gain, judge_first, judge_best),
        "stop_reason": run.stop_reason,
        "time_s": round(sum(_num(r.timings.get("total_s")) or 0.0 for r in run.rounds), 3),
    }
    return row


def compare_rows(runs: Sequence[Run]) -> list[dict]:
    """One JSON-ready row per run, in the order given."""
    return [compare_row(run) for run in runs]


def sort_rows(rows: Sequence[dict], key: str, descending: bool = False) -> list[dict]:
    """Rows sorted by a column key (or its table header, any case). Missing values always sort last."""
    column = resolve_column(key)
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    if column in _NUMERIC:
        present.sort(key=lambda r: r[column], reverse=descending)
    else:
        present.sort(key=lambda r: str(r[column]).casefold(), reverse=descending)
    return present + missing  # sort() is stable: ties keep the given order


def resolve_column(key: str) -> str:
    wanted = key.strip().casefold().replace("-", "_")
    for column, header in COLUMNS.items():
        if wanted in (column, header.casefold()):
            return column
    valid = ", ".join(COLUMNS)
    raise UsageError(f"Cannot sort by '{key}': use one of {valid}.")


def _num(v):
    return None if v is None else float(v)


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def compare_table(rows: Sequence[dict]) -> FitTable:
    """The rows as a table that fits the terminal. User text goes in as Text objects, so `[red]` in a prompt stays literal."""
    show_job = any(r.get("job") is not None for r in rows)
    dims = [d for d in DIMENSION_COLUMNS if any(r.get(d) is not None for r in rows)]
    # Batch rows are named by their job ids; the long run ids stay in --json and `gcr show BATCH --json`.
    judged = [c for c in JUDGE_COLUMNS if any(r.get("judge_first") is not None or r.get("judge_best") is not None
                                              for r in rows)]
    columns = [*(["job"] if show_job else ["id"]), "request", "status", "rounds", "best_round",
               "best_overall", *dims, "gain", *judged, "stop_reason", "time_s"]
    # The request wraps or moves below its row; ids, numbers, statuses and stop reasons are never cut
    # (gcr.tables). Two-word headers stack, to keep their columns narrow.
    table = FitTable([Column(COLUMNS[c].replace(" ", "\n"), "right" if c in _NUMERIC else "left",
                             free=c == "request") for c in columns])
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if c == "best_overall":
                cells.append(Text(_fmt(v), style="bold" if v is not None else "dim"))
            elif c == "gain":
                style = "green" if v and v > 0 else "red" if v and v < 0 else ""
                cells.append(Text("—" if v is None else f"{v:+.2f}" if v else "±0", style=style))
            elif c == "time_s":
                cells.append(Text(f"{v:.1f}s"))
            elif c in ("judge_first", "judge_best"):
                cells.append(Text(_fmt(v, 3)))
            elif c == "disagree":
                cells.append(Text("!" if v else "—" if v is None else "", style="bold yellow" if v else "dim"))
            elif c in ("rounds", "best_round"):
                cells.append(Text("—" if v is None else str(v)))
            elif c in DIMENSION_COLUMNS:
                cells.append(Text(_fmt(v)))
            elif c == "job" and v is None:
                cells.append(text(r["id"], style="dim"))  # a run outside any batch: its id
            else:
                cells.append(Text("—") if v is None else text(v))
        table.add_row(*cells)
    if any(r.get("disagree") for r in rows):
        table.caption = Text(DISAGREE_NOTE, style="yellow")
    return table
