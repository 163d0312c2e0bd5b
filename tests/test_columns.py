"""Every table fits the terminal: at 80 columns and narrower, no line is wider than the terminal, and
no score, time, status, stop reason, id or preset name is elided; free text wraps or moves instead.
Output to a pipe has no ANSI codes and no box-drawing characters."""
import re

import pytest
from PIL import Image
from rich.cells import cell_len
from typer.testing import CliRunner

from gcr.cli import app
from gcr.presets import GENERATOR_PRESETS
from gcr.records import Candidate, Round, Run
from gcr.store import RunStore

runner = CliRunner()
LONG = ("a weathered lighthouse keeper in a yellow raincoat standing on slippery black rocks at dusk, "
        "holding a brass lantern while enormous waves crash behind him and gulls circle overhead, "
        "painted in the style of a nineteenth-century maritime oil painting with visible brushstrokes")
LONG_JOB = "edit-job-with-a-very-long-identifier-that-goes-on-and-on-0123456"  # 64 characters, the most
BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters
WIDTHS = [80, 60, 44]


def cand(seed, tf, pq, tr, imf=None, missing=()):
    scores = {"text_faithfulness": tf, "physical_quality": pq, "text_rendering": tr}
    if imf is not None:
        scores["image_faithfulness"] = imf
    scores = {k: v for k, v in scores.items() if k not in missing}
    values = [v for v in scores.values() if v is not None]
    return Candidate(seed=seed, scores=scores, overall=sum(values) / len(values) if values else None,
                     refined_request=LONG, summary="fine", justifications={"text_faithfulness": "ok"},
                     missing=tuple(missing))


def timed(total):
    return {"generate_s": total / 2, "critique_s": total / 2, "total_s": total}


@pytest.fixture
def store(tmp_path):
    """Runs with long requests, four dimensions, long job ids, every status and long times."""
    store = RunStore(tmp_path / "runs")
    img = Image.new("RGB", (8, 8))

    def add(run, rounds, status, stop, best, batch=None):
        run = store.create_run(run.with_(batch_id=batch))
        for r in rounds:
            store.record_round(run, r, [img] * len(r.candidates))
        if status != "running":
            store.finish_run(run.id, status=status, stop_reason=stop, best_round=best,
                             error="generation failed: boom" if status == "failed" else None)
        return run.id

    store.create_batch("batch-20261201-000000-long-0001", str(tmp_path / "b.yaml"), [(LONG_JOB, "x"), ("t2i-1", "y")])
    edit = add(Run(id="20261201-000001-a-weathered-lighthouse-0001", request=LONG, task="edit",
                   generator="qwen-image-edit", critic="rationalrewards-edit", settings={"job_id": LONG_JOB}),
               [Round(1, LONG, (cand(3, 2.25, 3.5, None, imf=3.75),), timings=timed(1234.56)),
                Round(2, LONG + " again", (cand(3, 3.25, 3.0, 2.5, imf=4.0, missing=("physical_quality",)),),
                      timings=timed(99.9)),
                Round(3, "no image this time", (Candidate(4),), timings=timed(12.0)),
                Round(4, "broken", (), error="generation failed: CUDA ran out of memory " * 3)],
               "failed", "error", 1, batch="batch-20261201-000000-long-0001")
    t2i = add(Run(id="20261201-000002-a-shop-sign-0002", request=LONG, task="t2i", generator="flux-schnell",
                  critic="rationalrewards-t2i", settings={"job_id": "t2i-1"}),
              [Round(1, LONG, (cand(1, 2.0, 2.5, 1.75), cand(2, 3.5, 3.75, 4.0)), chosen=1, timings=timed(7.25)),
               Round(2, "a sign", (cand(1, 3.5, 3.5, 3.5),), timings=timed(8.5))],
              "completed", "converged", 1, batch="batch-20261201-000000-long-0001")
    store.set_batch_job("batch-20261201-000000-long-0001", LONG_JOB, run_id=edit, fingerprint="x", position=0)
    store.set_batch_job("batch-20261201-000000-long-0001", "t2i-1", run_id=t2i, fingerprint="y", position=1)
    add(Run(id="20261201-000003-still-going-0003", request="still going", task="t2i", generator="sdxl",
            critic="c"), [Round(1, "still going", (cand(5, 3.0, 3.0, None),), timings=timed(1.0))], "running", None, None)
    add(Run(id="20261201-000004-stopped-by-ctrl-c-0004", request="stopped by ctrl-c", task="t2i",
            generator="sdxl", critic="c"), [], "interrupted", None, None)
    add(Run(id="20261201-000005-out-of-time-0005", request="out of time", task="t2i", generator="sdxl",
            critic="c"), [Round(1, "out of time", (cand(6, 1.0, 1.25, None),), timings=timed(3600.0))],
        "completed", "time_budget", 1)
    return store


