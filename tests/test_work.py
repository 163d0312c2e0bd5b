"""The scale-out worker and the driver's commits, without Ray: a worker's event stream fed to the
driver by hand, so every ordering a cluster can produce (a worker lost after some rounds, a round
delivered twice) is reproduced exactly. Models are the doubles of tests/fakes.py."""

import pytest
import yaml
from PIL import Image

from gcr.batch import prepare, run_batch
from gcr.batchfile import load_batch_file
from gcr.distributed import refine, work
from gcr.distributed.refine import RefineDriver
from gcr.distributed.work import Worker
from gcr.store import RunStore
from tests import fake_gcr
from tests.stored import round_results


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    fake_gcr.install(monkeypatch.setattr)


def jobs_file(tmp_path, rounds=3):
    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "src.png")
    spec = {"defaults": {"generator": "fake/generator", "critic": "fake/critic", "rounds": rounds, "patience": rounds},
            "jobs": [{"id": "a", "prompt": "a fox", "seed": 1},
                     {"id": "b", "prompt": "a hen", "seed": 2, "candidates": 2},
                     {"id": "c", "prompt": "an owl", "seed": 3}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def results(store: RunStore, batch_id: str) -> dict:
    out = {}
    for job in store.get_batch(batch_id)["jobs"]:
        run = store.get_run(job["run_id"])
        out[job["job_id"]] = (run.status, run.best_round, [r.next_prompt for r in run.rounds], round_results(run))
    return out


def reference(tmp_path, path):
    store = RunStore(tmp_path / "reference")
    record = run_batch(store, load_batch_file(path))
    return results(store, record["id"])


class Driver:
    """A batch's driver with its jobs in one group, and what its callbacks were told."""

    def __init__(self, root, path):
        self.store = RunStore(root)
        self.batch_id, self.planned = prepare(self.store, load_batch_file(path), resume=False, force=False)
        self.failed, self.recorded = {}, []
        self.driver = RefineDriver(self.store, self.batch_id, [self.planned], job_failed=self.job_failed,
                                   job_recorded=self.job_recorded)

    def job_recorded(self, p):
        self.recorded.append(p.spec.id)
        self.store.set_batch_job(self.batch_id, p.spec.id, run_id=p.run_id, fingerprint=p.spec.fingerprint(),
                                 position=self.planned.index(p))

    def job_failed(self, p, reason):
        p.status, p.error = "failed", reason
        self.failed[p.spec.id] = reason

    def feed(self, group, events):
        for event in events:
            if event[0] not in (work.HELLO, work.STATUS, work.LOG):
                self.driver.handle(group, event, "worker 1")


def test_a_worker_streams_each_round_and_the_driver_stores_it_once_as_a_local_batch_would(tmp_path):
    path = jobs_file(tmp_path)
    d = Driver(tmp_path / "runs", path)
    (group,) = d.driver.groups()
    group = d.driver.start(group)
    events = list(Worker("worker 1").run(group.kind, group.payload))

    kinds = [e[0] for e in events]
    assert kinds[0] == work.HELLO and kinds.index(refine.MODELS) < kinds.index(refine.ROUND)
    rounds = [e for e in events if e[0] == refine.ROUND]
    assert len(rounds) == 9 and all(isinstance(p, refine.Pixels) for e in rounds for p in e[3])
    assert [e[1] for e in events if e[0] == refine.JOB_DONE] == ["a", "b", "c"]

    d.feed(group, events)
    d.feed(group, rounds)  # every round delivered again (a retry): nothing is written twice
    assert d.recorded == ["a", "b", "c"] and not d.failed
    assert results(d.store, d.batch_id) == reference(tmp_path, path)


def test_a_group_whose_worker_died_continues_from_its_committed_rounds(tmp_path):
    """The worker is lost after it streamed round 1 of every job and round 2 of one: the group is
    rebuilt from the store and finishes on another worker with the same results."""
    path = jobs_file(tmp_path)
    d = Driver(tmp_path / "runs", path)
    (group,) = d.driver.groups()
    group = d.driver.start(group)
    events = list(Worker("worker 1").run(group.kind, group.payload))
    cut = [i for i, e in enumerate(events) if e[0] == refine.ROUND][3]  # round 1 of a, b, c, round 2 of a
    d.feed(group, events[:cut + 1])

    left = d.driver.remaining(group)
    assert left.payload == ("a", "b", "c")
    again = d.driver.start(left)
    assert [len(j.rounds) for j in again.payload.jobs] == [2, 1, 1]  # as committed
    rerun = list(Worker("worker 2").run(again.kind, again.payload))
    assert [e[2].index for e in rerun if e[0] == refine.ROUND] == [2, 2, 3, 3, 3]  # catch up, then together
    d.feed(again, rerun)
    d.feed(group, events[cut + 1:])  # the lost worker's last words arrive late: ignored
    assert results(d.store, d.batch_id) == reference(tmp_path, path)
    assert d.driver.remaining(again) is None


def test_models_that_cannot_load_fail_the_group_s_jobs(tmp_path):
    path = jobs_file(tmp_path)
    spec = yaml.safe_load(path.read_text())
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    spec["defaults"]["generator"] = str(tmp_path / "gone")
    path.write_text(yaml.safe_dump(spec))
    d = Driver(tmp_path / "runs", path)
    (group,) = d.driver.groups()
    group = d.driver.start(group)
    events = list(Worker("worker 1").run(group.kind, group.payload))
    assert [e[0] for e in events if e[0] not in (work.HELLO, work.STATUS, work.LOG)] == [refine.UNLOADABLE]
    d.feed(group, events)
    assert sorted(d.failed) == ["a", "b", "c"]
    assert all(r.startswith("models could not be loaded: ") for r in d.failed.values())
    assert d.driver.remaining(group) is None


def boom(payload, context):
    raise RuntimeError(f"cannot do {payload}")


def test_a_kind_that_raises_is_reported_and_the_worker_goes_on(monkeypatch):
    monkeypatch.setitem(work.KINDS, "boom", "tests.test_work:boom")
    worker = Worker("worker 1")
    events = list(worker.run("boom", "this"))
    assert events[0][0] == work.HELLO and events[-1] == (work.CRASHED, "unexpected RuntimeError: cannot do this")
    assert list(worker.run("boom", "that"))[-1] == (work.CRASHED, "unexpected RuntimeError: cannot do that")
    with pytest.raises(ValueError, match="unknown kind of work 'nothing'"):
        work.run_kind("nothing", None, None)


def test_a_job_whose_source_image_is_gone_fails_alone(tmp_path):
    path = jobs_file(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["jobs"][1].update(image="src.png", generator="fake/editor", task="edit")
    path.write_text(yaml.safe_dump(spec))
    d = Driver(tmp_path / "runs", path)
    (tmp_path / "src.png").unlink()
    groups = d.driver.groups()
    started = [d.driver.start(g) for g in groups]
    assert list(d.failed) == ["b"] and "src.png" in d.failed["b"] and "cannot be read now" in d.failed["b"]
    assert sorted(j.id for g in started if g for j in g.payload.jobs) == ["a", "c"]


def test_the_progress_display_has_a_line_per_worker_printed_literally():
    import io

    from rich.console import Console

    from gcr.view import Progress

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    with Progress(3, console=console) as progress:
        progress.worker("worker 1", "pid 7 on node-a · round 2/3 · critique · a, b +2")
        progress.worker("worker 2", "pid 8 on node-b · [bold]x[/] \x1b[2J")
        progress.worker("worker 1", "pid 7 on node-a · idle")
        progress.bar.refresh()
        lines = [progress.bar.tasks[i].description for i in range(len(progress.bar.tasks))]
    assert lines[1:] == ["worker 1 · pid 7 on node-a · idle", "worker 2 · pid 8 on node-b · [bold]x[/] \\x1b[2J"]
    shown = console.file.getvalue()
    assert "worker 1 · pid 7 on node-a · round 2/3 · critique · a, b +2" in shown and "[bold]x[/]" in shown


def test_runs_interrupted_on_the_driver_keep_their_best_round(tmp_path):
    """Ctrl-C on the driver ends every unfinished run interrupted, with the best of its stored rounds,
    whether its group was running or still waiting for a worker (a resumed batch's jobs)."""
    path = jobs_file(tmp_path)
    d = Driver(tmp_path / "runs", path)
    group = d.driver.start(d.driver.groups()[0])
    events = list(Worker("worker 1").run(group.kind, group.payload))
    cut = [i for i, e in enumerate(events) if e[0] == refine.ROUND][3]  # round 1 of a, b, c, round 2 of a
    d.feed(group, events[:cut + 1])

    def stored():
        return {p.spec.id: d.store.get_run(p.run_id) for p in d.planned}

    d.driver.close_unfinished("interrupted", "interrupted by the user")
    first = stored()
    assert {r.status for r in first.values()} == {"interrupted"}
    assert all(r.best_round and r.final_image for r in first.values())

    # The batch resumed, and interrupted again before any group reached a worker.
    batch_id, planned = prepare(d.store, load_batch_file(path), resume=True, force=False)
    assert batch_id == d.batch_id and all(p.run_id for p in planned)
    RefineDriver(d.store, batch_id, [planned], job_failed=d.job_failed, job_recorded=d.job_recorded
                 ).close_unfinished("interrupted", "interrupted by the user")
    again = stored()
    assert {r.status for r in again.values()} == {"interrupted"}
    assert {j: (r.best_round, len(r.rounds)) for j, r in again.items()} == \
        {j: (r.best_round, len(r.rounds)) for j, r in first.items()}
