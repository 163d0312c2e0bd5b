"""`gcr batch --workers N` on a local Ray cluster (2 CPU workers, tiny real models): the same results
as a batch in one process, a worker killed mid-batch, the driver killed and resumed, Ctrl-C.

One Ray cluster serves the in-process tests of this module (Ray's start-up costs seconds); the
subprocess tests start their own, as a user's `gcr batch --workers 2` does.
"""
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app
from gcr.store import RunStore
from tests.stored import job_results

ray = pytest.importorskip("ray")

runner = CliRunner()
ROOT = Path(__file__).parents[1]
TIMEOUT_S = 240
# The tiny random critic writes no readable critique: a completed batch with nothing scored exits 3.
NOTHING_SCORED = 3


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs, shared by this module's in-process batches."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs_file(tiny_dir, tmp_path_factory):
    """10 jobs: 6 text-to-image (some with 2 candidates), 4 edits; 3 rounds each, in groups of 2."""
    root = tmp_path_factory.mktemp("jobs")
    Image.new("RGB", (32, 32), (200, 120, 40)).save(root / "src.png")
    jobs = [{"id": f"t2i-{i}", "prompt": f"a tiny test scene number {i}", "seed": 100 + i,
             **({"candidates": 2} if i % 3 == 0 else {})} for i in range(6)]
    jobs += [{"id": f"edit-{i}", "prompt": f"edit number {i}", "image": "src.png",
              "generator": str(tiny_dir("flux-kontext")), "seed": 7 * i} for i in range(4)]
    spec = {"defaults": {"generator": str(tiny_dir("flux")), "critic": str(tiny_dir("critic")), "rounds": 3,
                         "patience": 3, "steps": 2, "width": 32, "height": 32, "device": "cpu",
                         "max_new_tokens": 16},
            "jobs": jobs}
    path = root / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


GROUP = ["--batch-size", "2"]


@pytest.fixture(scope="module")
def reference(jobs_file, tmp_path_factory):
    """The batch in this process, without Ray."""
    runs = tmp_path_factory.mktemp("reference")
    result = invoke("batch", jobs_file, "--runs-dir", runs, "--json", "--quiet", *GROUP)
    assert result.exit_code == NOTHING_SCORED, result.output
    return job_results(runs, json.loads(result.stdout))


