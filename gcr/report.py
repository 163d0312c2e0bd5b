"""`gcr report`: one self-contained HTML page per run or batch, plus a contact-sheet PNG per run.

Self-contained means it opens from disk with no network: CSS is inline, there is no JavaScript
(collapsing uses <details>), no external fonts, and images are either
- referenced by RELATIVE paths from the report's folder to the PNGs already in the run store
  (the default: the report stays a few KB however many rounds there are, and the store is not
  duplicated; move the report folder and the runs dir together, e.g. keep it under the runs dir), or
- embedded as base64 data URIs (`embed=True`): one file to mail or attach, several MB per run.
Contact sheets are written next to the report as contact-<run-id>.png and linked from it.

Everything that came from a person or a model (requests, prompts, critiques, errors, ids) is passed
through html.escape(quote=True) before it reaches the page, and a Content-Security-Policy that
allows no scripts at all backs that up: a critique that says `<script>` must show `<script>`.
"""
from __future__ import annotations

import base64
import difflib
import html
import os
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from .compare import COLUMNS, DIMENSION_COLUMNS, JUDGE_COLUMNS, compare_rows
from .judge import DISAGREE, DISAGREE_NOTE, judge_name
from .parse import DIMENSIONS
from .records import Run, Round
from .view import DIMENSION_LABELS, STOP_EXPLAINED

REPORT_NAME = "index.html"

# Contact sheet geometry (pixels). Tests rely on these.
TILE_HEIGHT = 256      # every image is scaled to this height, keeping its aspect ratio
GAP = 8                # space around and between tiles; the best round's outline is drawn in it
OUTLINE = 4            # outline width of the best round
BEST_COLOUR = (22, 163, 74)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FONT_SIZE = 13
PROMPT_LINES = 2       # each round's prompt, shortened to this many lines under its tile


def e(value) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def safe_name(run_id: str) -> str:
    """A run id made safe for file names and HTML ids (store ids already are; imported ones may not be)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id) or "run"


def contact_name(run: Run) -> str:
    return f"contact-{safe_name(run.id)}.png"


# -- HTML -------------------------------------------------------------------------------------


def write_report(runs: Sequence[Run], out_dir: Path, title: str, batch: dict | None = None,
                 embed: bool = False, sheets: bool = True) -> Path:
    """Write out_dir/index.html (and contact-<run-id>.png per run unless sheets=False); return the HTML path.

    `batch` is the batch record (id, file, status, jobs: [{id, run_id, status, error}]): it adds a
    batch summary, lists jobs that failed (also those that never got a run) and names jobs in the table.
    The compare table is shown when there is a batch or more than one run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for run in runs:
        if sheets and run.rounds:
            written[run.id] = contact_sheet(run, out_dir / contact_name(run)).name
    images = _ImageRefs(out_dir, embed)
    parts = [_HEAD.format(title=e(title), css=_CSS), f"<header><h1>{e(title)}</h1>"]
    parts.append(f'<p class="meta">{len(runs)} run{"s" if len(runs) != 1 else ""}'
                 f'{" · images embedded" if embed else ""}</p></header>')
    if batch:
        parts.append(_batch_html(batch, runs))
    if len(runs) > 1 or batch:
        parts.append(_compare_html(runs, batch))
    parts.extend(_run_html(run, images, written.get(run.id)) for run in runs)
    parts.append("</body></html>\n")
    path = out_dir / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


class _ImageRefs:
    """Turns image paths into `src` values: relative URLs, or data URIs when embedding."""

    def __init__(self, out_dir: Path, embed: bool):
        self.out_dir, self.embed = out_dir.resolve(), embed

    def src(self, image: str | None) -> str | None:
        """None when the file is missing: the page then says so instead of showing a broken image."""
        if not image or not Path(image).is_file():
            return None
        path = Path(image).resolve()
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        try:
            rel = os.path.relpath(path, self.out_dir)
        except ValueError:  # another drive on Windows: no relative path exists, so embed this one
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return quote(Path(rel).as_posix())  # '#', '?', spaces in folder names must not break the URL

    def img(self, image: str | None, alt: str) -> str:
        src = self.src(image)
        if src is None:
            return f'<div class="missing">image not found<br><code>{e(image or "none")}</code></div>'
        return f'<img src="{e(src)}" alt="{e(alt)}">'


