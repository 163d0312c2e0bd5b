"""`gcr score`: images as arguments and manifests (YAML, JSONL, CSV), batched critiques through the real
store, curation that never overwrites, exit codes, and a killed job continued with --resume."""
import csv
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from rich.cells import cell_len
from typer.testing import CliRunner

from gcr.cli import app
from gcr.store import RunStore
from tests.fakes import ScriptedCritic, critique_text

runner = CliRunner()
ROOT = Path(__file__).parents[1]


def invoke(*args, width=200):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})


def painted(path: Path, score: float, size=(16, 16)) -> Path:
    """An image whose red channel tells the scripted critic what to score it (see `by_colour`)."""
    Image.new("RGB", size, (round(score * 50), 40, 90)).save(path)
    return path


def by_colour(task):
    """A critique whose every dimension is the score painted into the image (red / 50); red 0 makes an
    unreadable critique and red 5 an incomplete one (3.5 everywhere, text rendering cut off)."""
    def script(request, call, image):
        red = image.getpixel((0, 0))[0]
        if red == 0:
            return "I cannot judge this."
        score = 3.5 if red == 5 else red / 50
        text = critique_text(tf=score, pq=score, tr=score, imf=score if task == "edit" else None,
                             refined=f"{request}, better", summary=f"scored {score:g}")
        return text.split("Text Rendering")[0] if red == 5 else text
    return script


@pytest.fixture
def critics(monkeypatch):
    """Score on scripted critics, one per task, as ModelCache hands out real ones: every call recorded."""
    from gcr import runner as gcr_runner

    made = {}

    def critic(self, opts, task, log, **kw):
        if task not in made:
            log(f"loading critic for {task}")
            made[task] = ScriptedCritic(by_colour(task), task=task)
        return made[task]

    monkeypatch.setattr(gcr_runner.ModelCache, "critic", critic)
    return made


def results(result):
    assert result.stdout.strip(), result.output
    return json.loads(result.stdout)


# -- must-show 1: images as arguments, and a manifest with a text-to-image and an edit entry ---------


def test_images_given_as_arguments_get_one_result_each(tmp_path, critics):
    images = [painted(tmp_path / f"img{i}.png", s) for i, s in enumerate((2.0, 3.5, 1.5))]
    result = invoke("score", *images, "--prompt", "a fox reading a newspaper", "--runs-dir", tmp_path / "runs",
                    "--json")
    assert result.exit_code == 0, result.output
    out = results(result)
    assert [r["image"] for r in out] == [str(p) for p in images]
    assert [r["overall"] for r in out] == [2.0, 3.5, 1.5]
    for r in out:
        assert r["prompt"] == "a fox reading a newspaper" and r["task"] == "t2i" and r["source"] is None
        assert r["complete"] is True and r["problems"] == [] and r["id"] is None
        assert set(r["scores"]) == {"text_faithfulness", "physical_quality", "text_rendering"}
        assert r["refined_request"] == "a fox reading a newspaper, better" and r["summary"].startswith("scored")
    # One batched critic call for the three, against the ORIGINAL prompt.
    assert [len(call) for call in critics["t2i"].calls] == [3]
    assert {r.request for r in critics["t2i"].calls[0]} == {"a fox reading a newspaper"}
    # The job is in the store: `gcr show` prints it again.
    job = RunStore(tmp_path / "runs").find_score_job("score-")
    assert job["status"] == "completed" and job["items"] == job["scored"] == 3
    shown = invoke("show", job["id"], "--runs-dir", tmp_path / "runs")
    assert shown.exit_code == 0 and "3.50" in shown.stdout and "completed: 3 of 3 images scored" in shown.stdout
    record = json.loads(invoke("show", job["id"], "--runs-dir", tmp_path / "runs", "--json").stdout)
    assert [r["overall"] for r in record["results"]] == [2.0, 3.5, 1.5]


def test_an_edit_given_as_arguments_uses_the_edit_critic_with_the_source(tmp_path, critics):
    source = painted(tmp_path / "house.png", 1.0)
    edited = painted(tmp_path / "stormy.png", 3.0)
    out = results(invoke("score", edited, "--source", source, "--prompt", "make the sky stormy", "--runs-dir",
                         tmp_path / "runs", "--json"))
    assert len(out) == 1 and out[0]["task"] == "edit" and out[0]["source"] == str(source)
    assert out[0]["scores"]["image_faithfulness"] == 3.0 and out[0]["complete"]
    request = critics["edit"].calls[0][0]
    assert request.source_image.getpixel((0, 0)) == (50, 40, 90)  # the source went to the critic
    assert "t2i" not in critics


