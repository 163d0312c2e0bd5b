"""Batches exit like refine (3 when nothing could be scored), and a resume says what it skips and
what it continues. Models are doubles; the batch file, loop, store and CLI are the real code."""
import json

import yaml
from typer.testing import CliRunner

from gcr.cli import app
from gcr.store import RunStore
from tests.fakes import ScriptedCritic, critique_text, use_fake_models

runner = CliRunner()


def batch_file(tmp_path, jobs, rounds=3, **defaults):
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"generator": "flux-dev", "rounds": rounds, "patience": 10,
                                                 "seed": 1, **defaults},
                                    "jobs": [{"id": j, "prompt": f"a {j}"} for j in jobs]}))
    return path


def batch(tmp_path, path, *args):
    return runner.invoke(app, ["batch", str(path), "--runs-dir", str(tmp_path / "runs"), *args],
                         env={"COLUMNS": "80"})


def test_a_batch_with_nothing_scored_exits_3_like_refine(tmp_path, monkeypatch):
    use_fake_models(monkeypatch, ScriptedCritic(lambda *a: "not a critique"))
    result = batch(tmp_path, batch_file(tmp_path, ["fox", "cat"], rounds=2))
    assert result.exit_code == 3, result.output
    said = " ".join(result.stderr.split())
    assert "no round of any job could be scored" in said and "gcr show RUN --round 1" in said
    single = runner.invoke(app, ["refine", "a fox", "-g", "flux-dev", "--rounds", "2", "--quiet",
                                 "--runs-dir", str(tmp_path / "solo")])
    assert single.exit_code == 3  # the same outcome, the same code


def test_a_batch_with_anything_scored_exits_0(tmp_path, monkeypatch):
    use_fake_models(monkeypatch, ScriptedCritic(
        lambda request, call, image: critique_text(2.0, 2.0) if "fox" in request else "not a critique"))
    result = batch(tmp_path, batch_file(tmp_path, ["fox", "cat"], rounds=1), "--json")
    assert result.exit_code == 0, result.output
    assert [j["best_overall"] for j in json.loads(result.stdout)["jobs"]] == [2.0, None]


def test_on_converged_in_a_batch_file(tmp_path, monkeypatch):
    use_fake_models(monkeypatch, ScriptedCritic(lambda *a: critique_text(2.0, 2.0, refined="the same")))
    path = batch_file(tmp_path, ["stops"], rounds=4)
    spec = yaml.safe_load(path.read_text())
    spec["jobs"].append({"id": "reseeds", "prompt": "a reseeds", "on_converged": "reseed"})
    path.write_text(yaml.safe_dump(spec))
    record = json.loads(batch(tmp_path, path, "--json").stdout)
    store = RunStore(tmp_path / "runs")
    runs = {j["id"]: store.get_run(j["run_id"]) for j in record["jobs"]}
    assert runs["stops"].stop_reason == "converged" and len(runs["stops"].rounds) == 2
    assert runs["reseeds"].stop_reason == "max_rounds" and [r.seed for r in runs["reseeds"].rounds] == [1, 1, 2, 3]
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("on_converged: reseed", "on_converged: retry"))
    result = batch(tmp_path, bad, "--check")
    assert result.exit_code == 2 and "on_converged must be one of stop, reseed" in result.stderr


def test_a_resume_says_what_it_skips_continues_and_starts(tmp_path, monkeypatch):
    use_fake_models(monkeypatch, ScriptedCritic(
        lambda request, call, image: critique_text(2.0, 2.0, refined=f"{request}, take {call}")))
    path = batch_file(tmp_path, ["done", "halfway", "fresh"], rounds=4)
    first = json.loads(batch(tmp_path, path, "--json").stdout)
    store = RunStore(tmp_path / "runs")
    ids = {j["id"]: j["run_id"] for j in first["jobs"]}
    # As a crash would leave it: "halfway" interrupted after 2 of its rounds, "fresh" never started.
    store.db.execute("DELETE FROM rounds WHERE run_id = ? AND idx > 2", (ids["halfway"],))
    store.update_run(ids["halfway"], status="interrupted")
    store.set_batch_job(first["id"], "fresh", run_id=None, fingerprint=
                        store.get_batch(first["id"])["jobs"][2]["fingerprint"], position=2)

    result = batch(tmp_path, path, "--resume")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert (f"resuming batch {first['id']}: skipping 1 finished job (done); continuing 1 job (halfway at "
            "round 3); starting 1 job from round 1 (fresh)") in said
    halfway = store.get_run(ids["halfway"])
    assert [r.index for r in halfway.rounds] == [1, 2, 3, 4] and halfway.status == "completed"


def test_the_batch_summary_fits_80_columns_with_four_dimensions_and_long_job_ids(tmp_path, monkeypatch):
    from PIL import Image
    from rich.cells import cell_len

    from tests.fakes import FakeGenerator

    use_fake_models(monkeypatch, ScriptedCritic(lambda *a: critique_text(2.25, 3.5, tr=2.0, imf=3.75),
                                                task="edit"), FakeGenerator("edit"))
    Image.new("RGB", (16, 16)).save(tmp_path / "house.png")
    long_id = "an-edit-job-whose-identifier-is-as-long-as-a-batch-file-allows-0"  # 64 characters
    path = tmp_path / "edits.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"generator": "flux-kontext", "image": "house.png", "rounds": 2},
                                    "jobs": [{"id": long_id, "prompt": "make the sky stormy " * 12},
                                             {"id": "short", "prompt": "make it night"}]}))
    result = batch(tmp_path, path)
    assert result.exit_code == 0, result.output
    assert all(cell_len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    assert "…" not in result.stdout and long_id in result.stdout
    for value in ("Image", "Rendering", "Quality", "2.88", "3.75", "2.00", "completed"):
        assert value in result.stdout
