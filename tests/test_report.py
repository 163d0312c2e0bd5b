"""gcr compare rows and table, the HTML report (escaping, images, structure), contact sheets,
and the report opened in a real headless Chromium (renders, every image loads, no console errors)."""
import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from rich.console import Console

from gcr import report
from gcr.compare import COLUMNS, compare_rows, compare_table, sort_rows
from gcr.errors import UsageError
from gcr.records import Candidate, Round, Run
from gcr.store import RunStore

XSS_REQUEST = "a <script>alert(1)</script> fox [red]not markup[/red]"
XSS_PROMPT = 'a fox "onerror=alert(1) x=" <img src=x onerror=alert(2)>'


def cand(seed, tf, pq, tr=None, imf=None, raw="", justifications=None, summary="fine", image=""):
    scores = {"text_faithfulness": tf, "physical_quality": pq, "text_rendering": tr}
    if imf is not None:
        scores["image_faithfulness"] = imf
    values = [v for v in scores.values() if v is not None]
    return Candidate(seed=seed, scores=scores, overall=sum(values) / len(values) if values else None,
                     raw_critique=raw or f"# Summary: {summary}", refined_request=f"refined {seed}",
                     summary=summary, justifications=justifications or {"text_faithfulness": "ok"})


def rnd(index, prompt, candidates, chosen=0, total_s=1.5, error=None):
    return Round(index, prompt, tuple(candidates), chosen=chosen, error=error,
                 timings={} if error else {"generate_s": 1.0, "critique_s": total_s - 1.0, "total_s": total_s})


def png(colour, size=(64, 64)):
    return Image.new("RGB", size, colour)


def add_run(store, run, rounds, images, *, status, stop_reason, best_round):
    run = store.create_run(run)
    for r, imgs in zip(rounds, images):
        store.record_round(run, r, imgs)
    return store.finish_run(run.id, status=status, stop_reason=stop_reason, best_round=best_round)


@pytest.fixture
def runs(tmp_path):
    """Three stored runs: a t2i run full of hostile text, an edit run, and a failed run."""
    store = RunStore(tmp_path / "runs dir #1")  # a space and a '#' must survive the relative URLs
    evil = {"text_faithfulness": "</details><script>alert(3)</script>",
            "physical_quality": 'sharp "onerror=alert(4)'}
    a = add_run(store, Run(id="run-a", request=XSS_REQUEST, task="t2i", generator="tiny", critic="critic",
                           settings={"job_id": "job-<a>"}),
                [rnd(1, XSS_REQUEST, [cand(1, 2.0, 2.0, raw="<b>raw</b> <script>alert(5)</script>")]),
                 rnd(2, XSS_PROMPT, [cand(1, 3.5, 2.5, justifications=evil, summary="<i>good</i>")], total_s=2.25),
                 rnd(3, "a calm fox in snow", [cand(1, 2.5, 2.5)])],
                [[png((200, 0, 0))], [png((0, 200, 0))], [png((0, 0, 200))]],
                status="completed", stop_reason="plateau", best_round=2)
    source = tmp_path / "source.png"
    png((90, 90, 90), (96, 64)).save(source)
    b = add_run(store, Run(id="run-b", request="make it night", task="edit", generator="tiny-edit",
                           critic="critic", source_image=str(source)),
                [rnd(1, "make it night", [cand(7, 3.5, 3.5, imf=3.5)]),
                 rnd(2, "make it night with stars", [cand(7, 3.0, 3.0, imf=3.0), cand(8, 2.0, 2.0, imf=2.0)])],
                [[png((10, 10, 60), (96, 64))], [png((20, 20, 80), (96, 64)), png((5, 5, 5), (96, 64))]],
                status="completed", stop_reason="max_rounds", best_round=1)
    c = add_run(store, Run(id="run-c", request="a broken job", task="t2i", generator="tiny", critic="critic"),
                [rnd(1, "a broken job", [cand(3, None, None)]),
                 rnd(2, "a broken job", [], error="generator <exploded>")],
                [[png((1, 2, 3))], []],
                status="failed", stop_reason="error", best_round=None)
    return [a, b, c]


# -- compare ----------------------------------------------------------------------------------


