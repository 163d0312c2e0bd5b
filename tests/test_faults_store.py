"""Fault injection on the run store and on the processes that own runs and batches.

Each case asserts what a user sees and what is left: the exit code, exactly one sentence on stderr
and no traceback, the final status of the run and batch, and that every completed round is still in
the store with its image. Models are the doubles of tests/fakes.py (through tests/fake_gcr.py, in
this process under CliRunner or in a real process), except where a real loader's failure matters.
"""
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from gcr import migrations, store as store_module
from gcr.cli import app
from gcr.store import RunStore
from tests import fake_gcr
from tests.stored import round_results

ROOT = Path(__file__).parents[1]
V0 = Path(__file__).parent / "data" / "store-v0"   # a store written by gcr before schema versions
FAST = ["-g", "fake", "--critic", "fake", "--quiet"]
HOST = socket.gethostname()


@pytest.fixture
def fake(monkeypatch):
    fake_gcr.install(monkeypatch.setattr)


def gcr(*args):
    """The CLI in this process."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


# What torch and torchao print when first imported in this environment (not gcr's output).
LIBRARY_NOISE = re.compile(r"^(W\d{4} .*torch/|Unable to import `torchao`)")


def one_sentence(stderr: str) -> str:
    """stderr holds exactly one sentence, and no traceback."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not LIBRARY_NOISE.match(line)]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.endswith("."), line
    assert not re.search(r"[.!?]\s+[A-Z]", line), f"more than one sentence: {line}"
    return line


def intact(runs: Path, run_id: str):
    """The run as stored, after checking its rounds are 1..n, once each, every image complete."""
    run = RunStore(runs, write=False).get_run(run_id)
    assert [r.index for r in run.rounds] == list(range(1, len(run.rounds) + 1))
    for r in run.rounds:
        for c in r.candidates:
            with Image.open(c.image) as im:
                im.load()
    return run