MANIFESTS = {
    "yaml": ("- image: cat.png\n  prompt: a cat on a mat\n"
             "- id: storm\n  image: edits/stormy.png\n  source: house.png\n  prompt: make the sky stormy\n"),
    "jsonl": ('{"image": "cat.png", "prompt": "a cat on a mat"}\n\n'
              '{"id": "storm", "image": "edits/stormy.png", "source": "house.png", "prompt": "make the sky stormy"}\n'),
    "csv": ("image,prompt,source,id,notes\ncat.png,a cat on a mat,,,from the web\n"
            "edits/stormy.png,make the sky stormy,house.png,storm,\n"),
}


def manifest_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    (folder / "edits").mkdir(parents=True)
    painted(folder / "cat.png", 2.5)
    painted(folder / "house.png", 1.0)
    painted(folder / "edits" / "stormy.png", 3.3)
    return folder


@pytest.mark.parametrize("fmt", sorted(MANIFESTS))
def test_a_manifest_with_a_text_to_image_and_an_edit_entry(tmp_path, critics, fmt):
    folder = manifest_dir(tmp_path)
    path = folder / f"manifest.{fmt}"
    path.write_text(MANIFESTS[fmt])
    result = invoke("score", path, "--runs-dir", tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.output
    cat, storm = results(result)
    # Relative paths start at the manifest's folder, whatever the working directory.
    assert cat["image"] == str(folder / "cat.png") and cat["task"] == "t2i" and cat["overall"] == 2.5
    assert (storm["id"], storm["task"], storm["source"]) == ("storm", "edit", str(folder / "house.png"))
    assert storm["scores"]["image_faithfulness"] == 3.3 and storm["overall"] == 3.3 and storm["complete"]
    assert critics["t2i"].calls[0][0].request == "a cat on a mat"
    assert critics["edit"].calls[0][0].request == "make the sky stormy"


def test_a_served_critic_scores_a_manifest_end_to_end(tmp_path):
    """No double at all on gcr's side: a real OpenAI-compatible HTTP server on 127.0.0.1 writes the
    critiques; the edit entry's request carries both images."""
    from tests.critic_server import FakeServer, request_of

    server = FakeServer().start()
    try:
        def answer(body):
            images = [p for p in body["messages"][1]["content"] if p["type"] == "image_url"]
            request = request_of(body)
            score = 3.5 if "cat" in request else 2.25
            return critique_text(tf=score, pq=score, imf=score if len(images) == 2 else None, refined=request + "!")

        server.answer = answer
        folder = manifest_dir(tmp_path)
        (folder / "m.jsonl").write_text(MANIFESTS["jsonl"])
        result = invoke("score", folder / "m.jsonl", "--critic-url", server.url, "--runs-dir", tmp_path / "runs",
                        "--min-overall", "3", "--json")
        assert result.exit_code == 0, result.output
        cat, storm = results(result)
        assert (cat["overall"], cat["kept"], cat["refined_request"]) == (3.5, True, "a cat on a mat!")
        assert (storm["overall"], storm["kept"], storm["scores"]["image_faithfulness"]) == (2.25, False, 2.25)
        assert sorted(len([p for p in b["messages"][1]["content"] if p["type"] == "image_url"])
                      for _, b in server.posts) == [1, 2]
    finally:
        server.stop()


def test_the_real_critic_loads_once_and_unreadable_critiques_exit_3(tmp_path, tiny_dir, monkeypatch):
    """The real loader and tiny critic: one load serves both tasks, every image gets a result (a random
    critic writes nothing readable: unscored, retried once), and nothing scorable is exit code 3."""
    from gcr.critics import inprocess

    loads = []
    real = inprocess.load_critic
    monkeypatch.setattr(inprocess, "load_critic", lambda *a, **k: loads.append(k["task"]) or real(*a, **k))
    folder = manifest_dir(tmp_path)
    (folder / "m.yaml").write_text(MANIFESTS["yaml"])
    result = invoke("score", folder / "m.yaml", "--critic", tiny_dir("critic"), "--device", "cpu",
                    "--max-new-tokens", "16", "--runs-dir", tmp_path / "runs", "--json")
    assert result.exit_code == 3, result.output
    out = results(result)
    assert [r["task"] for r in out] == ["t2i", "edit"]
    assert all(r["overall"] is None and r["attempts"] == 2 and r["problems"] for r in out)
    assert loads == ["t2i"]  # the edit entry got the same weights with the edit prompt


# -- the unit of work a cluster worker runs --------------------------------------------------------


def test_score_group_is_plain_data_in_and_plain_records_out(tmp_path, critics):
    """What a Ray worker will call: items (bytes or paths) and options as plain data, a ModelCache, and
    a stream of JSON-ready records, one list per batched critic call; no store, no terminal."""
    import io

    from gcr.runner import ModelCache, ModelOptions, options_to_dict
    from gcr.scoring import ScoreItem, score_group
    from gcr.strictjson import dumps

    def png(score):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (round(score * 50), 40, 90)).save(buffer, format="PNG")
        return buffer.getvalue()

    items = [ScoreItem(position=i + 1, image=f"/elsewhere/{i}.png", prompt="a fox", image_data=png(s)).to_dict()
             for i, s in enumerate((2.0, 3.0, 3.5))]
    items.append(ScoreItem(position=4, image="/elsewhere/e.png", prompt="make it blue", source="/elsewhere/s.png",
                           image_data=png(2.5), source_data=png(1.0)).to_dict())
    payload = {"items": items, "options": options_to_dict(ModelOptions(generator="none", device="cpu")),
               "batch_size": 2}
    json.loads(dumps(payload | {"items": [{**i, "image_data": None, "source_data": None} for i in items]}))
    with ModelCache() as cache:
        batches = list(score_group(payload, cache))
    assert [[r["position"] for r in batch] for batch in batches] == [[1, 2], [3], [4]]
    records = [r for batch in batches for r in batch]
    assert [r["overall"] for r in records] == [2.0, 3.0, 3.5, 2.5]
    assert records[3]["task"] == "edit" and records[3]["scores"]["image_faithfulness"] == 2.5
    assert json.loads(dumps(records)) == records  # plain, strict JSON: it can cross a process boundary