def _batch_html(batch: dict, runs: Sequence[Run] = ()) -> str:
    jobs = batch.get("jobs") or []
    counts = {}
    for job in jobs:
        counts[job.get("status")] = counts.get(job.get("status"), 0) + 1
    summary = ", ".join(f"{n} {e(status)}" for status, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
    out = ['<section class="batch"><h2>Batch</h2><dl class="facts">',
           f"<dt>id</dt><dd><code>{e(batch.get('id'))}</code></dd>"]
    if batch.get("file"):
        out.append(f"<dt>file</dt><dd><code>{e(batch.get('file'))}</code></dd>")
    out.append(f"<dt>status</dt><dd>{e(batch.get('status'))}</dd>")
    out.append(f"<dt>jobs</dt><dd>{len(jobs)}{' (' + summary + ')' if summary else ''}</dd></dl>")
    gains = [(j.get("id"), row["gain"], row["best_round"]) for j in jobs for row in compare_rows(
        [r for r in runs if r.id == j.get("run_id")])]
    if gains:
        out.append("<h3>Gain from round 1 to the best round</h3>" + gain_chart(gains))
    failed = [j for j in jobs if j.get("error")]
    if failed:
        out.append('<h3>Failed jobs</h3><ul class="failed">')
        for j in failed:
            link = (f' · <a href="#run-{e(safe_name(j["run_id"]))}">run</a>' if j.get("run_id") else "")
            out.append(f"<li><code>{e(j.get('id'))}</code>: {e(j.get('error'))}{link}</li>")
        out.append("</ul>")
    out.append("</section>")
    return "\n".join(out)


def _compare_html(runs: Sequence[Run], batch: dict | None) -> str:
    rows = compare_rows(runs)
    job_of_run = {j.get("run_id"): j.get("id") for j in (batch or {}).get("jobs") or [] if j.get("run_id")}
    for row in rows:
        if row["job"] is None and row["id"] in job_of_run:
            row["job"] = str(job_of_run[row["id"]])
    show_job = any(r["job"] is not None for r in rows)
    dims = [d for d in DIMENSION_COLUMNS if any(r[d] is not None for r in rows)]
    judged = [c for c in JUDGE_COLUMNS if any(r["judge_first"] is not None or r["judge_best"] is not None
                                              for r in rows)]
    columns = ["id", *(["job"] if show_job else []), "request", "status", "rounds", "best_round",
               "best_overall", *dims, "gain", *judged, "stop_reason", "time_s"]
    numeric = {"rounds", "best_round", "best_overall", "gain", "time_s", "judge_first", "judge_best", *dims}
    out = ['<section class="compare"><h2>Compare</h2><div class="scroll"><table class="compare">',
           "<thead><tr>" + "".join(f'<th class="{"num" if c in numeric else ""}">{e(COLUMNS[c])}</th>'
                                   for c in columns) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for c in columns:
            v = r[c]
            if c == "id":
                cells.append(f'<td><a href="#run-{e(safe_name(v))}"><code>{e(v)}</code></a></td>')
            elif c == "best_overall":
                cells.append(f'<td class="num"><strong>{_dash(v)}</strong></td>')
            elif c == "gain":
                cls = "pos" if v and v > 0 else "neg" if v and v < 0 else ""
                text = "—" if v is None else f"{v:+.2f}" if v else "±0"
                cells.append(f'<td class="num {cls}">{text}</td>')
            elif c == "time_s":
                cells.append(f'<td class="num">{v:.1f}s</td>')
            elif c in ("judge_first", "judge_best"):
                cells.append(f'<td class="num">{"—" if v is None else f"{v:.3f}"}</td>')
            elif c == "disagree":
                cells.append(f'<td class="disagree" title="{e(DISAGREE)}">{e(DISAGREE)}</td>' if v
                             else f'<td>{"—" if v is None else "no"}</td>')
            elif c in dims:  # None: not scored, N/A, or not a dimension of the run's task
                cells.append(f'<td class="num">{_dash(v)}</td>')
            elif c in numeric:
                cells.append(f'<td class="num">{"—" if v is None else e(v)}</td>')
            else:
                cells.append(f'<td>{"—" if v is None else e(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if any(r["disagree"] for r in rows):
        out.append(f'<p class="disagree">{e(DISAGREE_NOTE)}</p>')
    out.append("</section>")
    return "\n".join(out)


def _run_html(run: Run, images: _ImageRefs, sheet: str | None) -> str:
    reason = run.stop_reason
    explained = STOP_EXPLAINED.get(reason, run.status)
    best = run.best
    out = [f'<section class="run" id="run-{e(safe_name(run.id))}">',
           f'<h2 class="request">{e(run.request)}</h2>',
           '<dl class="facts">',
           f"<dt>run</dt><dd><code>{e(run.id)}</code></dd>"]
    job = run.settings.get("job_id") if isinstance(run.settings, dict) else None
    if job is not None:
        out.append(f"<dt>job</dt><dd><code>{e(job)}</code></dd>")
    out += [f"<dt>task</dt><dd>{e(run.task)}</dd>",
            f"<dt>models</dt><dd>{e(run.generator)} → {e(run.critic)}</dd>",
            f"<dt>status</dt><dd>{e(run.status)}</dd>",
            f'<dt>stopped</dt><dd class="stop"><strong>{e(reason or run.status)}</strong> — {e(explained)}</dd>']
    if best is not None:
        out.append(f'<dt>best</dt><dd>round {best.index} · overall <strong>{_score(best.overall)}</strong></dd>')
    else:
        out.append('<dt>best</dt><dd>no round could be scored</dd>')
    judge = judge_name(run)
    if judge is not None:
        row = compare_rows([run])[0]
        out.append(f"<dt>judge</dt><dd><code>{e(judge)}</code> (reported, never optimized) · round 1 "
                   f"<strong>{_judge(row['judge_first'])}</strong> → best round "
                   f"<strong>{_judge(row['judge_best'])}</strong></dd>")
        if row["disagree"]:
            out.append(f'<dt>flag</dt><dd class="disagree">{e(DISAGREE_NOTE)}</dd>')
    if sheet:
        out.append(f'<dt>contact sheet</dt><dd><a href="{e(quote(sheet))}">{e(sheet)}</a></dd>')
    out.append("</dl>")
    if run.error:
        out.append(f'<p class="error">error: {e(run.error)}</p>')
    if run.rounds:
        out.append(score_chart(run))
    out.append('<div class="rounds">')
    if run.source_image:
        out.append(f'<figure class="card source">{images.img(run.source_image, "source image")}'
                   '<figcaption><h3>Source image</h3><p class="prompt">the image being edited</p>'
                   "</figcaption></figure>")
    dims = DIMENSIONS.get(run.task, DIMENSION_COLUMNS)
    previous = None
    for r in run.rounds:
        out.append(_round_html(run, r, previous, dims, images))
        previous = r.prompt
    if not run.rounds:
        out.append('<p class="meta">no rounds stored</p>')
    out.append("</div></section>")
    return "\n".join(out)


def _round_html(run: Run, r: Round, previous: str | None, dims, images: _ImageRefs) -> str:
    is_best = r.index == run.best_round
    cls = "card round best" if is_best else "card round"
    badge = ' <span class="badge" title="best round">★ best</span>' if is_best else ""
    out = [f'<figure class="{cls}" id="run-{e(safe_name(run.id))}-round-{r.index}">']
    if r.error:
        out.append('<div class="missing">round failed</div>')
    else:
        out.append(images.img(r.image, f"round {r.index}"))
    out.append(f"<figcaption><h3>Round {r.index}{badge}</h3>")
    if r.error:
        out.append(f'<p class="error">{e(r.error)}</p>')
    else:
        rows = "".join(f'<tr><th>{e(DIMENSION_LABELS.get(d, d))}</th><td class="num">'
                       f'{_score(r.scores[d]) if d in r.scores else "—"}</td></tr>' for d in dims)
        overall = _score(r.overall) if r.overall is not None else '<span class="neg">unscored</span>'
        judge = (f'<tr class="judge"><th>judge</th><td class="num">{_judge(r.judge)}</td></tr>'
                 if r.judge is not None else "")
        out.append(f'<table class="scores">{rows}<tr class="overall"><th>overall</th>'
                   f'<td class="num"><strong>{overall}</strong></td></tr>{judge}</table>')
    out.append(f'<p class="prompt">{prompt_diff_html(previous, r.prompt)}</p>')
    if r.rewrite_note:
        out.append(f'<p class="meta">{e(r.rewrite_note)}</p>')
    cand = r.result
    if cand is not None:
        out.append(_critique_html(cand, dims))
        if cand.raw_critique:
            out.append(f"<details><summary>Raw critique</summary><pre>{e(cand.raw_critique)}</pre></details>")
    others = [(i, c) for i, c in enumerate(r.candidates) if i != r.chosen]
    if others:
        out.append(f"<details><summary>Other candidates ({len(others)})</summary><div class=\"others\">")
        for i, c in others:
            judged = "" if c.judge is None else f" · judge {_judge(c.judge)}"
            out.append(f"<figure>{images.img(c.image, f'round {r.index} candidate {i + 1}')}"
                       f"<figcaption>seed {e(c.seed)} · overall {_score(c.overall)}{judged}</figcaption></figure>")
        out.append("</div></details>")
    out.append("</figcaption></figure>")
    return "\n".join(out)


def _critique_html(cand, dims) -> str:
    parts = []
    if cand.summary:
        parts.append(f"<h4>Summary</h4><p>{e(cand.summary)}</p>")
    for d in (*dims, *[d for d in cand.justifications if d not in dims]):
        text = cand.justifications.get(d)
        if text:
            parts.append(f"<h4>{e(DIMENSION_LABELS.get(d, d))}</h4><p>{e(text)}</p>")
    if cand.refined_request:
        parts.append(f"<h4>Refined request</h4><p>{e(cand.refined_request)}</p>")
    if cand.problems:
        parts.append("<h4>Could not read</h4><ul>" + "".join(f"<li>{e(p)}</li>" for p in cand.problems) + "</ul>")
    if not parts:
        return ""
    return '<details class="critique"><summary>Critique</summary>' + "".join(parts) + "</details>"


def prompt_diff_html(previous: str | None, current: str) -> str:
    """The prompt word by word: words new since the previous round in <ins>, removed ones in <del>."""
    if previous is None:
        return e(current)
    if previous == current:
        return f'<span class="same">{e(current)}</span>'
    old, new = previous.split(), current.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(e(" ".join(new[j1:j2])))
            continue
        if i2 > i1:
            out.append(f"<del>{e(' '.join(old[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{e(' '.join(new[j1:j2]))}</ins>")
    return " ".join(out)


def _score(v) -> str:
    return "N/A" if v is None else f"{v:.2f}"


def _judge(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _dash(v) -> str:
    return "—" if v is None else f"{v:.2f}"


# -- charts (inline SVG: no script, nothing fetched, every label escaped) ----------------------

DIMENSION_COLOURS = {"text_faithfulness": "#2563eb", "image_faithfulness": "#9333ea",
                     "physical_quality": "#ea580c", "text_rendering": "#0891b2"}
OVERALL_COLOUR = "#111827"


def score_chart(run: Run) -> str:
    """The run's scores round by round: the overall as a bold line, each dimension as a thin one, the
    best round ringed in green; unscored or failed rounds leave a gap (and a mark on the axis)."""
    dims = [d for d in DIMENSION_COLUMNS if any(d in r.scores for r in run.rounds)]
    n = len(run.rounds)
    left, right, top, bottom, plot_w = 34, 16, 10, 26, 320
    step = plot_w / (n - 1) if n > 1 else 0
    width, height = left + plot_w + right, top + 120 + bottom
    x0 = left + (plot_w / 2 if n == 1 else 0)

    def x(i: int) -> float:
        return x0 + i * step

    def y(v: float) -> float:
        return top + (4.0 - min(max(v, 1.0), 4.0)) / 3.0 * 120

    out = [f'<figure class="chart"><svg class="chart scores" role="img" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}">',
           f"<title>{e(f'Scores per round of {run.id}')}</title>"]
    for v in (1, 2, 3, 4):  # the 1-4 scale
        out.append(f'<line x1="{left - 4}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" fill="#6b7280">{v}</text>')
    for i, r in enumerate(run.rounds):
        out.append(f'<text x="{x(i):.1f}" y="{height - 8}" text-anchor="middle" font-size="11" '
                   f'fill="#6b7280">{r.index}</text>')
        if r.error or r.overall is None:
            why = "failed" if r.error else "unscored"
            out.append(f'<text class="gap" x="{x(i):.1f}" y="{top + 124}" text-anchor="middle" font-size="12" '
                       f'fill="#b91c1c"><title>round {r.index}: {why}</title>×</text>')
    series = [(d, DIMENSION_COLOURS.get(d, "#999"), 1.5, [r.scores.get(d) if not r.error else None
                                                          for r in run.rounds]) for d in dims]
    series.append(("overall", OVERALL_COLOUR, 3, [None if r.error else r.overall for r in run.rounds]))
    for name, colour, stroke, values in series:
        label = "overall" if name == "overall" else DIMENSION_LABELS.get(name, name)
        for segment in _runs_of_values(values):
            points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in segment)
            out.append(f'<polyline class="{e(name)}" points="{points}" fill="none" stroke="{colour}" '
                       f'stroke-width="{stroke}" stroke-linejoin="round"/>')
        for i, v in enumerate(values):
            if isinstance(v, (int, float)):
                radius = 3.5 if name == "overall" else 2
                out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{radius}" fill="{colour}">'
                           f"<title>round {run.rounds[i].index}: {e(label)} {v:.2f}</title></circle>")
    best = next((i for i, r in enumerate(run.rounds) if r.index == run.best_round), None)
    if best is not None and run.rounds[best].overall is not None:
        out.append(f'<circle class="best" cx="{x(best):.1f}" cy="{y(run.rounds[best].overall):.1f}" r="7" '
                   f'fill="none" stroke="#16a34a" stroke-width="2.5"><title>best round</title></circle>')
    out.append("</svg><figcaption class=\"legend\">")
    out.append(f'<span><i style="background:{OVERALL_COLOUR}"></i>overall</span>')
    out += [f'<span><i style="background:{DIMENSION_COLOURS.get(d, "#999")}"></i>{e(DIMENSION_LABELS.get(d, d))}'
            "</span>" for d in dims]
    out.append('<span class="best-key">◯ best round</span> <span>× unscored or failed</span></figcaption></figure>')
    return "".join(out)


def _runs_of_values(values):
    """Consecutive (position, value) stretches without a missing value: each is one line."""
    stretch = []
    for i, v in enumerate(values):
        if isinstance(v, (int, float)):
            stretch.append((i, v))
        else:
            if len(stretch) > 1:
                yield stretch
            stretch = []
    if len(stretch) > 1:
        yield stretch


def gain_chart(gains: Sequence[tuple]) -> str:
    """One bar per job: its best overall minus its round 1 overall (the `gain` of `gcr compare`)."""
    label_w = 16 + 8 * max(len(str(job)) for job, _, _ in gains)  # 12 px text: under 8 px a character
    bar_w, row, value_w = 260, 22, 90
    scale = max([abs(g) for _, g, _ in gains if g is not None] + [0.5])
    has_negative = any(g is not None and g < 0 for _, g, _ in gains)
    zero = label_w + (bar_w / 2 if has_negative else 0)
    span = bar_w / 2 if has_negative else bar_w
    width, height = label_w + bar_w + value_w, row * len(gains) + 8
    out = [f'<svg class="chart gains" role="img" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}"><title>Gain per job</title>',
           f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="0" y2="{height}" stroke="#9ca3af"/>']
    for k, (job, gain, best) in enumerate(gains):
        mid = 4 + k * row + row / 2
        out.append(f'<text x="{label_w - 6}" y="{mid + 4:.1f}" text-anchor="end" font-size="12" '
                   f'fill="#111827">{e(job)}</text>')
        if gain is None:
            out.append(f'<text x="{zero + 6:.1f}" y="{mid + 4:.1f}" font-size="12" fill="#6b7280">not scored</text>')
            continue
        length = abs(gain) / scale * span
        x = zero if gain >= 0 else zero - length
        colour = "#16a34a" if gain > 0 else "#b91c1c" if gain < 0 else "#9ca3af"
        label = f"{gain:+.2f}" if gain else "±0"
        where = f" (best: round {best})" if best is not None else ""
        out.append(f'<rect x="{x:.1f}" y="{mid - 7:.1f}" width="{max(length, 1.5):.1f}" height="14" '
                   f'fill="{colour}"><title>{e(job)}: gain {label}{where}</title></rect>'
                   f'<text x="{label_w + bar_w + 6}" y="{mid + 4:.1f}" font-size="12" fill="#111827">{label}</text>')
    out.append("</svg>")
    return "".join(out)


# -- contact sheet ----------------------------------------------------------------------------


def contact_sheet(run: Run, path: Path) -> Path:
    """A PNG of the round images side by side, scores underneath, the best round outlined.

    Edit runs start with the source image. Each image is scaled to TILE_HEIGHT keeping its aspect
    ratio; a failed or missing image is a grey square. Labels use PIL's default font, so nothing
    outside Pillow is needed.
    """
    from PIL import Image, ImageDraw

    font = _font()
    top, bottom = font.getbbox("Ag0")[1], font.getbbox("Ag0")[3]
    line = bottom + 4
    dims = DIMENSIONS.get(run.task, DIMENSION_COLUMNS)

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tiles = []  # (image, label lines, is_best)
    if run.source_image:
        tiles.append((_tile(run.source_image), ["source"], False))
    for r in run.rounds:
        tile = _tile(None if r.error else r.image)
        if r.error:
            lines = [f"round {r.index}", "failed"]
        else:
            lines = [f"round {r.index}  overall {_score(r.overall) if r.overall is not None else 'unscored'}"]
            lines += [f"{DIMENSION_LABELS.get(d, d)} {_score(r.scores[d]) if d in r.scores else '-'}" for d in dims]
        # What the generator was given this round, shortened to two lines of the tile's width.
        lines += _wrap(measure, font, r.prompt, tile.width, PROMPT_LINES)
        tiles.append((tile, lines, r.index == run.best_round))

    # Titled by the job id in a batch (what the batch file calls it), else by the run id.
    job = run.settings.get("job_id") if isinstance(run.settings, dict) else None
    header = _ascii(f"{job if job is not None else run.id}: {run.request}")
    n_lines = max((len(lines) for _, lines, _ in tiles), default=1)
    width = GAP + sum(t.width + GAP for t, _, _ in tiles) if tiles else 2 * GAP + TILE_HEIGHT
    height = GAP + line + GAP + TILE_HEIGHT + GAP + n_lines * line + GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, GAP - top), _fit(draw, font, header, width - 2 * GAP), fill=INK, font=font)
    x, y = GAP, GAP + line + GAP
    for tile, lines, is_best in tiles:
        sheet.paste(tile, (x, y))
        if is_best:  # the outline sits in the gap around the tile, so no pixel of the image is hidden
            draw.rectangle((x - OUTLINE, y - OUTLINE, x + tile.width + OUTLINE - 1, y + TILE_HEIGHT + OUTLINE - 1),
                           outline=BEST_COLOUR, width=OUTLINE)
        for k, text in enumerate(lines):
            draw.text((x, y + TILE_HEIGHT + GAP + k * line - top), _fit(draw, font, text, tile.width),
                      fill=BEST_COLOUR if is_best and k == 0 else INK, font=font)
        x += tile.width + GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        sheet.save(f, format="PNG")
    os.replace(tmp, path)
    return path


def _font():
    from PIL import ImageFont

    try:  # Pillow's own default font (FreeType build), at a size that stays legible when shared in chat
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError, ValueError):  # old Pillow or no FreeType: the bitmap default
        return ImageFont.load_default()


