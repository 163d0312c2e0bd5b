"""`gcr batch` end to end on tiny models: load once, batched rounds, equal to solo runs, resumable."""
import json
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

runner = CliRunner()
ROOT = Path(__file__).parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return {"flux": tiny_dir("flux"), "kontext": tiny_dir("flux-kontext"), "critic": tiny_dir("critic")}


def twelve_jobs(tmp_path, tiny, rounds=3) -> Path:
    """12 jobs: 8 text-to-image, 4 edits, mixed seeds and candidates, sharing two generators."""
    Image.new("RGB", (32, 32), (200, 120, 40)).save(tmp_path / "src.png")
    jobs = [{"id": f"t2i-{i:02d}", "prompt": f"a tiny test scene number {i}", "seed": 100 + i,
             **({"candidates": 2} if i % 3 == 0 else {})} for i in range(8)]
    jobs += [{"id": f"edit-{i}", "prompt": f"edit number {i}", "image": "src.png", "generator": str(tiny["kontext"]),
              "seed": 7 * i} for i in range(4)]
    spec = {"defaults": {"generator": str(tiny["flux"]), "critic": str(tiny["critic"]), "rounds": rounds,
                         "patience": rounds,
                         "steps": 2, "width": 32, "height": 32, "device": "cpu", "max_new_tokens": 16},
            "jobs": jobs}
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_twelve_jobs_load_models_once_batch_critiques_and_equal_solo_runs(tmp_path, tiny, monkeypatch):
    from gcr.critics.inprocess import TransformersCritic

    calls = []
    real = TransformersCritic.critique

    def spy(self, requests, retry=False):
        calls.append((self.task, len(requests), retry))
        return real(self, requests, retry=retry)

    monkeypatch.setattr(TransformersCritic, "critique", spy)
    path = twelve_jobs(tmp_path, tiny)
    result = invoke("batch", path, "--runs-dir", tmp_path / "runs", "--batch-size", 12, "--json")
    assert result.exit_code == 3, result.output  # like refine: completed, nothing scorable from a random critic
    record = json.loads(result.stdout)
    assert record["status"] == "completed" and len(record["jobs"]) == 12
    assert all(j["status"] == "completed" and j["run_id"] for j in record["jobs"])

    log = result.stderr
    assert log.count("loading generator") == 2, log  # tiny flux and tiny kontext, once each
    assert log.count("loading critic") == 1, log     # one critic checkpoint serves both tasks

    # Round k of the 8 t2i jobs (11 images with candidates) is ONE critic call, then one retry call.
    first_calls = [c for c in calls if not c[2]]
    assert ("t2i", 11, False) in first_calls and ("edit", 4, False) in first_calls
    assert len(first_calls) == 6  # 3 rounds x 2 groups

    batched = job_results(tmp_path / "runs", record)
    # The same jobs one by one: identical prompts, seeds, pixels and critiques.
    solo = invoke("batch", path, "--runs-dir", tmp_path / "solo", "--batch-size", 1, "--json")
    assert solo.exit_code == 3, solo.output
    assert job_results(tmp_path / "solo", json.loads(solo.stdout)) == batched

    shown = invoke("show", record["id"], "--runs-dir", tmp_path / "runs", "--json")
    assert json.loads(shown.stdout)["jobs"] == record["jobs"]
    table = invoke("compare", record["id"], "--runs-dir", tmp_path / "runs", "--sort", "job", "--asc")
    assert table.exit_code == 0 and "t2i-00" in table.stdout and "edit-3" in table.stdout
    rows = json.loads(invoke("compare", record["id"], "--runs-dir", tmp_path / "runs", "--json").stdout)
    assert sorted(r["job"] for r in rows) == sorted(j["id"] for j in record["jobs"])
    report = invoke("report", record["id"], "--runs-dir", tmp_path / "runs")
    assert report.exit_code == 0, report.output
    html = Path(report.stdout.strip()).read_text()
    assert all(j["run_id"] in html for j in record["jobs"])