# -- must-show 2: curation ----------------------------------------------------------------------


def curation_set(folder: Path) -> dict:
    """Images whose overall is known: the name says it (`u`: unscored, `i`: incomplete)."""
    folder.mkdir(parents=True, exist_ok=True)
    scores = {"a": 1.5, "b": 2.9, "c": 3.0, "d": 3.2, "e": 3.9, "u": 0.0, "i": 0.1}
    return {name: painted(folder / f"{name}.png", s) for name, s in scores.items()}


@pytest.mark.parametrize("flag", ["--copy-to", "--move-to"])
def test_min_overall_keeps_exactly_the_images_at_or_above_it(tmp_path, critics, flag):
    images = curation_set(tmp_path / "in")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "d.png").write_bytes(b"already here")  # a name that exists is never overwritten
    result = invoke("score", *images.values(), "--prompt", "a fox", "--min-overall", "3.0", flag, keep,
                    "--runs-dir", tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.output
    out = {Path(r["image"]).stem: r for r in results(result)}
    assert {n for n, r in out.items() if r["kept"]} == {"c", "d", "e"}
    assert out["i"]["complete"] is False and out["u"]["overall"] is None  # never pass a filter
    assert sorted(p.name for p in keep.iterdir()) == ["c.png", "d-2.png", "d.png", "e.png"]
    assert (keep / "d.png").read_bytes() == b"already here"
    how = "moved_to" if flag == "--move-to" else "copied_to"
    assert out["d"][how] == str(keep / "d-2.png")
    for name, red in (("c", 150), ("d", 160), ("e", 195)):
        assert Image.open(out[name][how]).getpixel((0, 0)) == (red, 40, 90)  # the image itself went there
        assert images[name].exists() == (flag == "--copy-to")
    assert all(images[n].exists() for n in "abui")  # what did not pass stays where it was


def test_per_dimension_minimums_and_the_same_job_twice_copies_once(tmp_path, critics, monkeypatch):
    images = curation_set(tmp_path / "in")
    keep = tmp_path / "keep"
    args = ["score", *images.values(), "--prompt", "a fox", "--min", "Text=3.1", "--min", "physical_quality=3",
            "--copy-to", keep, "--csv", tmp_path / "scores.csv", "--runs-dir", tmp_path / "runs"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in keep.iterdir()) == ["d.png", "e.png"]
    again = invoke(*args, "--resume")  # a completed job: nothing scored again, nothing copied again
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in keep.iterdir()) == ["d.png", "e.png"]
    assert len(critics["t2i"].calls) == 2  # the first job's call and its retry; none by the resume
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [Path(r["image"]).stem for r in rows] == list(images)
    assert {Path(r["image"]).stem for r in rows if r["kept"] == "True"} == {"d", "e"}
    assert rows[0]["text_rendering"] == "1.5" and rows[5]["overall"] == ""  # unscored: empty, not 0