def test_compare_rows(runs):
    a, b, c = compare_rows(runs)
    assert list(a) == list(COLUMNS)
    assert a["id"] == "run-a" and a["job"] == "job-<a>" and a["request"] == XSS_REQUEST
    assert (a["rounds"], a["best_round"], a["best_overall"], a["gain"]) == (3, 2, 3.0, 1.0)
    assert (a["text_faithfulness"], a["physical_quality"], a["text_rendering"]) == (3.5, 2.5, None)
    assert a["image_faithfulness"] is None
    assert (a["stop_reason"], a["status"], a["time_s"]) == ("plateau", "completed", 5.25)
    # Edit run whose best is round 1: no gain; the best round's scores, not the last round's.
    assert (b["best_round"], b["best_overall"], b["gain"], b["image_faithfulness"]) == (1, 3.5, 0.0, 3.5)
    assert b["job"] is None and b["time_s"] == 3.0
    # Nothing scored: no best, no gain, and unscored is not zero.
    assert (c["best_round"], c["best_overall"], c["gain"], c["rounds"]) == (None, None, None, 2)
    assert c["text_faithfulness"] is None and c["stop_reason"] == "error"
    rows = json.loads(json.dumps([a, b, c]))  # JSON-ready: survives a round trip unchanged
    assert rows == [a, b, c]
    assert all(type(v) in (str, int, float, type(None)) for row in rows for v in row.values())


def test_unfinished_run_uses_its_best_scored_round(runs):
    running = runs[0].with_(best_round=None, status="running", stop_reason=None)
    row = compare_rows([running])[0]
    assert (row["best_round"], row["best_overall"], row["gain"]) == (2, 3.0, 1.0)


@pytest.mark.parametrize("column", list(COLUMNS))
@pytest.mark.parametrize("descending", [False, True])
def test_sort_by_every_column(runs, column, descending):
    rows = compare_rows(runs)
    got = sort_rows(rows, column, descending)
    assert sorted(r["id"] for r in got) == ["run-a", "run-b", "run-c"]
    values = [r[column] for r in got]
    present = [v for v in values if v is not None]
    assert values == present + [None] * (len(values) - len(present))  # missing values last, both ways
    key = (lambda v: v) if all(isinstance(v, (int, float)) for v in present) else (lambda v: str(v).casefold())
    assert present == sorted(present, key=key, reverse=descending)


def test_sort_examples_and_header_names(runs):
    rows = compare_rows(runs)
    assert [r["id"] for r in sort_rows(rows, "best_overall", descending=True)] == ["run-b", "run-a", "run-c"]
    assert [r["id"] for r in sort_rows(rows, "Overall")] == ["run-a", "run-b", "run-c"]  # header name works
    assert [r["id"] for r in sort_rows(rows, "gain")] == ["run-b", "run-a", "run-c"]
    assert [r["id"] for r in sort_rows(rows, "time", descending=True)] == ["run-a", "run-b", "run-c"]
    assert [r["id"] for r in sort_rows(rows, "stop-reason")] == ["run-c", "run-b", "run-a"]


def test_sort_by_unknown_column_names_the_valid_ones(runs):
    with pytest.raises(UsageError) as err:
        sort_rows(compare_rows(runs), "score")
    msg = str(err.value)
    assert "'score'" in msg and all(c in msg for c in COLUMNS)


def test_compare_table_renders_values_literally(runs):
    console = Console(record=True, width=250, color_system="truecolor", file=io.StringIO())
    table = compare_table(compare_rows(runs))
    console.print(table)
    text = console.export_text(clear=False)
    assert "[red]not markup[/red]" in text  # user text is never Rich markup
    for expected in ("run-b", "job-<a>", "3.00", "+1.00", "±0", "plateau", "5.2s", "Image"):
        assert expected in text  # run-b has no job: its run id stands in
    assert "run-a" not in text  # a batch row is named by its job id
    headers = [col.header for col in table.columns]
    assert headers[:2] == ["job", "request"]
    assert all(col.justify == "right" for col in table.columns
               if col.header in ("rounds", "best", "overall", "Text", "gain", "time"))
    styles = console.export_html(inline_styles=True)
    assert "font-weight: bold" in styles and "#008000" in styles  # bold best overall, green gain


# -- HTML report ------------------------------------------------------------------------------