def round_rows(runs: Path) -> dict:
    """(run, round) -> when it was committed, read straight from SQLite."""
    if not (runs / "gcr.sqlite3").exists():
        return {}
    db = sqlite3.connect(f"file:{runs / 'gcr.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return {(r, i): c for r, i, c in db.execute("SELECT run_id, idx, created FROM rounds")}
    except sqlite3.OperationalError:  # the schema is not there yet
        return {}
    finally:
        db.close()


def descendants(pid: int) -> list[int]:
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def ray_workers(pid: int) -> list[int]:
    """The gcr worker actors (Ray titles their processes ray::Worker...) under process `pid`."""
    return [p for p in descendants(pid) if title(p).startswith("ray::Worker")]


def assert_complete(runs: Path, record: dict, reference: dict) -> None:
    assert record["status"] == "completed", record
    assert all(j["status"] == "completed" for j in record["jobs"])
    got = job_results(runs, record)
    for job_id, rounds in got.items():
        assert [r[0] for r in rounds] == [1, 2, 3], job_id  # every round, each once
    assert got == reference  # prompts, seeds, pixels, raw critiques


def test_workers_give_the_same_results_as_one_process_and_load_models_once_each(
        cluster, jobs_file, reference, tmp_path):
    result = invoke("batch", jobs_file, "--runs-dir", tmp_path / "runs", "--workers", 2, "--json", *GROUP)
    assert result.exit_code == NOTHING_SCORED, result.output
    record = json.loads(result.stdout)  # stdout holds the JSON only: Ray's own reports go to stderr
    assert_complete(tmp_path / "runs", record, reference)
    log = result.stderr
    assert "Ray: 2 workers (1 CPU each)" in log
    for worker in ("worker 1", "worker 2"):  # both took groups: handed out as they became free
        loads = [line for line in log.splitlines() if line.startswith(f"{worker}: loading")]
        assert loads, log
        # once per worker per distinct model: two generators, one critic checkpoint for both tasks
        assert len(loads) == len(set(loads)) <= 3, loads
    shown = json.loads(invoke("show", record["id"], "--runs-dir", tmp_path / "runs", "--json").stdout)
    assert shown["jobs"] == record["jobs"]


def test_a_worker_killed_mid_batch_loses_only_its_rounds_in_flight(cluster, jobs_file, reference, tmp_path):
    """SIGKILL one worker process right after the batch's first committed round: its unfinished jobs
    continue on another worker from their last committed round; every round is stored exactly once,
    and no committed round is written again."""
    from gcr.batch import run_batch
    from gcr.batchfile import load_batch_file
    from gcr.distributed.cluster import ClusterOptions

    runs = tmp_path / "runs"

    class KillOnFirstRound:
        """The progress display's place in the driver: sees every committed round as it happens."""

        def __init__(self):
            self.killed, self.before, self.lines, self.workers = None, {}, [], {}

        def log(self, message):
            self.lines.append(str(message))
            if self.killed is None and " round " in str(message):
                self.before = round_rows(runs)
                self.killed = ray_workers(os.getpid())[0]
                os.kill(self.killed, signal.SIGKILL)

        def worker(self, name, status):
            self.workers.setdefault(name, set()).add(status.split(" · ")[0])

        def update(self, message):
            pass

        def start_jobs(self, total, done=0):
            pass

        def job_finished(self):
            pass

    watch = KillOnFirstRound()
    store = RunStore(runs)
    record = run_batch(store, load_batch_file(jobs_file), batch_size=2, progress=watch, log=watch.log,
                       cluster=ClusterOptions(workers=2))
    assert watch.killed and not alive(watch.killed)
    assert any("died (killed, out of memory or crashed)" in line for line in watch.lines), watch.lines
    pids = {s for statuses in watch.workers.values() for s in statuses if s.startswith("pid ")}
    assert len(pids) == 3, watch.workers  # two workers, and the one that replaced the killed one
    assert_complete(runs, record, reference)
    after = round_rows(runs)
    assert watch.before and all(after[k] == v for k, v in watch.before.items())  # committed once, kept


def test_the_driver_killed_then_interrupted_then_resumed_completes_the_batch(jobs_file, reference, tmp_path):
    """A real `gcr batch --workers 2`: kill -9 mid-batch; `--resume --workers 2` interrupted with
    Ctrl-C (exit 130, the resume command printed, no Ray process left); `--resume --workers 2` again
    completes it: each round once, the same results as one uninterrupted process."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "gcr.cli", "batch", str(jobs_file), "--runs-dir", str(runs), *GROUP]
    env = {**os.environ, "COLUMNS": "200"}

    def start(*extra):
        log = open(tmp_path / f"attempt-{len(list(tmp_path.glob('attempt-*')))}.log", "w")
        return subprocess.Popen([*cmd, "--workers", "2", "--quiet", *extra], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log, text=True), log

    def wait_for_new_rounds(proc, log, before):
        deadline = time.monotonic() + TIMEOUT_S
        while len(round_rows(runs)) <= before:
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "no round was committed"
            time.sleep(0.05)

    def settled_store():
        store = RunStore(runs)
        batch = store.get_batch(store.latest_batch_for(str(jobs_file.resolve()))["id"])
        statuses = {store.get_run(j["run_id"]).status for j in batch["jobs"] if j["run_id"]}
        store.close()
        return batch, statuses

    # 1. kill -9 the driver mid-batch: its workers go with it.
    proc, log = start()
    wait_for_new_rounds(proc, log, 0)
    workers = ray_workers(proc.pid)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    batch, statuses = settled_store()
    assert batch["status"] == "interrupted" and "running" not in statuses
    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers):
        assert time.monotonic() < deadline, "Ray workers outlived their driver"
        time.sleep(0.2)

    # 2. resume, then Ctrl-C: a clean stop.
    proc, log = start("--resume")
    wait_for_new_rounds(proc, log, len(round_rows(runs)))
    ray_processes = descendants(proc.pid)
    assert [p for p in ray_processes if title(p).startswith("ray::Worker")]
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    stderr = Path(log.name).read_text()
    assert "Traceback" not in stderr
    assert f"continue with `gcr batch {jobs_file} --resume --runs-dir {runs} --workers 2`" in stderr
    batch, statuses = settled_store()
    assert batch["status"] == "interrupted" and statuses <= {"interrupted", "completed"}
    assert "interrupted" in statuses
    assert not [p for p in ray_processes if alive(p)], [title(p) for p in ray_processes if alive(p)]

    # 3. resume to the end.
    done = subprocess.run([*cmd, "--resume", "--workers", "2", "--json", "--quiet"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == NOTHING_SCORED, done.stderr
    assert_complete(runs, json.loads(done.stdout), reference)


def test_joining_a_running_cluster_by_address(cluster, tiny_dir, tmp_path):
    """`--ray-address ADDR` joins a running cluster (here the test's own) instead of starting one."""
    spec = {"defaults": {"generator": str(tiny_dir("flux")), "critic": str(tiny_dir("critic")), "rounds": 1,
                         "steps": 2, "width": 32, "height": 32, "device": "cpu", "max_new_tokens": 16},
            "jobs": [{"id": "one", "prompt": "a red cube", "seed": 1}, {"id": "two", "prompt": "a blue cube"}]}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "gcr.cli", "batch", str(path), "--runs-dir", str(tmp_path / "runs"),
                           "--ray-address", cluster, "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == NOTHING_SCORED, done.stderr
    assert json.loads(done.stdout)["status"] == "completed"
    # No GPU in this cluster: one worker per node.
    assert "Ray: 1 worker (2 CPUs each) on 1 node" in done.stderr


def test_more_workers_than_the_cluster_has_room_for_is_refused(cluster, jobs_file, tmp_path):
    result = invoke("batch", jobs_file, "--runs-dir", tmp_path / "runs", "--workers", 3)
    assert result.exit_code == 2, result.output
    assert "--workers 3 asks for a CPU per worker, but this machine has 2: pass --workers 2 or fewer" in \
        " ".join(result.stderr.split())
    assert RunStore(tmp_path / "runs").latest_batch_for(str(jobs_file.resolve())) is None  # refused before it began


def test_critic_engines_are_refused_with_workers(jobs_file, tmp_path):
    spec = yaml.safe_load(jobs_file.read_text())
    spec["defaults"]["critic_engine"] = "transformers-serve"
    path = jobs_file.parent / "engine.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = invoke("batch", path, "--runs-dir", tmp_path / "runs", "--workers", 2)
    assert result.exit_code == 2, result.output
    assert "critic_url" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--ray-address", "auto"]])
def test_without_ray_installed_workers_are_refused_in_one_sentence(jobs_file, tmp_path, flag):
    hide_ray = ("import sys; sys.modules['ray'] = None; sys.argv = ['gcr'] + sys.argv[1:]; "
                "from gcr.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", hide_ray, "batch", str(jobs_file), "--runs-dir",
                           str(tmp_path / "runs"), *flag], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"error: {flag[0]} runs the batch on Ray, which is not installed: pip install 'gcr[ray]'" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_address_where_nothing_answers_is_refused_in_seconds(jobs_file, tmp_path):
    done = subprocess.run([sys.executable, "-m", "gcr.cli", "batch", str(jobs_file), "--runs-dir", str(tmp_path / "r"),
                           "--ray-address", "127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "error: Could not join the Ray cluster at 127.0.0.1:1 (nothing answers at" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_workers_measures_a_ray_batch_against_one_in_process(cluster):
    from rich.console import Console

    from gcr.distributed.bench import ClusterBenchSettings, cluster_table, run_cluster_bench

    result = run_cluster_bench(ClusterBenchSettings(workers=(1,), jobs=2, rounds=2))
    local, ray_run = result["runs"]
    assert (local["workers"], ray_run["workers"]) == (None, 1)
    for r in (local, ray_run):
        assert r["status"] == "completed" and r["rounds"] == 4 and r["same_results"] is True
        assert r["wall_s"] > 0 and r["steady_s_per_round"] > 0 and r["overhead_ms_per_round"] is not None
    assert result["ray_overhead_ms_per_round"] == ray_run["overhead_ms_per_round"] - local["overhead_ms_per_round"]
    assert result["image_trip_ms"]["bytes"] == 1024 * 1024 * 3
    console = Console(width=80, record=True)
    console.print(cluster_table(result))
    shown = console.export_text()
    assert "1 Ray worker" in shown and "in this process" in shown
    assert max(len(line) for line in shown.splitlines()) <= 80


def test_bench_workers_takes_worker_counts(tmp_path):
    result = invoke("bench", "--workers", "0,2")
    assert result.exit_code == 2 and "--workers takes worker counts separated by commas" in result.stderr


def test_a_job_that_kills_every_worker_it_runs_on_is_given_up_and_the_batch_goes_on(tmp_path):
    """The fakes of tests/fake_gcr.py in every worker; one prompt's generation kills its process
    (as the OOM killer would): after three workers died on it, that job ends failed, the others
    complete, and the batch exits 1 naming it."""
    spec = {"defaults": {"generator": "fake/generator", "critic": "fake/critic", "rounds": 2, "patience": 2,
                         "seed": 3},
            "jobs": [{"id": "fine-1", "prompt": "a fox"}, {"id": "poison", "prompt": "a poison apple"},
                     {"id": "fine-2", "prompt": "a hen"}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "tests.fake_gcr", "batch", str(path), "--runs-dir",
                           str(tmp_path / "runs"), "--workers", "2", "--batch-size", "1", "--json"], cwd=ROOT,
                          env={**os.environ, "GCR_FAKE_KILL_ON": "poison"}, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    jobs = {j["id"]: j for j in json.loads(done.stdout)["jobs"]}
    assert jobs["fine-1"]["status"] == jobs["fine-2"]["status"] == "completed"
    assert jobs["poison"]["status"] == "failed"
    assert "the Ray worker running it died 3 times" in jobs["poison"]["error"]
    assert done.stderr.count("died (killed, out of memory or crashed)") == 3
    assert "Traceback" not in done.stderr


def test_workers_that_cannot_start_end_the_batch_instead_of_hanging(tmp_path):
    """Workers that die as they start (gcr missing on a node, say) are replaced three times each,
    then the batch ends: every job failed with the reason, exit 1 with the command to retry."""
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"generator": "fake/generator", "critic": "fake/critic", "seed": 1},
                                    "jobs": [{"id": "a", "prompt": "a fox"}, {"id": "b", "prompt": "a hen"}]}))
    done = subprocess.run([sys.executable, "-m", "tests.fake_gcr", "batch", str(path), "--runs-dir",
                           str(tmp_path / "runs"), "--workers", "2", "--json"], cwd=ROOT,
                          env={**os.environ, "GCR_FAKE_WORKER_BROKEN": "1"}, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "failed"
    assert all(j["status"] == "failed" and "every Ray worker died 3 times" in j["error"] for j in record["jobs"])
    assert done.stderr.count("died while starting") == 6
    assert "--resume --runs-dir" in done.stderr and "--workers 2`" in done.stderr


def test_score_on_workers_gives_what_one_process_gives_each_image_once(cluster, tiny_dir, tmp_path):
    """`gcr score --workers N` runs on the same machinery: workers critique, this process stores."""
    from PIL import Image

    rows = []
    for i in range(5):
        Image.effect_noise((32, 32), 40 + 20 * i).convert("RGB").save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "prompt": f"a grey scene number {i}"})
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "before.png")
    rows.append({"image": "img0.png", "prompt": "make it red", "source": "before.png", "id": "edit"})
    (tmp_path / "images.yaml").write_text(yaml.safe_dump(rows))
    common = [tmp_path / "images.yaml", "--critic", tiny_dir("critic"), "--device", "cpu", "--max-new-tokens", 16,
              "--batch-size", 1, "--json", "--quiet"]

    def stored(runs: Path) -> list:
        store = RunStore(runs)
        [job] = [r for r in store.db.execute("SELECT id FROM score_jobs")]
        out = [(r["position"], r["image"], r["prompt"], r["raw_critique"]) for r in store.scores(job["id"])]
        assert store.get_score_job(job["id"])["status"] == "completed"
        store.close()
        return out

    here = invoke("score", *common, "--runs-dir", tmp_path / "here")
    assert here.exit_code == NOTHING_SCORED, here.output
    there = invoke("score", *common[:-1], "--runs-dir", tmp_path / "there", "--ray-address", cluster)
    assert there.exit_code == NOTHING_SCORED, there.output
    assert "Ray: 1 worker" in there.stderr  # it did run on the cluster
    assert json.loads(there.stdout) == json.loads(here.stdout)
    got = stored(tmp_path / "there")
    assert [r[0] for r in got] == list(range(1, 7))  # every image, each once
    assert got == stored(tmp_path / "here")         # the same critiques, word for word
