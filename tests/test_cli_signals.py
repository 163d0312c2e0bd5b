"""A real `gcr refine` process killed or interrupted mid-run keeps every completed round."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app
from gcr.errors import OutOfMemory
from gcr.store import RunStore
from tests.fakes import FakeGenerator, ScriptedCritic, critique_text

ROOT = Path(__file__).parents[1]


def start_refine(tiny_dir, runs_dir):
    cmd = [sys.executable, "-m", "gcr.cli", "refine", "a slow fox", "-g", str(tiny_dir("flux")),
           "--critic", str(tiny_dir("critic")), "--rounds", "100", "--patience", "100", "--steps", "2",
           "--width", "32", "--height", "32", "--device", "cpu", "--max-new-tokens", "16", "--quiet",
           "--runs-dir", str(runs_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rounds(runs_dir, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (runs_dir / "gcr.sqlite3").exists():
            rows = RunStore(runs_dir).list_runs()
            if rows and rows[0]["n_rounds"] >= n:
                return rows[0]["id"]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("no rounds appeared")


@pytest.mark.parametrize("sig,status,code", [(signal.SIGKILL, "running", -9), (signal.SIGINT, "interrupted", 130)])
def test_killed_or_interrupted_refine_keeps_every_completed_round(tmp_path, tiny_dir, sig, status, code):
    runs_dir = tmp_path / "runs"
    proc = start_refine(tiny_dir, runs_dir)
    run_id = wait_for_rounds(runs_dir, 2, proc)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    run = RunStore(runs_dir).get_run(run_id)  # the store opens
    assert run.status == status
    assert len(run.rounds) >= 2
    assert [r.index for r in run.rounds] == list(range(1, len(run.rounds) + 1))
    for r in run.rounds:
        with Image.open(r.image) as im:
            im.load()
    if sig == signal.SIGINT:
        assert "completed rounds are kept" in stderr


def test_out_of_memory_mid_run_names_the_flag_and_keeps_rounds(tmp_path, monkeypatch):
    """The CLI path for CUDA OOM, with a generator double that runs out of memory in round 2."""
    class OomOnSecondRound(FakeGenerator):
        def generate(self, requests):
            if len(self.calls) == 1:
                raise OutOfMemory("the generator ran out of GPU memory: try --offload model "
                                  "(or --offload sequential).")
            return super().generate(requests)

    from gcr import runner
    monkeypatch.setattr(runner.ModelCache, "generator", lambda self, opts, log: OomOnSecondRound())
    monkeypatch.setattr(runner.ModelCache, "critic",
                        lambda self, opts, task, log: ScriptedCritic(lambda *a: critique_text(2, 2)))
    result = CliRunner().invoke(app, ["refine", "a fox", "-g", "flux-dev", "--runs-dir", str(tmp_path),
                                      "--quiet"])
    assert result.exit_code == 1
    assert "--offload model" in result.stderr and "Traceback" not in result.output
    run = RunStore(tmp_path).get_run("last")
    assert run.status == "failed" and len(run.rounds) == 1 and "--offload" in run.error