def gcr(store, *args, width=80):
    result = runner.invoke(app, [*args, "--runs-dir", str(store.root)], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_fits(output, width):
    assert output.strip()
    for line in output.splitlines():
        assert cell_len(line) <= width, f"{cell_len(line)} > {width}: {line!r}"
    assert "…" not in output and "..." not in output  # nothing elided
    assert "\x1b[" not in output and not BOX.search(output)  # a pipe: no colours, no box drawing


def words(output):
    return set(output.split())


@pytest.mark.parametrize("width", WIDTHS)
def test_round_tables_fit_with_four_dimensions_and_long_prompts(store, width):
    out = gcr(store, "show", "20261201-000001", width=width)
    assert_fits(out, width)
    for value in ("2.25", "3.50", "3.75", "3.25*", "4.00", "unscored", "1234.6s", "99.9s", "12.0s", "+0.08", "3.17",
                  "Rendering", "Quality"):
        assert value in words(out), value
    assert "CUDA ran out of memory" in " ".join(out.split())  # the failed round's error, whole
    assert "trend" in out and "stopped: error" in out
    out = gcr(store, "show", "20261201-000002", width=width)
    assert_fits(out, width)
    assert {"3.75", "3.50", "converged", "7.2s", "8.5s"} <= words(out)


@pytest.mark.parametrize("width", WIDTHS)
def test_runs_list_fits_with_every_status_and_whole_ids(store, width):
    out = gcr(store, "runs", width=width)
    assert_fits(out, width)
    for value in ("completed", "failed", "running", "interrupted", "3.75", "3.75", "1.12",
                  "20261201-000001-a-weathered-lighthouse-0001", "20261201-000005-out-of-time-0005"):
        assert value in words(out), value
    assert "overall" in words(out) and "best" not in words(out)  # a score is called overall everywhere


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_and_batch_tables_fit_with_long_job_ids(store, width):
    for args in (["compare", "20261201-000001", "20261201-000002", "20261201-000005"],
                 ["show", "batch-20261201"], ["compare", "batch-20261201"]):
        out = gcr(store, *args, width=width)
        assert_fits(out, width)
        flat = " ".join(out.split())
        for value in ("3.75", "4.00", "+0.00" if False else "±0", "failed", "completed", "error", "converged",
                      "1346.5s", "15.8s"):
            assert value in flat, (args, value)
        assert LONG_JOB in out.replace("\n", "") or LONG_JOB in words(out)
        assert "best round" in flat or "best\nround" in out or ("best" in words(out) and "round" in words(out))


@pytest.mark.parametrize("width", WIDTHS)
def test_generators_fit_and_every_preset_name_shows_whole(width):
    result = runner.invoke(app, ["generators"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0
    assert_fits(result.stdout, width)
    assert set(GENERATOR_PRESETS) <= words(result.stdout)
    for p in GENERATOR_PRESETS.values():
        assert p.hub_id in result.stdout.replace("\n", "").replace(" ", "") or p.hub_id in words(result.stdout)


@pytest.mark.parametrize("width", WIDTHS)
def test_a_critique_as_text_fits(store, width):
    out = gcr(store, "show", "20261201-000001", "--round", "2", width=width)
    assert_fits(out, width)


def test_wide_terminals_get_one_line_per_row(store):
    out = gcr(store, "compare", "20261201-000001", "20261201-000002", width=250)
    rows = [line for line in out.splitlines() if "20261201-0000" in line or LONG_JOB in line or "t2i-1" in line]
    assert len(rows) == 2 and all("±0" in r or "+" in r for r in rows)
    headers = out.splitlines()[1].split()
    assert headers[:4] == ["job", "request", "status", "rounds"]


def test_the_same_column_name_means_the_same_thing_in_every_table(store):
    from gcr.compare import COLUMNS

    # "overall" is a score, "best round" a round number: in compare, runs and the round table alike.
    assert COLUMNS["best_overall"] == "overall" and COLUMNS["best_round"] == "best round"
    runs = gcr(store, "runs", width=250)
    assert "overall" in runs.splitlines()[0].split() and "best" not in runs.splitlines()[0].split()
    show = gcr(store, "show", "20261201-000002", width=250)
    assert "overall" in show and "best round" not in show.splitlines()[1]