class Page(HTMLParser):
    """Tags and attributes as a browser would parse them."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag):
        return [a for t, a in self.tags if t == tag]


def all_images(run):
    paths = [c.image for r in run.rounds for c in r.candidates]
    return paths + ([run.source_image] if run.source_image else [])


def test_report_references_every_image_relatively(runs, tmp_path):
    out = tmp_path / "report"
    path = report.write_report(runs, out, "Nightly <batch>")
    assert path == out / "index.html"
    page = Page(path.read_text(encoding="utf-8"))
    srcs = [a["src"] for a in page.all("img")]
    assert srcs and not any(s.startswith(("/", "file:", "data:", "http")) for s in srcs)
    resolved = {(out / unquote(s)).resolve() for s in srcs}
    assert all(p.is_file() for p in resolved)
    assert resolved == {Path(p).resolve() for run in runs for p in all_images(run)}
    assert "%20" in srcs[0] and "%23" in srcs[0]  # 'runs dir #1' is URL-quoted
    for run in runs:
        sheet = out / f"contact-{run.id}.png"
        assert sheet.is_file() and {"href": sheet.name} in page.all("a")


def test_report_escapes_everything_from_users_and_models(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r", XSS_REQUEST).read_text(encoding="utf-8")
    page = Page(text)
    assert "<script" not in text.lower()
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)  # no event handlers
    assert page.all("img") and all(set(a) == {"src", "alt"} for a in page.all("img"))
    body = "".join(page.text)  # what a reader sees: the hostile text, verbatim
    for shown in (XSS_REQUEST, "</details><script>alert(3)</script>", 'sharp "onerror=alert(4)',
                  "<b>raw</b> <script>alert(5)</script>", "<i>good</i>", "generator <exploded>", "job-<a>"):
        assert shown in body, shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&quot;onerror=alert(1)" in text


def test_report_structure(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r", "t",
                               batch={"id": "b-1", "file": "x.yaml", "status": "failed",
                                      "jobs": [{"id": "j1", "run_id": "run-a", "status": "completed", "error": None},
                                               {"id": "j2", "run_id": None, "status": "failed",
                                                "error": "image <missing>"}]}).read_text()
    page = Page(text)
    sections = {a["id"] for a in page.all("section") if "id" in a}
    assert sections == {"run-run-a", "run-run-b", "run-run-c"}
    links = [a["href"] for a in page.all("a") if a["href"].startswith("#")]
    assert {h[1:] for h in links} == sections  # the compare table links to every run
    assert text.index('class="compare"') < text.index('id="run-run-a"')  # table on top
    best = [a for a in page.all("figure") if "best" in a.get("class", "").split()]
    assert [a["id"] for a in best] == ["run-run-a-round-2", "run-run-b-round-1"]
    assert text.count("<summary>Critique</summary>") == 6  # every round but the failed one
    assert text.count("<summary>Raw critique</summary>") == 6
    assert "<summary>Other candidates (1)</summary>" in text
    assert "Source image" in text and "round failed" in text
    assert "<ins>with stars</ins>" in text  # the prompt diff between rounds
    assert ("a <ins>calm</ins> fox <del>&quot;onerror=alert(1) x=&quot; &lt;img src=x onerror=alert(2)&gt;</del> "
            "<ins>in snow</ins>") in text
    assert "scores stopped improving" in text and "the round limit was reached" in text
    assert "j2" in text and "image &lt;missing&gt;" in text  # a job that never got a run is listed
    assert "<script" not in text  # no scripts at all
    urls = [v for _, attrs in page.tags for k, v in attrs.items() if k in ("src", "href")]
    assert urls and not any(u.startswith(("http:", "https:", "//", "file:")) for u in urls)  # nothing remote


def test_single_run_report_has_no_compare_table(runs, tmp_path):
    text = report.write_report(runs[:1], tmp_path / "r", "one").read_text()
    assert 'class="compare"' not in text and 'id="run-run-a"' in text


def test_embedded_report_carries_the_images(runs, tmp_path):
    out = tmp_path / "r"
    text = report.write_report(runs, out, "t", embed=True).read_text()
    srcs = [a["src"] for a in Page(text).all("img")]
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {Path(p).read_bytes() for run in runs for p in all_images(run)}


def test_report_without_contact_sheets(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r", "t", sheets=False).read_text()
    assert "contact-" not in text and not list((tmp_path / "r").glob("*.png"))


def test_missing_image_is_reported_not_broken(runs, tmp_path):
    os.remove(runs[0].rounds[0].image)
    text = report.write_report(runs[:1], tmp_path / "r", "t").read_text()
    assert "image not found" in text and len(Page(text).all("img")) == 2


# -- contact sheets ---------------------------------------------------------------------------


def test_contact_sheet(runs, tmp_path):
    path = report.contact_sheet(runs[0], tmp_path / "sheets" / "a.png")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        g, t = report.GAP, report.TILE_HEIGHT
        assert im.width == g + 3 * (t + g)  # three 64x64 rounds scaled to 256x256
        assert t + 5 * 10 < im.height < t + 200  # one title line above, four score lines underneath
        top = next(y for y in range(im.height) if im.getpixel((g + 10, y)) == (200, 0, 0))  # tiles' top
        assert top < 40 and im.getpixel((g + 10, top + t - 1)) == (200, 0, 0)
        x_best = g + (t + g)  # round 2 is the best: outlined in the gap around it, the others are not
        assert im.getpixel((x_best - 2, top + 50)) == report.BEST_COLOUR
        assert im.getpixel((g - 2, top + 50)) == report.BACKGROUND
        assert im.getpixel((x_best + 10, top + 10)) == (0, 200, 0)
        below = im.crop((g, top + t + 2, g + t, im.height))  # scores are written underneath
        assert below.convert("L").getextrema()[0] < 100


def test_contact_sheet_of_an_edit_run_starts_with_the_source(runs, tmp_path):
    with Image.open(report.contact_sheet(runs[1], tmp_path / "b.png")) as im:
        assert im.width == report.GAP + 3 * (384 + report.GAP)  # 96x64 images scaled to 384x256


# -- real browser ----------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars"]
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} not installed (CI installs Debian's chromium)")


def non_blank_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        return colours is None or len(colours) > 50


@needs_chromium
def test_screenshot_from_the_command_line(runs, tmp_path):
    page = report.write_report(runs, tmp_path / "report", "Screenshot")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert shot.is_file(), proc.stderr[-2000:]
    assert non_blank_png(shot)


class DevTools:
    """Just enough of the Chrome DevTools protocol over --remote-debugging-pipe (fds 3 and 4):
    no port, no websocket, stdlib only. Messages are JSON separated by NUL bytes."""

    def __init__(self, args):
        to_chrome_r, self.w = os.pipe()
        self.r, from_chrome_w = os.pipe()

        def fds():  # in the child: its fd 3 reads our commands, its fd 4 writes its replies
            import fcntl
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *args, "--remote-debugging-pipe"], preexec_fn=fds,
                                     close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf, self.last_id, self.events = b"", 0, []

    def send(self, method, params=None, session=None, timeout=30):
        self.last_id += 1
        msg = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method, timeout=30):
        deadline = time.monotonic() + timeout
        while not any(ev.get("method") == method for ev in self.events):
            self.events.append(self._read(deadline))

    def open(self, url, width=1280, height=2000):
        """A new page at `url` with console and log events on, once it has loaded; its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=sid)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, sid)
        nav = self.send("Page.navigate", {"url": url}, sid)
        assert "errorText" not in nav, nav
        self.wait_for("Page.loadEventFired")
        return sid

    def evaluate(self, expression, session):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)["result"]["value"]

    def problems(self):
        """Every script error, console error and error log entry seen (CSP violations and blocked loads
        arrive as the latter)."""
        return [ev["params"] for ev in self.events
                if ev.get("method") == "Runtime.exceptionThrown"
                or (ev.get("method") == "Runtime.consoleAPICalled" and ev["params"]["type"] in ("error", "assert"))
                or (ev.get("method") == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error")]

    def _read(self, deadline):
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "Chromium did not answer in time"
            chunk = os.read(self.r, 1 << 20)
            assert chunk, f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}"
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self):
        try:
            os.write(self.w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.w)
            os.close(self.r)
            self.proc.stderr.close()