def test_check_validates_without_loading(tmp_path, tiny):
    path = twelve_jobs(tmp_path, tiny)
    result = invoke("batch", path, "--check")
    assert result.exit_code == 0 and "12 valid jobs" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  - prompt: ok\n    stepz: 3\n  - prompt: ''\n")
    result = invoke("batch", bad, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "stepz" in result.stderr and ":3" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_without_a_batch_is_a_usage_error(tmp_path, tiny):
    path = twelve_jobs(tmp_path, tiny)
    result = invoke("batch", path, "--resume", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "without --resume" in result.stderr


def test_a_failing_job_is_recorded_and_the_batch_goes_on(tmp_path, tiny):
    spec = {"defaults": {"critic": str(tiny["critic"]), "rounds": 1, "steps": 2, "width": 32, "height": 32,
                         "device": "cpu", "max_new_tokens": 16},
            "jobs": [{"id": "good", "prompt": "fine", "generator": str(tiny["flux"])},
                     {"id": "broken", "prompt": "bad", "generator": str(tmp_path / "gone")}]}
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = invoke("batch", path, "--runs-dir", tmp_path / "runs", "--json")
    assert result.exit_code == 1, result.output
    jobs = {j["id"]: j for j in json.loads(result.stdout)["jobs"]}
    assert jobs["good"]["status"] == "completed"
    assert jobs["broken"]["status"] == "failed" and jobs["broken"]["error"]


def test_changed_unfinished_job_refuses_resume_without_force(tmp_path, tiny):
    path = twelve_jobs(tmp_path, tiny)
    runs = tmp_path / "runs"
    RunStore(runs)  # batch record with no job run yet: create it through a real start then edit
    spec = yaml.safe_load(path.read_text())
    from gcr.batch import prepare
    from gcr.batchfile import load_batch_file
    prepare(RunStore(runs), load_batch_file(path), resume=False, force=False)
    spec["jobs"][0]["prompt"] = "something else"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = invoke("batch", path, "--resume", "--runs-dir", runs)
    assert result.exit_code == 2 and "t2i-00" in result.stderr and "--force" in result.stderr


def _gcr(*args):
    return [sys.executable, "-m", "gcr.cli", *[str(a) for a in args]]


def committed_rounds(runs: Path) -> int:
    """Rounds committed so far, read straight from SQLite (a reader never blocks the writer)."""
    if not (runs / "gcr.sqlite3").exists():
        return 0
    db = sqlite3.connect(f"file:{runs / 'gcr.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        db.close()


def test_kill_and_resume_ten_times_completes_every_round_exactly_once(tmp_path, tiny):
    """Ten kill -9s, each landing right after the batch committed new rounds (so every kill is
    mid-batch, and each attempt makes progress), then --resume: every round exactly once, the same
    prompts, seeds, pixels and critiques as an uninterrupted batch, and nothing left `running`."""
    # 48 job-rounds in groups of 4: a kill lands within the burst of commits it observed, so an
    # attempt commits at most 4 job-rounds and ten kills (40 at most) always land mid-batch.
    path = twelve_jobs(tmp_path, tiny, rounds=4)
    group = ["--batch-size", "4"]
    reference = invoke("batch", path, "--runs-dir", tmp_path / "ref", "--json", *group)
    expected = job_results(tmp_path / "ref", json.loads(reference.stdout))

    runs = tmp_path / "runs"
    env = {**os.environ, "COLUMNS": "200"}
    for kill in range(10):
        before = committed_rounds(runs)
        log = tmp_path / f"attempt-{kill + 1}.log"
        with open(log, "w") as stderr:
            proc = subprocess.Popen(_gcr("batch", path, "--runs-dir", runs, "--quiet", *group,
                                         *(["--resume"] if kill else [])),
                                    env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        while committed_rounds(runs) == before:
            assert proc.poll() is None, f"attempt {kill + 1} ended before committing a round: {log.read_text()}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        store = RunStore(runs)
        batch = store.get_batch(store.latest_batch_for(str(path.resolve()))["id"])
        assert batch["status"] == "interrupted", kill  # its owner is gone: not `running`
        assert "running" not in {store.get_run(j["run_id"]).status for j in batch["jobs"] if j["run_id"]}
        store.close()
    final = subprocess.run(_gcr("batch", path, "--runs-dir", runs, "--resume", "--json", "--quiet", *group),
                           env=env, cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 3, final.stderr  # completed; a random critic scores nothing
    record = json.loads(final.stdout)
    assert record["status"] == "completed"
    assert all(j["status"] == "completed" for j in record["jobs"])
    got = job_results(runs, record)
    for job_id, rounds in got.items():
        assert [r[0] for r in rounds] == list(range(1, len(rounds) + 1)), job_id  # each round once
    assert got == expected


def test_check_json_and_report_options(tmp_path, tiny):
    spec = {"defaults": {"generator": str(tiny["flux"]), "critic": str(tiny["critic"]), "rounds": 1,
                         "steps": 2, "width": 32, "height": 32, "device": "cpu", "max_new_tokens": 16},
            "jobs": [{"id": "one", "prompt": "a single job"}]}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(spec))
    checked = invoke("batch", path, "--check", "--json")
    assert checked.exit_code == 0 and json.loads(checked.stdout) == {"file": str(path), "ok": True, "jobs": ["one"]}
    record = json.loads(invoke("batch", path, "--runs-dir", tmp_path / "runs", "--json", "--quiet").stdout)
    out_dir = tmp_path / "my-report"
    result = invoke("report", record["id"], "--runs-dir", tmp_path / "runs", "--out", out_dir, "--embed")
    assert result.exit_code == 0, result.output
    html = (out_dir / "index.html").read_text()
    assert Path(result.stdout.strip()) == out_dir / "index.html"
    assert "data:image/png;base64," in html and "round-01.png" not in html  # embedded, not linked
    assert list(out_dir.glob("contact-*.png"))
    single = invoke("report", record["jobs"][0]["run_id"], "--runs-dir", tmp_path / "runs")
    assert single.exit_code == 0 and Path(single.stdout.strip()).is_file()
