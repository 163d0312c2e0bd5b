"""The run store: round trips, PNG metadata, prefixes, and survival of a kill -9."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from gcr.errors import UsageError
from gcr.records import Candidate, Round, Run
from gcr.store import RunStore, new_run_id, slug


def make_run(store, request="a fox / reading <b>news</b>"):
    return store.create_run(Run(id=new_run_id(request), request=request, task="t2i",
                                generator="g", critic="c", settings={"loop": {"rounds": 4}}))


def make_round(index, overall=2.5, candidates=1):
    cands = tuple(Candidate(seed=10 + i, raw_critique=f"raw {i}", overall=overall + i,
                            scores={"text_faithfulness": overall + i, "text_rendering": None},
                            refined_request=f"next {index}") for i in range(candidates))
    return Round(index, f"prompt {index}", cands, chosen=candidates - 1,
                 timings={"generate_s": 1.0, "critique_s": 2.0, "rewrite_s": 0.0, "total_s": 3.0},
                 next_prompt=f"next {index}")


def test_slug_and_ids_are_file_name_safe():
    assert slug("../../etc/passwd; rm -rf ~") == "etc-passwd-rm-rf"
    assert slug("日本語") == "run"
    rid = new_run_id("A fox/../\\ <script>")
    assert all(ch.isalnum() or ch == "-" for ch in rid)


def test_round_trip_and_png_metadata(tmp_path):
    store = RunStore(tmp_path)
    run = make_run(store)
    images = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(2)]
    stored = store.record_round(run, make_round(1, candidates=2), images)
    assert Path(stored.image).is_file() and stored.image.endswith("round-01-c2.png")
    assert Path(stored.candidates[0].image).name == "round-01.png"
    with Image.open(stored.image) as im:
        assert im.text["gcr:prompt"] == "prompt 1" and im.text["gcr:seed"] == "11"
        assert json.loads(im.text["gcr:scores"]) == {"text_faithfulness": 3.5, "text_rendering": None}
    final = store.finish_run(run.id, status="completed", stop_reason="plateau", best_round=1)
    assert Path(final.final_image).read_bytes() == Path(stored.image).read_bytes()
    again = RunStore(tmp_path).get_run(run.id[:12])
    assert again.to_dict() == final.to_dict()
    r = again.rounds[0]
    assert (r.index, r.prompt, r.seed, r.overall, r.refined_request) == (1, "prompt 1", 11, 3.5, "next 1")
    assert r.scores == {"text_faithfulness": 3.5, "text_rendering": None}
    assert again.to_dict()["best_overall"] == 3.5


def test_list_runs_newest_first_with_best_overall(tmp_path):
    store = RunStore(tmp_path)
    ids = []
    for i in range(3):
        run = make_run(store, f"request {i}")
        store.record_round(run, make_round(1, overall=2.0 + i), [Image.new("RGB", (4, 4))])
        store.finish_run(run.id, status="completed", stop_reason="target", best_round=1)
        ids.append(run.id)
        time.sleep(0.002)
    rows = store.list_runs()
    assert [r["id"] for r in rows] == ids[::-1]
    assert [r["best_overall"] for r in rows] == [4.0, 3.0, 2.0]


def test_unknown_and_ambiguous_ids_are_usage_errors(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(UsageError, match="gcr runs"):
        store.get_run("nope")
    make_run(store), make_run(store)
    with pytest.raises(UsageError, match="matches 2 runs"):
        store.get_run("20")
    with pytest.raises(UsageError, match="no runs|matches"):
        RunStore(tmp_path / "empty").get_run("last")


def test_like_wildcards_in_ids_are_literal(tmp_path):
    store = RunStore(tmp_path)
    make_run(store)
    with pytest.raises(UsageError):
        store.get_run("%")


WRITER = textwrap.dedent("""
    import sys, time
    from PIL import Image
    sys.path.insert(0, {root!r})
    from tests.test_store import make_run, make_round
    from gcr.store import RunStore
    store = RunStore(sys.argv[1])
    run = make_run(store)
    print(run.id, flush=True)
    for i in range(1, 1000):
        store.record_round(run, make_round(i, candidates=2),
                           [Image.new("RGB", (256, 256), (i % 255, 0, 0))] * 2)
        print(i, flush=True)
""")


@pytest.mark.parametrize("delay", [0.3, 0.77, 1.3])
def test_kill_9_leaves_a_readable_store_with_every_completed_round(tmp_path, delay):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(Path(__file__).parents[1])))
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(script), str(runs)], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = [int(x) for x in proc.stdout.read().split()]  # rounds reported as done

    run = RunStore(runs).get_run(run_id)
    indices = [r.index for r in run.rounds]
    assert indices == list(range(1, len(indices) + 1))
    assert len(indices) >= len(committed) >= 1
    for r in run.rounds:
        for c in r.candidates:
            with Image.open(c.image) as im:
                im.load()  # every referenced PNG is complete
    db = sqlite3.connect(runs / "gcr.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_an_owner_is_recognised_by_its_process_not_just_its_pid():
    """The recorded start time defeats pid reuse: the same pid with another start time is another
    process; a record from another machine cannot be judged by the process table at all."""
    import socket

    from gcr.owner import Owner, me, process_alive

    mine = me("run-x", "now")
    assert process_alive(mine) is True and mine.is_me()
    boot_ns, _, start = mine.process.rpartition("/")
    reused = Owner(mine.host, mine.pid, f"{boot_ns}/{int(start) + 1}", "run-x", "now")
    assert process_alive(reused) is False and not reused.is_me()
    gone = Owner(mine.host, 2**22 + 7, f"{boot_ns}/1", "run-x", "now")  # above pid_max: no such process
    assert process_alive(gone) is False
    elsewhere = Owner(socket.gethostname() + "-other", mine.pid, mine.process, "run-x", "now")
    assert process_alive(elsewhere) is None


def test_a_running_row_without_a_live_owner_reads_interrupted_and_is_recorded_so(tmp_path):
    store = RunStore(tmp_path)
    run = make_run(store)
    assert store.get_run(run.id).status == "running"  # this process owns it
    store.release(f"run-{run.id}")                     # as if this process had died
    again = RunStore(tmp_path)
    assert again.get_run(run.id).status == "interrupted"
    assert "ended before it finished" in again.get_run(run.id).error
    row = sqlite3.connect(tmp_path / "gcr.sqlite3").execute("SELECT status FROM runs").fetchone()
    assert row[0] == "interrupted"  # fixed up in the store, since no one held its lock
