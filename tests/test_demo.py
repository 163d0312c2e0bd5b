"""`gcr demo`: offline, on the CPU, a refine + a batch + a report on tiny models, and commands to try next."""
import json
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

from typer.testing import CliRunner

from gcr.cli import app
from gcr.store import RunStore

runner = CliRunner()


def test_demo_scores_rounds_refines_the_prompt_and_prints_commands_that_run(tmp_path):
    # A process of its own, with $HOME an empty folder: the demo (models built and taught, a refine, a
    # batch, a report) must write nothing there (no hub, torch or matplotlib caches), only its runs home.
    home, user_home = tmp_path / "home", tmp_path / "user-home"
    user_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "XDG_"))}
    proc = subprocess.run([sys.executable, "-m", "gcr.cli", "demo", "--runs-dir", str(home)], cwd=tmp_path,
                          env={**env, "HOME": str(user_home), "COLUMNS": "80"}, capture_output=True, text=True,
                          timeout=900)
    result = SimpleNamespace(exit_code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr,
                             output=proc.stdout + proc.stderr)
    assert result.exit_code == 0, result.output
    assert "tiny RANDOM models" in result.stderr and "building" in result.stderr
    assert list(user_home.rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "user-home"]  # nothing in the cwd either

    store = RunStore(home)
    runs = [store.get_run(r["id"]) for r in store.list_runs(10)]
    assert len(runs) == 3  # the refine and the two batch jobs
    solo = next(r for r in runs if r.batch_id is None)
    assert solo.status == "completed" and solo.best_round is not None
    assert any(r.overall is not None for r in solo.rounds)
    assert solo.rounds[1].prompt != solo.rounds[0].prompt   # the critic's refined request was followed
    assert all(r.status == "completed" and r.best_round for r in runs)
    [report] = (home / "reports").glob("*/index.html")
    assert str(report.relative_to(home)) in result.stdout.replace("\n", "")

    # The printed commands are real: the next refine runs as printed, on the cached models.
    tried = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("gcr ")]
    assert [t.split()[1] for t in tried] == ["refine", "batch", "show", "report"]
    args = shlex.split(tried[0])[1:] + ["--json", "--quiet"]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["rounds"][0]["overall"] is not None

    # A second demo reuses the cached models instead of building and teaching them again.
    second = runner.invoke(app, ["demo", "--runs-dir", str(home)])
    assert second.exit_code == 0, second.output
    assert "building" not in second.stderr
