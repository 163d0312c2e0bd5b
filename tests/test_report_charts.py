"""Look instead of read: the report draws each run's scores per round and a batch's gains as inline
SVG (no script: the CSP stays strict), contact sheets carry the job id and each round's prompt, and
the terminal round table ends with a sparkline of the overall."""
import json
import re

from PIL import Image
from rich.console import Console

from gcr import report
from gcr.view import rounds_table, sparkline
from tests.test_report import FLAGS, DevTools, Page, needs_chromium, runs  # noqa: F401 - fixture

BATCH = {"id": "b-1", "file": "x.yaml", "status": "failed",
         "jobs": [{"id": "job-<a>", "run_id": "run-a", "status": "completed", "error": None},
                  {"id": "edit-b", "run_id": "run-b", "status": "completed", "error": None},
                  {"id": "broken-c", "run_id": "run-c", "status": "failed", "error": "boom"}]}


def svgs(text):
    return re.findall(r"<svg class=\"chart (\w+)\".*?</svg>", text, re.S)


def test_each_run_has_a_score_chart_with_a_point_per_scored_value(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r", "t").read_text()
    assert svgs(text).count("scores") == 3
    a = report.score_chart(runs[0])  # three scored rounds, three dimensions of which two are scored
    assert a.count("<circle") == 3 * 3 + 1  # overall + 2 dimensions per round, and the best-round ring
    assert 'class="overall"' in a and a.count("<polyline") == 3  # overall, Text, Quality
    assert "round 2: overall 3.00" in a and 'class="best"' in a
    c = report.score_chart(runs[2])  # nothing scored: no line, a mark per unscored or failed round
    assert "<polyline" not in c and c.count('class="gap"') == 2 and 'class="best"' not in c


def test_the_best_round_ring_sits_on_the_best_rounds_overall(runs):
    svg = report.score_chart(runs[0])
    ring = re.search(r'<circle class="best" cx="([\d.]+)" cy="([\d.]+)"', svg).groups()
    point = re.search(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3.5" fill="#111827"><title>round 2: ', svg).groups()
    assert ring == point


def test_a_batch_report_draws_each_jobs_gain(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r", "t", batch=BATCH).read_text()
    [gains] = re.findall(r'<svg class="chart gains".*?</svg>', text, re.S)
    assert gains.count("<rect") == 2  # run-a +1.00, run-b ±0; run-c has nothing scored
    assert "job-&lt;a&gt;: gain +1.00 (best: round 2)" in gains and "edit-b: gain ±0" in gains
    assert "not scored" in gains and "<a>" not in gains
    bars = dict(re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="([\d.]+)".*?<title>([^:]+):', gains))
    assert float([w for w, job in bars.items() if job == "job-&lt;a&gt;"][0]) > 100


def test_charts_escape_what_they_show_and_run_no_script(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r", "t", batch=BATCH).read_text()
    page = Page(text)
    assert "<script" not in text.lower() and not any(k.startswith("on") for _, a in page.tags for k in a)
    assert "default-src 'none'" in text  # the CSP is unchanged


def test_contact_sheets_are_titled_by_job_id_and_show_each_rounds_prompt(runs, tmp_path, monkeypatch):
    drawn = []
    real = report._fit
    monkeypatch.setattr(report, "_fit", lambda draw, font, text, width: drawn.append(text) or real(draw, font, text, width))
    report.contact_sheet(runs[0], tmp_path / "a.png")
    header = next(t for t in drawn if t.startswith("job-<a>:"))
    assert "run-a" not in header  # a batch job is named as the batch file names it
    assert any(t.startswith("a calm fox in snow") for t in drawn)  # round 3's prompt under its tile
    assert any(t.startswith('a fox "onerror=alert(1)') for t in drawn)  # round 2's, as text in the PNG
    report.contact_sheet(runs[1], tmp_path / "b.png")
    assert any(t.startswith("run-b: make it night") for t in drawn)  # outside a batch: the run id
    with Image.open(tmp_path / "a.png") as im:
        assert im.height > report.TILE_HEIGHT + 6 * 14  # score lines and two prompt lines under the tiles


def test_a_long_prompt_is_cut_to_two_lines_that_say_so(tmp_path):
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = report._wrap(draw, report._font(), "word " * 80, 200, 2)
    assert len(lines) == 2 and lines[1].endswith("...")
    assert all(draw.textlength(line, font=report._font()) <= 200 for line in lines)
    assert report._wrap(draw, report._font(), "short prompt", 200, 2) == ["short prompt"]


def test_the_round_table_ends_with_a_sparkline_of_the_overall(runs):
    console = Console(record=True, width=80, file=open("/dev/null", "w"))
    console.print(rounds_table(runs[0]))
    text = console.export_text()
    assert "trend ▃▆▅  2.00 → 2.50 (best: round 2)" in text
    assert sparkline([1.0, 4.0, None, "error"]).plain == "▁█·×"


@needs_chromium
def test_charts_render_in_a_real_browser_with_no_errors(runs, tmp_path):
    page = report.write_report(runs, tmp_path / "report", "Charts", batch=BATCH)
    chrome = DevTools([*FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "about:blank"])
    try:
        sid = chrome.open(page.as_uri())
        js = """JSON.stringify([...document.querySelectorAll('svg.chart')].map(s => {
            const b = s.getBoundingClientRect();
            return {kind: s.classList[1], w: b.width, h: b.height,
                    lines: s.querySelectorAll('polyline').length, bars: s.querySelectorAll('rect').length,
                    visibleLine: [...s.querySelectorAll('polyline')].some(p => p.getTotalLength() > 50)};
        }))"""
        charts = json.loads(chrome.evaluate(js, sid))
    finally:
        chrome.close()
    problems = chrome.problems()
    assert problems == []  # no CSP violation, nothing blocked
    assert [c["kind"] for c in charts] == ["gains", "scores", "scores", "scores"]
    assert all(c["w"] > 150 and c["h"] > 30 for c in charts)  # drawn, at a readable size
    gains, a, b, c = charts
    assert gains["bars"] == 2 and a["visibleLine"] and b["lines"] > 0 and c["lines"] == 0