def _tile(image_path: str | None):
    from PIL import Image

    if image_path and Path(image_path).is_file():
        with Image.open(image_path) as im:
            im = im.convert("RGB")
            w = max(1, round(im.width * TILE_HEIGHT / im.height))
            return im.resize((w, TILE_HEIGHT), Image.Resampling.LANCZOS)
    return Image.new("RGB", (TILE_HEIGHT, TILE_HEIGHT), (200, 200, 200))


def _ascii(text: str) -> str:
    # The default font may be the bitmap fallback (Pillow without FreeType), which has Latin-1 only.
    return text.encode("ascii", "replace").decode("ascii").replace("\n", " ")


def _wrap(draw, font, text: str, width: int, max_lines: int) -> list[str]:
    """`text` in at most `max_lines` lines of `width` pixels, cut with "..." when longer."""
    words, lines = _ascii(text).split(), []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words and lines:  # more than fits: the last line says so
        lines[-1] = _fit(draw, font, lines[-1] + " " + " ".join(words), width)
    return [_fit(draw, font, line, width) for line in lines]


def _fit(draw, font, text: str, width: int) -> str:
    """Cut text with an ellipsis so labels never run into the next tile."""
    text = _ascii(text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# -- page template ----------------------------------------------------------------------------

# default-src 'none' blocks every script, so even a missed escape could not run code;
# img-src allows the relative PNGs (file: when opened from disk, 'self' when served) and data URIs.
_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{css}</style>
</head><body>"""

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1400px; padding: 1.5rem; background: #fafafa; color: #1a1a1a;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { margin: 0 0 .2rem; font-size: 1.6rem; }
h2 { margin: 0 0 .6rem; font-size: 1.25rem; overflow-wrap: anywhere; }
h3 { margin: .1rem 0 .4rem; font-size: 1rem; }
h4 { margin: .6rem 0 .1rem; font-size: .85rem; text-transform: uppercase; letter-spacing: .03em; color: #555; }
code { font: .85em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
a { color: #1d4ed8; }
.meta { color: #555; margin: 0; }
section { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 1rem 1.2rem; margin: 1.2rem 0; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem .8rem; margin: 0 0 1rem; }
dl.facts dt { color: #555; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; }
table.compare { width: 100%; font-size: .9rem; }
table.compare th, table.compare td { padding: .3rem .55rem; border-bottom: 1px solid #e5e5e5; text-align: left;
                                      vertical-align: top; }
table.compare td code { white-space: nowrap; overflow-wrap: normal; }
table.compare thead th { background: #f0f0f0; position: sticky; top: 0; }
table.compare tbody tr:hover { background: #f6f8ff; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: #15803d; } .neg { color: #b91c1c; }
.rounds { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem; }
.card { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; min-width: 0; }
.card img { display: block; width: 100%; height: auto; border-radius: 4px; background: #eee; }
.card.best { border: 3px solid #16a34a; box-shadow: 0 0 0 3px #dcfce7; }
.card.source { background: #f7f7f7; }
.badge { background: #16a34a; color: #fff; border-radius: 999px; padding: .05rem .5rem; font-size: .8rem;
         vertical-align: middle; }
.missing { display: flex; flex-direction: column; align-items: center; justify-content: center; aspect-ratio: 1;
           background: #eee; color: #666; border-radius: 4px; text-align: center; padding: .5rem; }
table.scores { width: 100%; font-size: .9rem; }
table.scores th { text-align: left; font-weight: normal; color: #444; padding: .05rem 0; }
table.scores tr.overall th, table.scores tr.overall td { border-top: 1px solid #ddd; padding-top: .2rem; }
.prompt { font-size: .9rem; margin: .5rem 0; overflow-wrap: anywhere; }
.prompt .same { color: #777; }
ins { background: #dcfce7; color: #14532d; text-decoration: none; border-radius: 2px; padding: 0 .1em; }
del { background: #fee2e2; color: #7f1d1d; border-radius: 2px; padding: 0 .1em; }
details { margin: .35rem 0; font-size: .9rem; }
details > summary { cursor: pointer; color: #1d4ed8; }
details p { margin: .1rem 0 .3rem; overflow-wrap: anywhere; white-space: pre-wrap; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f4f4f4; padding: .5rem; border-radius: 4px;
      font-size: .8rem; max-height: 24rem; overflow: auto; }
.others { display: grid; grid-template-columns: repeat(auto-fill, minmax(90px, 1fr)); gap: .4rem; }
.others figure { margin: 0; font-size: .75rem; }
.error { color: #b91c1c; overflow-wrap: anywhere; }
ul.failed li { overflow-wrap: anywhere; }
figure.chart { margin: 0 0 1rem; }
svg.chart { display: block; max-width: 100%; height: auto; font-family: system-ui, sans-serif; }
.legend { display: flex; flex-wrap: wrap; gap: .3rem 1rem; font-size: .8rem; color: #444; margin-top: .2rem; }
.legend i { display: inline-block; width: .9rem; height: .25rem; margin-right: .3rem; vertical-align: middle; }
.legend .best-key { color: #16a34a; }
.disagree { color: #92400e; background: #fef3c7; font-weight: 600; }
p.disagree { padding: .3rem .5rem; border-radius: 4px; margin: .5rem 0 0; }
"""