IMAGES_JS = """JSON.stringify({
  total: document.images.length,
  broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
  sections: document.querySelectorAll('section.run').length,
  bestOutline: getComputedStyle(document.querySelector('.card.best')).borderTopColor
})"""


@needs_chromium
@pytest.mark.parametrize("embed", [False, True])
def test_report_in_a_real_browser(runs, tmp_path, embed):
    page = report.write_report(runs, tmp_path / "report", "Browser check", embed=embed)
    chrome = DevTools([*FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "about:blank"])
    try:
        sid = chrome.open(page.as_uri())
        state = json.loads(chrome.evaluate(IMAGES_JS, sid))
        shot = base64.b64decode(chrome.send("Page.captureScreenshot", {"format": "png"}, sid)["data"])
    finally:
        chrome.close()
    problems = chrome.problems()
    assert problems == []  # no console errors: no blocked resource, no failed load, no CSP violation
    assert state["total"] == sum(len(all_images(r)) for r in runs) and state["broken"] == []
    assert state["sections"] == 3
    assert state["bestOutline"] == "rgb(22, 163, 74)"  # the best round's highlight is really applied
    out = tmp_path / "browser.png"
    out.write_bytes(shot)
    assert non_blank_png(out)
    if os.environ.get("GCR_REPORT_SCREENSHOT"):  # keep a copy to look at: GCR_REPORT_SCREENSHOT=dir
        dest = Path(os.environ["GCR_REPORT_SCREENSHOT"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest / f"report{'-embedded' if embed else ''}.png")