def committed(runs: Path) -> int:
    if not (runs / "gcr.sqlite3").exists():
        return 0
    db = sqlite3.connect(f"file:{runs / 'gcr.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def spawn(*args, delay=0.0, env=None, **kw):
    """The real CLI (with the model doubles) in its own process."""
    full_env = {**os.environ, "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1",
                "GCR_FAKE_DELAY": str(delay), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tests.fake_gcr", *map(str, args)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(runs: Path, n: int, proc, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while committed(runs) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no rounds appeared"
        time.sleep(0.02)


def only_run(runs: Path) -> str:
    return RunStore(runs, write=False).resolve_id("last")


def batch_file(tmp_path: Path, jobs: list, rounds=3, **defaults) -> Path:
    spec = {"defaults": {"generator": "fake/generator", "critic": "fake/critic", "rounds": rounds, "patience": rounds,
                         "seed": 7, **defaults}, "jobs": jobs}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def can_mount() -> list | None:
    """The command prefix that gives a process its own mount namespace, or None where mounting is
    not allowed (then the tests that need a real read-only or full file system skip)."""
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        try:
            probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                                   capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def cli(*args) -> str:
    """The fake-model CLI as a shell command line."""
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tests.fake_gcr", *map(str, args)])


def in_namespace(prefix, script: str):
    """Run a shell script (mounts, then CLI commands) in a private mount namespace."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*prefix, "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


# -- a store that lasts ------------------------------------------------------------------------

def old_store(tmp_path: Path) -> Path:
    """A copy of the store gcr wrote before schema versions (user_version 0): a completed run, a run
    whose process was killed after one round (left `running`), and a batch."""
    runs = tmp_path / "old"
    shutil.copytree(V0, runs, ignore=shutil.ignore_patterns("gcr.sql"))
    db = sqlite3.connect(runs / "gcr.sqlite3")
    db.executescript((V0 / "gcr.sql").read_text())
    db.close()
    return runs


def test_a_store_from_before_schema_versions_is_migrated_read_and_resumed(tmp_path, fake):
    runs = old_store(tmp_path)
    listed = gcr("runs", "--runs-dir", runs, "--json")
    assert listed.exit_code == 0, listed.output
    status = {r["request"]: r["status"] for r in json.loads(listed.stdout)}
    assert status == {"a completed fox": "completed", "a killed fox": "interrupted"}  # its process is gone
    db = sqlite3.connect(runs / "gcr.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
    assert db.execute("SELECT COUNT(*) FROM owners").fetchone()[0] == 0
    assert db.execute("SELECT status FROM runs WHERE request='a killed fox'").fetchone()[0] == "interrupted"
    done = intact(runs, "20261201-175656-a-completed-fox-dabf")
    assert len(done.rounds) == 2 and done.best_round is not None

    killed = "20261201-175656-a-killed-fox-97c4"
    resumed = gcr("resume", killed, "--runs-dir", runs, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    run = intact(runs, killed)
    assert run.status == "completed" and len(run.rounds) == 3 and run.error is None
    assert {r.seed for r in run.rounds} == {22}  # the seed the old run recorded
    shown = gcr("show", "batch-20261130", "--runs-dir", runs, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "interrupted"


def test_a_store_from_a_newer_gcr_is_refused_and_left_untouched(tmp_path, fake):
    runs = old_store(tmp_path)
    db = sqlite3.connect(runs / "gcr.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = (runs / "gcr.sqlite3").read_bytes()
    for args in (["runs"], ["show", "last"], ["refine", "a fox", *FAST]):
        result = gcr(*args, "--runs-dir", runs)
        assert result.exit_code == 2, result.output
        line = one_sentence(result.stderr)
        assert "newer gcr" in line and "99" in line and "upgrade" in line
    assert (runs / "gcr.sqlite3").read_bytes() == before  # not migrated, not written


def test_migrations_are_numbered_in_order_and_applied_once(tmp_path):
    names = [m.__name__ for m in migrations.MIGRATIONS]
    assert names == sorted(names) and all(re.fullmatch(rf"m{i:03d}_\w+", n) for i, n in enumerate(names, 1))
    runs = old_store(tmp_path)
    stores = [RunStore(runs), RunStore(runs)]  # the second open finds nothing left to do
    assert all(s.version == migrations.SCHEMA_VERSION for s in stores)
    db = sqlite3.connect(runs / "gcr.sqlite3")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "rounds", "batches", "batch_jobs", "owners"} <= tables
    assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 3  # nothing lost


def test_a_file_that_is_not_a_store_is_refused_in_one_sentence(tmp_path, fake):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "gcr.sqlite3").write_bytes(b"this is a text file, not SQLite\n" * 100)
    for args in (["runs"], ["refine", "a fox", *FAST]):
        result = gcr(*args, "--runs-dir", runs)
        assert result.exit_code == 2, result.output
        assert "not a gcr run store" in one_sentence(result.stderr)


# -- a runs directory that cannot be written (as root, chmod stops nothing: these really fail) --

def test_a_file_where_the_runs_directory_must_be_is_a_usage_error(tmp_path, fake):
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a directory")
    for runs in (blocker, blocker / "inside"):
        result = gcr("refine", "a fox", *FAST, "--runs-dir", runs)
        assert result.exit_code == 2, result.output
        assert "is a file" in one_sentence(result.stderr) and "--runs-dir" in result.stderr
    assert blocker.read_text() == "a file, not a directory"


def test_a_directory_where_the_database_must_be_is_a_usage_error(tmp_path, fake):
    runs = tmp_path / "runs"
    (runs / "gcr.sqlite3").mkdir(parents=True)
    result = gcr("refine", "a fox", *FAST, "--runs-dir", runs)
    assert result.exit_code == 2, result.output
    assert "is a directory" in one_sentence(result.stderr)


def test_a_read_only_file_system_refuses_writers_and_serves_readers(tmp_path, fake):
    """A read-only mount (root ignores permission bits, not a read-only file system)."""
    prefix = can_mount()
    if prefix is None:
        pytest.skip("cannot mount a file system here (no mount namespace): a read-only one needs it")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    made = in_namespace(prefix, f"mount -t tmpfs -o size=256k tmpfs {fresh} && mount -o remount,ro {fresh} && "
                        + cli("refine", "a fox", *FAST, "--runs-dir", fresh / "runs"))
    assert made.returncode == 2, made.stderr
    assert "read-only" in one_sentence(made.stderr)

    runs = tmp_path / "runs"
    assert gcr("refine", "a fox", *FAST, "--rounds", "2", "--runs-dir", runs).exit_code == 0
    ro = f"mount --bind {runs} {runs} && mount -o remount,bind,ro {runs} && "
    listed = in_namespace(prefix, ro + cli("runs", "--runs-dir", runs, "--json"))
    assert listed.returncode == 0, listed.stderr
    assert [r["status"] for r in json.loads(listed.stdout)] == ["completed"]
    for args in (["resume", "last"], ["refine", "another fox", *FAST]):
        refused = in_namespace(prefix, ro + cli(*args, "--runs-dir", runs))
        assert refused.returncode == 2, refused.stderr
        assert "read-only" in one_sentence(refused.stderr)
    intact(runs, only_run(runs))


# -- faults while a run is going ---------------------------------------------------------------

def fail_png_at(monkeypatch, round_index: int, error: OSError) -> None:
    """The disk refuses the image of round `round_index` (the store's own PNG writer fails)."""
    real = store_module._write_png

    def write(image, path, info):
        if info.get("gcr:round") == str(round_index):
            raise error
        return real(image, path, info)

    monkeypatch.setattr(store_module, "_write_png", write)


@pytest.mark.parametrize("error,cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (OSError(errno.EFBIG, "File too large"), "file-size limit"),
    (OSError(errno.EIO, "Input/output error"), "I/O error"),
])
def test_an_image_write_failing_mid_run_fails_the_run_and_keeps_its_rounds(tmp_path, fake, monkeypatch,
                                                                          error, cause):
    runs = tmp_path / "runs"
    fail_png_at(monkeypatch, 3, error)
    result = gcr("refine", "a fox", *FAST, "--rounds", "5", "--patience", "9", "--runs-dir", runs)
    assert result.exit_code == 1, result.output
    line = one_sentence(result.stderr)
    run_id = only_run(runs)
    assert cause in line and "round 3" in line and f"gcr resume {run_id}" in line
    run = intact(runs, run_id)
    assert run.status == "failed" and cause in run.error
    assert [r.index for r in run.rounds] == [1, 2]
    assert not list((runs / run_id).glob("*.tmp"))  # no half-written image left behind


def test_an_sqlite_io_error_from_a_store_method_mid_run_is_one_sentence(tmp_path, fake, monkeypatch):
    """A raw sqlite3 error escaping a store method (here injected into record_round) still ends the
    run failed with one sentence naming the cause."""
    runs = tmp_path / "runs"
    real = RunStore.record_round

    def record_round(self, run, round_, images, metadata=None):
        if round_.index == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, run, round_, images, metadata)

    monkeypatch.setattr(RunStore, "record_round", record_round)
    result = gcr("refine", "a fox", *FAST, "--rounds", "4", "--patience", "9", "--runs-dir", runs)
    assert result.exit_code == 1, result.output
    line = one_sentence(result.stderr)
    assert "I/O error" in line and "round 2" in line and "gcr resume" in line
    run = intact(runs, only_run(runs))
    assert run.status == "failed" and "I/O error" in run.error and len(run.rounds) == 1


def test_a_database_that_cannot_be_written_at_all_leaves_an_interrupted_run(tmp_path, fake, monkeypatch):
    """The disk fills before the run's end can be recorded: the row cannot say `failed`, so it reads
    as interrupted (its owner is gone) and can be resumed once there is space again."""
    runs = tmp_path / "runs"
    full = sqlite3.OperationalError("database or disk is full")
    real_record, real_finish = RunStore.record_round, RunStore.finish_run
    state = {"full": False, "fills_at": 3}

    def record_round(self, run, round_, images, metadata=None):
        if round_.index == state["fills_at"]:
            state["full"] = True
        if state["full"]:
            raise full
        return real_record(self, run, round_, images, metadata)

    def finish_run(self, run_id, **kw):
        if state["full"]:
            raise full
        return real_finish(self, run_id, **kw)

    monkeypatch.setattr(RunStore, "record_round", record_round)
    monkeypatch.setattr(RunStore, "finish_run", finish_run)
    result = gcr("refine", "a fox", *FAST, "--rounds", "5", "--patience", "9", "--seed", "4", "--runs-dir", runs)
    assert result.exit_code == 1, result.output
    assert "the disk is full" in one_sentence(result.stderr)
    run_id = only_run(runs)
    run = intact(runs, run_id)
    assert run.status == "interrupted" and len(run.rounds) == 2
    listed = gcr("runs", "--runs-dir", runs, "--json")
    assert json.loads(listed.stdout)[0]["status"] == "interrupted"

    state.update(full=False, fills_at=None)  # space again: the run goes on from round 3 with its seed
    resumed = gcr("resume", run_id, "--runs-dir", runs, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    run = intact(runs, run_id)
    assert run.status == "completed" and len(run.rounds) == 5 and {r.seed for r in run.rounds} == {4}


def test_resume_after_a_storage_fault_gives_what_an_uninterrupted_run_gives(tmp_path, fake, monkeypatch):
    reference = gcr("refine", "a fox", *FAST, "--rounds", "5", "--patience", "9", "--seed", "9",
                    "--runs-dir", tmp_path / "ref")
    assert reference.exit_code == 0
    runs = tmp_path / "runs"
    with monkeypatch.context() as m:
        fail_png_at(m, 4, OSError(errno.ENOSPC, "No space left on device"))
        assert gcr("refine", "a fox", *FAST, "--rounds", "5", "--patience", "9", "--seed", "9",
                   "--runs-dir", runs).exit_code == 1
    run_id = only_run(runs)
    resumed = gcr("resume", run_id[:16], "--runs-dir", runs, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "completed"
    assert round_results(intact(runs, run_id)) == round_results(intact(tmp_path / "ref", only_run(tmp_path / "ref")))


def test_a_file_size_limit_fails_the_run_without_killing_the_process(tmp_path):
    """ulimit -f in a real process: SIGXFSZ would kill it outright; gcr ignores the signal, so the
    write fails with EFBIG (or SQLite's I/O error) and is reported."""
    import resource

    runs = tmp_path / "runs"
    limit = 200_000  # the write-ahead log reaches this after a few rounds

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, _, err = finish(spawn("refine", "a fox", *FAST, "--rounds", "80", "--patience", "99",
                                "--runs-dir", runs, preexec_fn=limited))
    assert code == 1, err  # not -SIGXFSZ
    assert "file-size limit" in one_sentence(err) and "ulimit -f" in err
    run = intact(runs, only_run(runs))
    assert run.status in ("failed", "interrupted") and 1 <= len(run.rounds) < 80


def test_a_full_disk_mid_run_is_one_sentence_and_keeps_every_round(tmp_path):
    """The real thing: a small tmpfs fills up while a real process writes rounds to it."""
    prefix = can_mount()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (no mount namespace) to fill up")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    done = in_namespace(prefix, f"mount -t tmpfs -o size=160k tmpfs {disk} && "
                        + cli("refine", "a fox", *FAST, "--rounds", "80", "--patience", "99", "--runs-dir", disk / "runs")
                        + f"; echo $? > {tmp_path}/code; cp -r {disk}/runs {kept}")
    assert (tmp_path / "code").read_text().strip() == "1", done.stderr
    assert "the disk is full" in one_sentence(done.stderr)
    run = intact(kept, only_run(kept))
    assert run.status in ("failed", "interrupted") and len(run.rounds) >= 1


def test_a_full_disk_at_a_known_round_in_a_real_process(tmp_path):
    """/dev/full in place of a coming round's image (placed while the process is stopped): every
    write there fails with ENOSPC, as root too. The run fails with the rounds before it; resume ends it."""
    runs = tmp_path / "runs"
    proc = spawn("refine", "a fox", *FAST, "--rounds", "6", "--patience", "99", "--runs-dir", runs, delay=0.2)
    wait_for(runs, 1, proc)
    os.kill(proc.pid, signal.SIGSTOP)
    n = committed(runs)
    run_id = only_run(runs)
    os.symlink("/dev/full", runs / run_id / f"round-{n + 2:02d}.png.tmp")
    os.kill(proc.pid, signal.SIGCONT)
    code, _, err = finish(proc)
    assert code == 1, err
    line = one_sentence(err)
    assert "the disk is full" in line and f"round {n + 2}" in line
    run = intact(runs, run_id)
    assert run.status == "failed" and len(run.rounds) == n + 1
    code, _, err = finish(spawn("resume", run_id, "--runs-dir", runs, "--quiet"))
    assert code == 0, err
    run = intact(runs, run_id)
    assert run.status == "completed" and len(run.rounds) == 6


# -- kill -9, Ctrl-C, and what a status means --------------------------------------------------

def test_a_live_run_shows_running_with_its_owner_and_a_killed_one_interrupted(tmp_path, fake):
    runs = tmp_path / "runs"
    proc = spawn("refine", "a fox", *FAST, "--rounds", "12", "--patience", "99", "--seed", "3",
                 "--runs-dir", runs, delay=0.1)
    wait_for(runs, 2, proc)
    run_id = only_run(runs)
    live = gcr("show", run_id, "--runs-dir", runs, "--json")
    record = json.loads(live.stdout)
    assert record["status"] == "running" and record["owner"]["pid"] == proc.pid and record["owner"]["host"] == HOST
    assert f"process {proc.pid}" in gcr("show", run_id, "--runs-dir", runs).stdout

    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    listed = json.loads(gcr("runs", "--runs-dir", runs, "--json").stdout)
    assert listed[0]["status"] == "interrupted"
    shown = gcr("show", run_id, "--runs-dir", runs, "--json")
    record = json.loads(shown.stdout)
    assert record["status"] == "interrupted" and record["owner"] is None and f"process {proc.pid}" in record["error"]
    assert "gcr resume" in gcr("show", run_id, "--runs-dir", runs).stdout
    kept = len(intact(runs, run_id).rounds)
    assert kept >= 2

    code, _, err = finish(spawn("resume", run_id, "--runs-dir", runs, "--quiet"))
    assert code == 0, err
    ref = gcr("refine", "a fox", *FAST, "--rounds", "12", "--patience", "99", "--seed", "3",
              "--runs-dir", tmp_path / "ref")
    assert ref.exit_code == 0
    assert round_results(intact(runs, run_id)) == round_results(intact(tmp_path / "ref", only_run(tmp_path / "ref")))


def test_a_killed_batch_reads_interrupted_and_resume_finishes_every_round_once(tmp_path):
    path = batch_file(tmp_path, [{"id": f"j{i}", "prompt": f"job {i}"} for i in range(3)], rounds=6)
    runs = tmp_path / "runs"
    proc = spawn("batch", path, "--runs-dir", runs, "--quiet", delay=0.1)
    wait_for(runs, 4, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    store = RunStore(runs)
    batch = store.get_batch(store.latest_batch_for(str(path.resolve()))["id"])
    assert batch["status"] == "interrupted"
    shown = json.loads(gcr("show", batch["id"], "--runs-dir", runs, "--json").stdout)
    assert shown["status"] == "interrupted"
    assert "running" not in {j["status"] for j in shown["jobs"]}
    assert "running" not in {r["status"] for r in json.loads(gcr("runs", "--runs-dir", runs, "--json").stdout)}

    code, out, err = finish(spawn("batch", path, "--runs-dir", runs, "--resume", "--json", "--quiet"))
    assert code == 0, err
    record = json.loads(out)
    assert record["status"] == "completed" and {j["status"] for j in record["jobs"]} == {"completed"}
    for j in record["jobs"]:
        assert len(intact(runs, j["run_id"]).rounds) == 6


def test_ctrl_c_in_a_batch_prints_the_exact_resume_command(tmp_path):
    path = batch_file(tmp_path, [{"id": "a", "prompt": "job a"}, {"id": "b", "prompt": "job b"}], rounds=30)
    runs = tmp_path / "my runs"
    proc = spawn("batch", path, "--runs-dir", runs, "--quiet", delay=0.1)
    wait_for(runs, 2, proc)
    os.kill(proc.pid, signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    line = one_sentence(err)
    assert f"`gcr batch {path} --resume --runs-dir '{runs}'`" in line
    store = RunStore(runs)
    batch = store.get_batch(store.latest_batch_for(str(path.resolve()))["id"])
    assert batch["status"] == "interrupted"
    for j in batch["jobs"]:
        if j["run_id"]:
            assert intact(runs, j["run_id"]).status == "interrupted"


# -- one owner at a time -----------------------------------------------------------------------

def interrupted_run(tmp_path: Path, rounds=30) -> tuple[Path, str]:
    runs = tmp_path / "runs"
    proc = spawn("refine", "a fox", *FAST, "--rounds", rounds, "--patience", "99", "--runs-dir", runs, delay=0.05)
    wait_for(runs, 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return runs, only_run(runs)


def test_two_resumes_of_one_run_at_once_one_refuses_naming_the_other(tmp_path):
    runs, run_id = interrupted_run(tmp_path, rounds=12)
    # Rounds of 0.5 s: the winner is still at work when the other one, started with it, looks.
    procs = [spawn("resume", run_id, "--runs-dir", runs, "--quiet", delay=0.5) for _ in range(2)]
    outcomes = [finish(p) for p in procs]
    codes = [code for code, _, _ in outcomes]
    assert sorted(codes) == [0, 2], outcomes
    winner, (_, _, err) = procs[codes.index(0)], outcomes[codes.index(2)]
    line = one_sentence(err)
    assert f"process {winner.pid} on {HOST}" in line and run_id in line
    run = intact(runs, run_id)
    assert run.status == "completed" and len(run.rounds) == 12


def test_resume_refuses_while_the_run_is_live(tmp_path):
    runs = tmp_path / "runs"
    proc = spawn("refine", "a fox", *FAST, "--rounds", "40", "--patience", "99", "--runs-dir", runs, delay=0.1)
    wait_for(runs, 1, proc)
    refused = gcr("resume", "last", "--runs-dir", runs)
    assert refused.exit_code == 2
    assert f"process {proc.pid} on {HOST}" in one_sentence(refused.stderr)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert intact(runs, only_run(runs)).status == "interrupted"


def test_two_batch_resumes_started_together_one_refuses_and_every_round_is_stored_once(tmp_path):
    path = batch_file(tmp_path, [{"id": f"j{i}", "prompt": f"job {i}"} for i in range(3)], rounds=8)
    runs = tmp_path / "runs"
    proc = spawn("batch", path, "--runs-dir", runs, "--quiet", delay=0.05)
    wait_for(runs, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()

    procs = [spawn("batch", path, "--runs-dir", runs, "--resume", "--json", "--quiet", delay=0.5)
             for _ in range(2)]  # rounds of 0.5 s: the winner is still at work when the other looks
    outcomes = [finish(p) for p in procs]
    assert sorted(code for code, _, _ in outcomes) == [0, 2], outcomes
    winner = procs[[code for code, _, _ in outcomes].index(0)]
    err = next(e for code, _, e in outcomes if code == 2)
    line = one_sentence(err)
    assert "IntegrityError" not in err and f"process {winner.pid} on {HOST}" in line
    record = json.loads(next(o for code, o, _ in outcomes if code == 0))
    assert record["status"] == "completed"
    for j in record["jobs"]:
        assert len(intact(runs, j["run_id"]).rounds) == 8


def test_a_batch_resume_refuses_while_one_of_its_runs_is_resumed_elsewhere(tmp_path):
    path = batch_file(tmp_path, [{"id": "a", "prompt": "job a"}, {"id": "b", "prompt": "job b"}], rounds=40)
    runs = tmp_path / "runs"
    proc = spawn("batch", path, "--runs-dir", runs, "--quiet", delay=0.05)
    wait_for(runs, 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    run_id = next(j["run_id"] for j in RunStore(runs).get_batch(
        RunStore(runs).latest_batch_for(str(path.resolve()))["id"])["jobs"] if j["run_id"])

    solo = spawn("resume", run_id, "--runs-dir", runs, "--quiet", delay=0.1)
    deadline = time.monotonic() + 30
    while gcr("show", run_id, "--runs-dir", runs, "--json").stdout.count('"running"') == 0:
        assert time.monotonic() < deadline and solo.poll() is None
        time.sleep(0.05)
    refused = gcr("batch", path, "--runs-dir", runs, "--resume", "--quiet")
    assert refused.exit_code == 2
    assert f"process {solo.pid} on {HOST}" in one_sentence(refused.stderr)
    os.kill(solo.pid, signal.SIGKILL)
    solo.communicate()
    assert RunStore(runs).get_batch(RunStore(runs).latest_batch_for(str(path.resolve()))["id"])["status"] \
        == "interrupted"  # the refused resume did not take the batch over


# -- resume ------------------------------------------------------------------------------------

def test_resume_of_a_completed_run_says_so_in_one_sentence(tmp_path, fake):
    runs = tmp_path / "runs"
    assert gcr("refine", "a fox", *FAST, "--rounds", "2", "--runs-dir", runs).exit_code == 0
    result = gcr("resume", "last", "--runs-dir", runs)
    assert result.exit_code == 0
    assert "is complete" in one_sentence(result.stderr)
    assert len(intact(runs, only_run(runs)).rounds) == 2


def test_resume_of_a_run_whose_critic_failed_redoes_that_round(tmp_path, fake, monkeypatch):
    runs = tmp_path / "runs"
    real = fake_gcr.judge
    calls = {"n": 0}

    def flaky(request, call_index, image):  # the critic server is down from the second round on
        calls["n"] += 1
        if calls["n"] >= 2:
            raise ConnectionError("critic server down")
        return real(request, call_index, image)

    monkeypatch.setattr(fake_gcr, "judge", flaky)
    first = gcr("refine", "a fox", *FAST, "--rounds", "4", "--patience", "9", "--seed", "1", "--runs-dir", runs)
    assert first.exit_code == 1
    run = intact(runs, only_run(runs))
    assert run.status == "failed" and [r.error is not None for r in run.rounds] == [False, True]
    assert Path(run.rounds[1].candidates[0].image).is_file()  # the unjudged image was kept

    monkeypatch.setattr(fake_gcr, "judge", real)  # the server is back
    resumed = gcr("resume", run.id, "--runs-dir", runs, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    run = intact(runs, run.id)
    assert run.status == "completed" and run.error is None and len(run.rounds) == 4
    assert all(r.error is None and r.overall is not None for r in run.rounds)  # round 2 redone, once


def test_resume_needs_the_source_image_of_an_edit_run(tmp_path, fake, monkeypatch):
    runs = tmp_path / "runs"
    source = tmp_path / "house.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(source)
    fail_png_at(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    assert gcr("refine", "make it red", *FAST, "--task", "edit", "--image", source, "--rounds", "3",
               "--runs-dir", runs).exit_code == 1
    source.unlink()
    result = gcr("resume", "last", "--runs-dir", runs)
    assert result.exit_code == 2
    assert str(source) in one_sentence(result.stderr) and "put it back" in result.stderr
    run = intact(runs, only_run(runs))
    assert run.status == "failed" and len(run.rounds) == 1


def test_resume_of_an_unknown_run_is_a_usage_error(tmp_path, fake):
    runs = tmp_path / "runs"
    assert gcr("refine", "a fox", *FAST, "--rounds", "1", "--runs-dir", runs).exit_code == 0
    result = gcr("resume", "no-such-run", "--runs-dir", runs)
    assert result.exit_code == 2 and "gcr runs" in one_sentence(result.stderr)


# -- batches: one job's failure is recorded, the others go on ----------------------------------

def run_batch_json(path, runs, *extra):
    result = gcr("batch", path, "--runs-dir", runs, "--json", "--quiet", *extra)
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def test_a_job_whose_generator_fails_is_recorded_and_the_others_finish(tmp_path, fake, monkeypatch):
    path = batch_file(tmp_path, [{"id": "good", "prompt": "a good job"}, {"id": "bad", "prompt": "a broken job"},
                                 {"id": "also", "prompt": "another good job"}])
    runs = tmp_path / "runs"
    monkeypatch.setenv("GCR_FAKE_FAIL_ON", "broken")
    result, record = run_batch_json(path, runs)
    assert result.exit_code == 1
    line = one_sentence(result.stderr)
    assert "1 of 3 jobs failed" in line and "bad (" in line and "cannot draw" in line and "--resume" in line
    jobs = {j["id"]: j for j in record["jobs"]}
    assert record["status"] == "failed" and jobs["bad"]["status"] == "failed" and "cannot draw" in jobs["bad"]["error"]
    assert jobs["good"]["status"] == jobs["also"]["status"] == "completed"
    assert len(intact(runs, jobs["good"]["run_id"]).rounds) == 3

    monkeypatch.delenv("GCR_FAKE_FAIL_ON")  # fixed: --resume retries the failed job only
    result, record = run_batch_json(path, runs, "--resume")
    assert result.exit_code == 0, result.output
    assert record["status"] == "completed" and {j["status"] for j in record["jobs"]} == {"completed"}
    assert len(intact(runs, {j["id"]: j for j in record["jobs"]}["bad"]["run_id"]).rounds) == 3


def test_a_job_whose_critic_fails_is_recorded_and_the_others_finish(tmp_path, fake, monkeypatch):
    path = batch_file(tmp_path, [{"id": "ok", "prompt": "fine"}, {"id": "judged-badly", "prompt": "unjudgeable"}])
    runs = tmp_path / "runs"
    monkeypatch.setenv("GCR_FAKE_CRITIC_FAIL_ON", "unjudgeable")
    result, record = run_batch_json(path, runs)
    assert result.exit_code == 1
    assert "judged-badly (critique failed" in one_sentence(result.stderr)
    jobs = {j["id"]: j for j in record["jobs"]}
    assert jobs["ok"]["status"] == "completed" and jobs["judged-badly"]["status"] == "failed"
    bad = intact(runs, jobs["judged-badly"]["run_id"])
    assert bad.rounds[0].error and Path(bad.rounds[0].candidates[0].image).is_file()


def test_a_job_whose_model_dir_is_not_a_model_fails_alone(tmp_path, fake):
    """Past --check (it names a pipeline) but holds no model: the real loader fails on it."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    path = batch_file(tmp_path, [{"id": "good", "prompt": "fine"},
                                 {"id": "nomodel", "prompt": "bad", "generator": str(not_a_model)}])
    runs = tmp_path / "runs"
    result, record = run_batch_json(path, runs)
    assert result.exit_code == 1
    line = one_sentence(result.stderr)
    assert "nomodel (models could not be loaded" in line and str(not_a_model) in line
    jobs = {j["id"]: j for j in record["jobs"]}
    assert jobs["good"]["status"] == "completed" and jobs["nomodel"]["status"] == "failed"
    assert jobs["nomodel"]["run_id"] is None and str(not_a_model) in jobs["nomodel"]["error"]
    assert len(intact(runs, jobs["good"]["run_id"]).rounds) == 3


def test_a_loader_crashing_unexpectedly_fails_its_jobs_only(tmp_path, fake, monkeypatch):
    from gcr import runner

    patched = runner.ModelCache.generator

    def generator(self, opts, log, **kw):
        if opts.generator == "fake/crashing":
            raise RuntimeError("segment table corrupt")
        return patched(self, opts, log, **kw)

    monkeypatch.setattr(runner.ModelCache, "generator", generator)
    path = batch_file(tmp_path, [{"id": "good", "prompt": "fine"},
                                 {"id": "crash", "prompt": "x", "generator": "fake/crashing"}])
    result, record = run_batch_json(path, tmp_path / "runs")
    assert result.exit_code == 1
    assert "RuntimeError: segment table corrupt" in one_sentence(result.stderr)
    assert [j["status"] for j in record["jobs"]] == ["completed", "failed"]


def test_a_storage_fault_mid_batch_stops_it_resumably_with_the_exact_command(tmp_path, fake, monkeypatch):
    path = batch_file(tmp_path, [{"id": f"j{i}", "prompt": f"job {i}"} for i in range(3)], rounds=4)
    runs = tmp_path / "runs"
    with monkeypatch.context() as m:
        fail_png_at(m, 3, OSError(errno.ENOSPC, "No space left on device"))
        result = gcr("batch", path, "--runs-dir", runs, "--quiet")
    assert result.exit_code == 1
    line = one_sentence(result.stderr)
    assert "the disk is full" in line and f"`gcr batch {path} --resume --runs-dir {runs}`" in line
    store = RunStore(runs)
    batch = store.get_batch(store.latest_batch_for(str(path.resolve()))["id"])
    assert batch["status"] == "failed"
    for j in batch["jobs"]:
        run = intact(runs, j["run_id"])
        assert run.status == "failed" and [r.index for r in run.rounds] == [1, 2]

    result, record = run_batch_json(path, runs, "--resume")
    assert result.exit_code == 0, result.output
    assert record["status"] == "completed"
    assert all(len(intact(runs, j["run_id"]).rounds) == 4 for j in record["jobs"])


def test_refine_and_resume_end_a_failing_run_alike(tmp_path, fake, monkeypatch):
    """A run whose critic fails: refine and resume both exit 1 with the reason as their one sentence on
    stderr (also under --json, whose record carries it), and the failed round stays stored."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("GCR_FAKE_CRITIC_FAIL_ON", "unjudgeable")
    first = gcr("refine", "an unjudgeable fox", *FAST, "--rounds", "2", "--runs-dir", runs)
    assert first.exit_code == 1, first.output
    run_id = only_run(runs)
    reason = one_sentence(first.stderr)
    assert "cannot judge" in reason and f"continue with `gcr resume {run_id} --runs-dir {runs}`" in reason
    assert RunStore(runs, write=False).get_run(run_id).status == "failed"

    again = gcr("resume", run_id, "--runs-dir", runs, "--json", "--quiet")
    assert again.exit_code == 1, again.output
    assert "cannot judge" in one_sentence(again.stderr)
    record = json.loads(again.stdout)
    assert record["status"] == "failed" and "cannot judge" in record["error"]
    assert intact(runs, run_id).rounds[0].error
