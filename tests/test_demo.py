"""`gcr demo`: offline, on the CPU, a refine + a batch + a report on tiny models, and commands to try next."""
import json
import shlex

from typer.testing import CliRunner

from gcr.cli import app
from gcr.store import RunStore

runner = CliRunner()


def test_demo_scores_rounds_refines_the_prompt_and_prints_commands_that_run(tmp_path):
    home = tmp_path / "home"
    result = runner.invoke(app, ["demo", "--runs-dir", str(home)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "tiny RANDOM models" in result.stderr and "building" in result.stderr

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