def test_kept_file_names_are_sanitized_and_never_collide(tmp_path, critics):
    folder = tmp_path / "in"
    (folder / "other").mkdir(parents=True)
    painted(folder / "..weird name [1].PNG", 3.5)
    painted(folder / "two.png", 3.5)
    painted(folder / "other" / "two.png", 3.5)
    (folder / "m.jsonl").write_text('{"image": "two.png", "prompt": "x", "id": "..hidden"}\n')
    bad = invoke("score", folder / "m.jsonl", "--runs-dir", tmp_path / "runs")
    assert bad.exit_code == 2 and "m.jsonl:1" in bad.stderr and "file-name safe" in bad.stderr
    (folder / "m.jsonl").write_text('{"image": "..weird name [1].PNG", "prompt": "x"}\n'
                                    '{"image": "two.png", "prompt": "y", "id": "a.b-c_d"}\n'
                                    '{"image": "other/two.png", "prompt": "y"}\n')
    result = invoke("score", folder / "m.jsonl", "--min-overall", "1", "--copy-to", tmp_path / "keep",
                    "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["two-2.png", "two.png", "weird_name_1.png"]


# -- manifests: every problem at once, with line numbers, before anything loads ---------------


BAD = {
    "yaml": ("- image: gone.png\n  prompt: a\n- image: ok.png\n  promt: b\n- image: ok.png\n  prompt: ''\n"
             "- just a string\n- image: ok.png\n  prompt: c\n  id: x\n- image: ok.png\n  prompt: d\n  id: X\n",
             [1, 3, 5, 7, 11]),
    "jsonl": ('{"image": "gone.png", "prompt": "a"}\n{"image": "ok.png", "promt": "b"}\n{"image": "ok.png", '
              '"prompt": ""}\n[1]\n{"image": "ok.png", "prompt": NaN}\n{not json\n', [1, 2, 3, 4, 5, 6]),
    "csv": ('image,prompt,source\ngone.png,a,\nok.png,"",\nok.png,"two\nlines",bad.png\nok.png,c,,extra\n',
            [2, 3, 4, 6]),
}


@pytest.mark.parametrize("fmt", sorted(BAD))
def test_manifest_problems_are_listed_with_line_numbers_and_nothing_runs(tmp_path, monkeypatch, fmt):
    from gcr import runner as gcr_runner

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded for an invalid manifest")

    monkeypatch.setattr(gcr_runner.ModelCache, "critic", no_loading)
    painted(tmp_path / "ok.png", 3.0)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    text, lines = BAD[fmt]
    path = tmp_path / f"m.{fmt}"
    path.write_text(text)
    result = invoke("score", path, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "nothing was scored" in result.stderr
    found = sorted({int(line.split(f"m.{fmt}:")[1].split()[0].rstrip(":")) for line in result.stderr.splitlines()
                    if f"m.{fmt}:" in line})
    assert found == lines, result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written, nothing loaded


def test_manifest_messages_name_the_fix(tmp_path):
    painted(tmp_path / "ok.png", 3.0)
    (tmp_path / "h.csv").write_text("img,promt\nok.png,x\n")
    result = invoke("score", tmp_path / "h.csv", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "did you mean 'img'" in result.stderr and "h.csv:1" in result.stderr
    (tmp_path / "dup.yaml").write_text("- image: ok.png\n  prompt: x\n- image: ./ok.png\n  prompt: x\n")
    result = invoke("score", tmp_path / "dup.yaml", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "dup.yaml:3" in result.stderr and "on line 1" in result.stderr
    (tmp_path / "m.txt").write_text("")
    result = invoke("score", tmp_path / "m.yaml", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "no such file" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["IMG"], "need --prompt"),
    (["MANIFEST", "--prompt", "x"], "--prompt and --source are for images given as arguments"),
    (["MANIFEST", "IMG"], "one manifest"),
    (["IMG", "--prompt", "x", "--min-overall", "5"], "--min-overall must be a score from 1 to 4"),
    (["IMG", "--prompt", "x", "--min", "sharpness=3"], "unknown dimension 'sharpness'"),
    (["IMG", "--prompt", "x", "--min", "text"], "not NAME=VALUE"),
    (["IMG", "--prompt", "x", "--copy-to", "A", "--move-to", "B"], "pass one"),
    (["IMG", "--prompt", "x", "--copy-to", "IMG"], "is a file, not a folder"),
    (["IMG", "--prompt", "x", "--critic", "rationalrewards-edit"], "judges edit results"),
    (["IMG", "--prompt", "x", "--judge", "clipscor"], "did you mean 'clipscore'"),
    (["IMG", "--prompt", "x", "--judge", "./no-such-clip"], "does not exist"),
    (["GONE", "--prompt", "x"], "does not exist"),
])
def test_usage_errors_are_one_sentence_and_exit_2(tmp_path, args, message):
    img = painted(tmp_path / "img.png", 3.0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("- image: img.png\n  prompt: x\n")
    names = {"IMG": img, "MANIFEST": manifest, "GONE": tmp_path / "gone.png", "A": tmp_path / "a",
             "B": tmp_path / "b"}
    result = invoke("score", *[names.get(a, a) for a in args], "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output


# -- failures, exit codes, output ---------------------------------------------------------------


def test_an_image_whose_critique_fails_is_recorded_the_others_kept_and_resume_redoes_it(tmp_path, monkeypatch):
    from gcr import runner as gcr_runner

    broken = {"on": True}

    def script(request, call, image):
        if broken["on"] and image.getpixel((0, 0))[0] == 100:
            raise RuntimeError("the critic choked")
        return by_colour("t2i")(request, call, image)

    monkeypatch.setattr(gcr_runner.ModelCache, "critic", lambda self, opts, task, log, **kw: ScriptedCritic(script))
    images = [painted(tmp_path / f"{i}.png", s) for i, s in enumerate((1.5, 2.0, 2.5))]
    args = ["score", *images, "--prompt", "a fox", "--runs-dir", tmp_path / "runs", "--json"]
    first = invoke(*args)
    assert first.exit_code == 1, first.output
    out = results(first)
    assert [r["overall"] for r in out] == [1.5, None, 2.5]
    assert "the critic choked" in out[1]["error"] and "--resume" in first.stderr
    broken["on"] = False
    second = invoke(*args, "--resume")
    assert second.exit_code == 0, second.output
    assert [r["overall"] for r in results(second)] == [1.5, 2.0, 2.5]


def test_the_table_fits_80_columns_and_never_cuts_a_score(tmp_path, critics):
    folder = tmp_path / ("a-very-long-folder-name-for-a-data-set-of-images" * 2)
    folder.mkdir()
    images = [painted(folder / f"image-number-{i}-with-a-long-descriptive-name.png", s)
              for i, s in enumerate((2.5, 0.1, 3.3))]
    for width in (80, 60):
        result = invoke("score", *images, "--prompt", "a lighthouse " * 20, "--min-overall", "3",
                        "--runs-dir", tmp_path / f"runs{width}", width=width)
        assert result.exit_code == 0, result.output
        for line in result.stdout.splitlines():
            assert cell_len(line) <= width, line
        flat = " ".join(result.stdout.split())
        assert "…" not in result.stdout
        for value in ("2.50", "3.30", "3.50*", "text_rendering:", "yes"):
            assert value in flat.split(), value
        assert "1 kept (overall >= 3)" in flat


# -- must-show 4: killed mid-way, continued with --resume, each image scored once --------------


def fake_gcr(*args):
    return [sys.executable, "-m", "tests.fake_gcr", *[str(a) for a in args]]


def stored_scores(runs: Path) -> int:
    if not (runs / "gcr.sqlite3").exists():
        return 0
    db = sqlite3.connect(f"file:{runs / 'gcr.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def twelve(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(12):
        Image.new("RGB", (16, 16), (i * 20, 100, 200 - i * 10)).save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"image": f"{i:02d}.png", "prompt": f"picture number {i}", "id": f"img-{i:02d}"}))
    (folder / "twelve.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "twelve.jsonl"


def critiqued(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def test_a_job_killed_mid_way_and_resumed_scores_each_image_once(tmp_path):
    manifest, runs = twelve(tmp_path), tmp_path / "runs"
    env = {**os.environ, "COLUMNS": "200", "GCR_FAKE_CRITIC_DELAY": "0.3"}
    before_log, after_log = tmp_path / "before.log", tmp_path / "after.log"
    args = ["score", manifest, "--critic", "fake", "--batch-size", "2", "--runs-dir", runs, "--quiet"]
    proc = subprocess.Popen(fake_gcr(*args), cwd=ROOT, env={**env, "GCR_FAKE_CRITIC_LOG": str(before_log)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while stored_scores(runs) < 4:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = RunStore(runs)
    job = store.find_score_job("score-")
    assert job["status"] == "interrupted"  # its owner is gone: not `running`
    kept = {r["prompt"] for r in store.scores(job["id"])}
    store.close()
    assert 4 <= len(kept) < 12

    final = subprocess.run(fake_gcr(*args, "--resume", "--json"), cwd=ROOT, capture_output=True, text=True,
                           env={**env, "GCR_FAKE_CRITIC_DELAY": "0", "GCR_FAKE_CRITIC_LOG": str(after_log)})
    assert final.returncode == 0, final.stderr
    out = json.loads(final.stdout)
    assert [r["id"] for r in out] == [f"img-{i:02d}" for i in range(12)]  # one result per image, in order
    assert all(r["overall"] is not None for r in out)
    # The resume critiqued exactly the images the killed process had not stored: none twice.
    assert sorted(critiqued(after_log)) == sorted({f"picture number {i}" for i in range(12)} - kept)
    store = RunStore(runs)
    assert store.get_score_job(job["id"])["status"] == "completed"
    assert len(store.scores(job["id"])) == 12


def test_a_second_resume_refuses_while_one_runs_and_ctrl_c_prints_the_resume_command(tmp_path):
    manifest, runs = twelve(tmp_path), tmp_path / "runs"
    env = {**os.environ, "COLUMNS": "300", "GCR_FAKE_CRITIC_DELAY": "3"}
    args = ["score", manifest, "--critic", "fake", "--batch-size", "2", "--min-overall", "1.5", "--runs-dir", runs]
    proc = subprocess.Popen(fake_gcr(*args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while stored_scores(runs) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    second = subprocess.run(fake_gcr(*args, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert f"process {proc.pid}" in second.stderr and "Traceback" not in second.stderr

    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    command = stderr.split("continue with `", 1)[1].split("`", 1)[0]
    assert command.endswith("--resume") and "--min-overall 1.5" in command and str(manifest) in command
    store = RunStore(runs)
    assert store.find_score_job("score-")["status"] == "interrupted"
    store.close()
    argv = shlex.split(command)  # as the CLI was started: `gcr score ...` (here `python -m tests.fake_gcr score ...`)
    done = subprocess.run(fake_gcr(*argv[argv.index("score"):]), cwd=ROOT, env={**env, "GCR_FAKE_CRITIC_DELAY": "0"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "12 images: 12 scored" in " ".join(done.stdout.split())


def test_a_store_from_before_score_jobs_is_migrated_and_scores(tmp_path, critics):
    """m003_scores: a store written before `gcr score` existed opens, gains the tables, and keeps its runs."""
    from gcr import migrations
    from tests.test_faults_store import old_store

    runs = old_store(tmp_path)
    image = painted(tmp_path / "one.png", 3.0)
    result = invoke("score", image, "--prompt", "a fox", "--runs-dir", runs, "--json")
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(runs / "gcr.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
    assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 3  # the old runs' rounds are all there


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_written_as_text(tmp_path, critics):
    image = painted(tmp_path / "a.png", 3.0)
    prompt = '=HYPERLINK("http://evil.example","click")'
    result = invoke("score", image, "--prompt", prompt, "--csv", tmp_path / "s.csv", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    [row] = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert row["prompt"] == "'" + prompt                       # shown as text, never evaluated
    assert row["refined_request"] == "'" + prompt + ", better"
    assert row["overall"] == "3.0" and row["image"] == str(image)   # numbers and paths untouched
