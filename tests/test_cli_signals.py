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


# A process killed with -9 cannot write its status: its run reads as interrupted because its owner is gone.
@pytest.mark.parametrize("sig,status,code", [(signal.SIGKILL, "interrupted", -9), (signal.SIGINT, "interrupted", 130)])
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
        assert "completed rounds are kept" in stderr and f"gcr resume {run_id}" in stderr


def test_out_of_memory_mid_run_names_the_flag_and_keeps_rounds(tmp_path, monkeypatch):
    """The CLI path for CUDA OOM, with a generator double that runs out of memory in round 2."""
    class OomOnSecondRound(FakeGenerator):
        def generate(self, requests):
            if len(self.calls) == 1:
                raise OutOfMemory("the generator ran out of GPU memory: try --offload model "
                                  "(or --offload sequential).")
            return super().generate(requests)

    from gcr import runner
    monkeypatch.setattr(runner.ModelCache, "generator", lambda self, opts, log, **kw: OomOnSecondRound())
    monkeypatch.setattr(runner.ModelCache, "critic",
                        lambda self, opts, task, log, **kw: ScriptedCritic(lambda *a: critique_text(2, 2)))
    result = CliRunner().invoke(app, ["refine", "a fox", "-g", "flux-dev", "--runs-dir", str(tmp_path),
                                      "--quiet"])
    assert result.exit_code == 1
    assert "--offload model" in result.stderr and "Traceback" not in result.output
    run = RunStore(tmp_path).get_run("last")
    assert run.status == "failed" and len(run.rounds) == 1 and "--offload" in run.error


def test_out_of_memory_retries_the_round_once_under_a_more_conservative_plan(tmp_path, monkeypatch):
    """On a GPU the runner holds a memory plan; an OOM re-places the models one step down and the
    failed round runs again (stored once), instead of ending the run."""
    from gcr import memory, runner

    class OomOnce(FakeGenerator):
        def generate(self, requests):
            if len(self.calls) == 1 and not getattr(self, "failed", False):
                self.failed = True
                raise OutOfMemory("out of memory")
            return super().generate(requests)

    placed = []
    plan = memory.make_plan(memory.RESIDENT, 80 * memory.GiB, memory.Footprint(1, 1, 1), memory.Footprint(1, 1, 1))
    monkeypatch.setattr(runner, "choose_memory_plan", lambda opts, task, device, log: plan)
    monkeypatch.setattr(memory, "apply_plan", lambda p, g, c, device: (placed.append(p.name), (g, c))[1])
    monkeypatch.setattr(runner.ModelCache, "generator", lambda self, opts, log, **kw: OomOnce())
    monkeypatch.setattr(runner.ModelCache, "critic",
                        lambda self, opts, task, log, **kw: ScriptedCritic(lambda *a: critique_text(2, 2)))
    result = CliRunner().invoke(app, ["refine", "a fox", "-g", "flux-dev", "--runs-dir", str(tmp_path),
                                      "--rounds", "3", "--patience", "5", "--on-converged", "reseed"])
    assert result.exit_code == 0, result.output
    assert placed == [memory.RESIDENT, memory.OFFLOAD_MODEL]  # first plan, then one step down
    assert "retrying the round" in result.stderr
    run = RunStore(tmp_path).get_run("last")
    assert run.status == "completed" and [r.index for r in run.rounds] == [1, 2, 3]
