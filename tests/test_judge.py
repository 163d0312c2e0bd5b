"""The independent judge: CLIPScore and PickScore on a real (tiny) CLIP, stored with every candidate of
every round, shown by show, compare and the report, flagged when it disagrees with the critic, and
never a part of any decision."""
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from rich.cells import cell_len
from typer.testing import CliRunner

from gcr.cli import app
from gcr.records import Candidate, Round, Run
from gcr.store import RunStore
from tests.fakes import FakeGenerator, ScriptedCritic, critique_text, use_fake_models

runner = CliRunner()


def invoke(*args, width=200):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(width)})


@pytest.fixture(scope="module")
def clip(tiny_dir):
    return tiny_dir("clip")


def varied(request, call, image):
    """Scores that move with the image, and a refined request that never repeats (no `converged`)."""
    r, g, _ = image.getpixel((0, 0))
    return critique_text(tf=1 + r % 30 / 10, pq=1 + g % 30 / 10, refined=f"{request} #{call}-{r}-{g}")


# -- the formulas ---------------------------------------------------------------------------------


def test_clipscore_and_pickscore_are_the_published_formulas(clip):
    import torch
    from transformers import AutoProcessor, CLIPModel

    from gcr.judge import load_judge

    pairs = [("a red square", Image.new("RGB", (40, 24), (220, 10, 10))),
             ("a blue circle on a white table", Image.new("RGB", (16, 16), (10, 10, 220))),
             ("x" * 500, Image.new("RGB", (64, 64), (0, 0, 0)))]  # longer than CLIP reads: cut at 77 tokens
    clipscore = load_judge(str(clip), device="cpu").score(pairs)
    pickscore = load_judge(f"pickscore:{clip}", device="cpu").score(pairs)

    # The same numbers from the model's own logits (logit_scale.exp() * cos of every pair).
    model, processor = CLIPModel.from_pretrained(clip).eval(), AutoProcessor.from_pretrained(clip)
    inputs = processor(text=[t for t, _ in pairs], images=[i for _, i in pairs], return_tensors="pt",
                       padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal()
    cos = logits / model.logit_scale.exp()
    assert pickscore == pytest.approx(logits.tolist(), abs=1e-4)
    assert clipscore == pytest.approx([2.5 * max(c, 0.0) for c in cos.tolist()], abs=1e-4)
    assert len(set(clipscore)) == 3  # a tiny CLIP still tells pairs apart


def test_a_judge_spec_names_a_preset_a_directory_or_a_formula(clip, tmp_path):
    from gcr.errors import UsageError
    from gcr.judge import resolve_judge

    assert resolve_judge("pickscore").processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert (resolve_judge("pickscore").metric, resolve_judge("clipscore").metric) == ("pickscore", "clipscore")
    assert resolve_judge("clipscore").model == "openai/clip-vit-base-patch32"
    assert resolve_judge(str(clip)).metric == "clipscore"
    assert resolve_judge(f"pickscore:{clip}").model == str(Path(clip).resolve())
    assert resolve_judge("laion/CLIP-ViT-H-14-laion2B-s32B-b79K").metric == "clipscore"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        resolve_judge(str(tmp_path / "empty"))


# -- must-show 3: refine --judge DIR --json; compare --json ----------------------------------------


def test_every_round_and_candidate_of_refine_carries_the_judge_and_compare_shows_it(tmp_path, monkeypatch, clip):
    use_fake_models(monkeypatch, ScriptedCritic(varied))
    result = invoke("refine", "a red fox in the snow", "-g", "flux-dev", "--judge", clip, "--rounds", "3",
                    "--patience", "5", "--candidates", "2", "--seed", "4", "--runs-dir", tmp_path, "--json", "-q")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["settings"]["judge"]["metric"] == "clipscore" and run["settings"]["judge"]["id"] == str(clip)
    assert len(run["rounds"]) == 3
    for r in run["rounds"]:
        assert all(isinstance(c["judge"], float) for c in r["candidates"]), r
        assert r["judge"] == r["candidates"][r["chosen"]]["judge"]

    rows = json.loads(invoke("compare", run["id"], "--runs-dir", tmp_path, "--json").stdout)
    best = next(r for r in run["rounds"] if r["index"] == run["best_round"])
    assert rows[0]["judge"] == str(clip)
    assert rows[0]["judge_first"] == run["rounds"][0]["judge"] and rows[0]["judge_best"] == best["judge"]
    assert rows[0]["disagree"] == (rows[0]["gain"] > 0 and best["judge"] < run["rounds"][0]["judge"])

    shown = invoke("show", run["id"], "--runs-dir", tmp_path, width=80).stdout
    assert "judge" in shown.splitlines()[1] and f"{run['rounds'][1]['judge']:.3f}" in shown
    critique = invoke("show", run["id"], "--round", "2", "--candidate", "2", "--runs-dir", tmp_path).stdout
    assert f"judge {run['rounds'][1]['candidates'][1]['judge']:.3f}" in critique and "never optimized" in critique
    page = Path(invoke("report", run["id"], "--runs-dir", tmp_path).stdout.strip()).read_text()
    assert f"{run['rounds'][2]['judge']:.3f}" in page and "reported, never optimized" in page


def test_the_judge_never_changes_a_decision(tmp_path, monkeypatch, clip):
    """The same run with and without a judge: the same rounds, prompts, seeds, chosen candidates,
    critiques, best round and stop; only the judge's numbers are added."""
    def run(*extra):
        use_fake_models(monkeypatch, ScriptedCritic(varied))
        result = invoke("refine", "a lighthouse at night", "-g", "flux-dev", "--rounds", "4", "--patience", "2",
                        "--candidates", "4", "--seed", "11", "--runs-dir", tmp_path / str(len(extra)), "--json", "-q",
                        *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    plain, judged = run(), run("--judge", f"pickscore:{clip}")

    def decisions(r):
        return (r["best_round"], r["stop_reason"],
                [(x["prompt"], x["seed"], x["chosen"], x["next_prompt"], x["overall"],
                  [(c["seed"], c["raw_critique"], c["scores"]) for c in x["candidates"]]) for x in r["rounds"]])

    assert decisions(plain) == decisions(judged)
    assert all(c["judge"] is None for r in plain["rounds"] for c in r["candidates"])
    assert all(c["judge"] is not None for r in judged["rounds"] for c in r["candidates"])
    # The judge did have its own opinion: it would have chosen another candidate somewhere.
    assert any(max(range(4), key=lambda i: r["candidates"][i]["judge"]) != r["chosen"] for r in judged["rounds"])


def test_a_resumed_run_keeps_its_judge(tmp_path, monkeypatch, clip):
    class FailsOnce(FakeGenerator):
        failed = False

        def generate(self, requests):
            if len(self.calls) == 1 and not FailsOnce.failed:
                FailsOnce.failed = True
                self.calls.append(requests)
                raise RuntimeError("the GPU fell over")
            return super().generate(requests)

    use_fake_models(monkeypatch, ScriptedCritic(varied), FailsOnce())
    # A fixed seed and an unreachable target: round 1 may never end the run by itself.
    first = invoke("refine", "a fox", "-g", "flux-dev", "--judge", clip, "--rounds", "3", "--patience", "5",
                   "--seed", "4", "--target", "4", "--runs-dir", tmp_path, "-q")
    assert first.exit_code == 1, first.output
    resumed = invoke("resume", "last", "--runs-dir", tmp_path, "--json", "-q")
    assert resumed.exit_code == 0, resumed.output
    rounds = json.loads(resumed.stdout)["rounds"]
    assert [r["index"] for r in rounds] == [1, 2, 3] and all(r["judge"] is not None for r in rounds)


# -- the disagreement flag -------------------------------------------------------------------------


def judged_round(index, overall, judge):
    c = Candidate(seed=1, scores={"text_faithfulness": overall, "physical_quality": overall, "text_rendering": None},
                  overall=overall, judge=judge, refined_request="next", summary="ok")
    return Round(index, f"prompt {index}", (c,), timings={"total_s": 1.0})


@pytest.fixture
def disagreeing(tmp_path):
    """Three runs: critic up and judge down (flagged), both up, and a run without a judge."""
    store = RunStore(tmp_path / "runs")
    img = Image.new("RGB", (8, 8))
    made = {}
    for name, judge, overall in (("hacked", [0.91, 0.62], [2.0, 3.25]), ("agreed", [0.5, 0.8], [2.0, 3.0]),
                                 ("nojudge", [None, None], [2.0, 3.5])):
        settings = {"judge": {"id": "clipscore", "metric": "clipscore"}} if judge[0] is not None else {}
        run = store.create_run(Run(id=f"20261201-00000{len(made)}-{name}", request=f"the {name} run", task="t2i",
                                   generator="g", critic="c", settings=settings))
        for i, (o, j) in enumerate(zip(overall, judge), start=1):
            store.record_round(run, judged_round(i, o, j), [img])
        store.finish_run(run.id, status="completed", stop_reason="max_rounds", best_round=2)
        made[name] = run.id
    return store, made


def test_critic_up_and_judge_down_is_flagged_in_compare_show_and_the_report(disagreeing):
    store, runs = disagreeing
    ids = [runs["hacked"], runs["agreed"], runs["nojudge"]]
    rows = json.loads(invoke("compare", *ids, "--runs-dir", store.root, "--json").stdout)
    assert [r["disagree"] for r in rows] == [True, False, None]
    assert (rows[0]["judge_first"], rows[0]["judge_best"], rows[0]["gain"]) == (0.91, 0.62, 1.25)
    assert rows[2]["judge"] is None and rows[2]["judge_first"] is None

    for width in (80, 200):
        table = invoke("compare", *ids, "--runs-dir", store.root, width=width).stdout
        assert "critic and judge disagree" in " ".join(table.split())
        assert all(cell_len(line) <= width for line in table.splitlines())
        assert "0.910" in table and "0.620" in table
    quiet = invoke("compare", runs["agreed"], "--runs-dir", store.root).stdout
    assert "disagree:" not in quiet and "critic and judge disagree" not in quiet

    assert "critic and judge disagree" in invoke("show", runs["hacked"], "--runs-dir", store.root).stdout
    assert "critic and judge disagree" not in invoke("show", runs["agreed"], "--runs-dir", store.root).stdout

    page = Path(invoke("report", *ids[:1], "--runs-dir", store.root).stdout.strip()).read_text()
    assert "critic and judge disagree" in page and 'class="disagree"' in page
    from gcr.report import write_report

    html = write_report([store.get_run(i) for i in ids], store.root / "reports" / "all", title="three").read_text()
    assert html.count('<td class="disagree"') == 1  # the compare table flags exactly one run


# -- batch files and gcr batch --judge ---------------------------------------------------------------


def test_batch_files_take_a_judge_checked_before_anything_loads(tmp_path, monkeypatch, clip):
    use_fake_models(monkeypatch, ScriptedCritic(varied))
    (tmp_path / "models").mkdir()
    import shutil

    shutil.copytree(clip, tmp_path / "models" / "clip")
    spec = {"defaults": {"generator": "flux-dev", "rounds": 2, "patience": 5, "judge": "models/clip"},
            "jobs": [{"id": "one", "prompt": "a red fox"},
                     {"id": "two", "prompt": "a blue fox", "judge": "pickscore:models/clip"}]}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert invoke("batch", path, "--check").exit_code == 0
    record = json.loads(invoke("batch", path, "--runs-dir", tmp_path / "runs", "--json", "-q").stdout)
    store = RunStore(tmp_path / "runs")
    judges = {j["id"]: store.get_run(j["run_id"]).settings["judge"]["metric"] for j in record["jobs"]}
    assert judges == {"one": "clipscore", "two": "pickscore"}
    assert all(r.judge is not None for j in record["jobs"] for r in store.get_run(j["run_id"]).rounds)

    spec["jobs"][1]["judge"] = "./gone"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    bad = invoke("batch", path, "--check")
    assert bad.exit_code == 2 and "b.yaml:" in bad.stderr and "does not exist" in bad.stderr


def test_batch_judge_option_applies_to_jobs_without_their_own(tmp_path, monkeypatch, clip):
    use_fake_models(monkeypatch, ScriptedCritic(varied))
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"generator": "flux-dev", "rounds": 1},
                                    "jobs": [{"id": "one", "prompt": "a red fox"}]}))
    record = json.loads(invoke("batch", path, "--judge", clip, "--runs-dir", tmp_path / "runs", "--json", "-q").stdout)
    run = RunStore(tmp_path / "runs").get_run(record["jobs"][0]["run_id"])
    assert run.settings["judge"]["id"] == str(clip) and run.rounds[0].judge is not None


# -- loading: the same safety as every model ---------------------------------------------------------


def test_a_judge_without_safetensors_or_offline_fails_in_one_sentence(tmp_path, monkeypatch, clip):
    from transformers import CLIPModel

    use_fake_models(monkeypatch, ScriptedCritic(varied))
    import torch

    unsafe = tmp_path / "pickled-clip"  # the same CLIP with its weights as a pickle only
    CLIPModel.from_pretrained(clip).save_pretrained(unsafe)
    torch.save(CLIPModel.from_pretrained(clip).state_dict(), unsafe / "pytorch_model.bin")
    (unsafe / "model.safetensors").unlink()
    for judge, fix in ((unsafe, "saved with safetensors"), ("pickscore", "network or Hugging Face cache")):
        result = invoke("refine", "a fox", "-g", "flux-dev", "--judge", judge, "--rounds", "1",
                        "--runs-dir", tmp_path / "runs")
        assert result.exit_code == 1, result.output
        assert "cannot load the judge" in result.stderr and fix in " ".join(result.stderr.split())
        assert "Traceback" not in result.output


# -- gcr score --judge -------------------------------------------------------------------------------


def test_score_reports_the_judge_per_image_against_the_prompt(tmp_path, monkeypatch, clip):
    from gcr.judge import load_judge

    use_fake_models(monkeypatch, ScriptedCritic(varied))
    images = []
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (24, 24), colour).save(images[-1])
    result = invoke("score", *images, "--prompt", "a red square", "--judge", clip, "--runs-dir", tmp_path / "runs",
                    "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected = load_judge(str(clip), device="cpu").score([("a red square", Image.open(p).convert("RGB"))
                                                         for p in images])
    assert [r["judge"] for r in out] == pytest.approx(expected, abs=1e-5)
    table = invoke("score", *images, "--prompt", "a red square", "--judge", clip, "--runs-dir", tmp_path / "runs",
                   width=80)
    assert "judge" in table.stdout.splitlines()[1] and f"{out[0]['judge']:.3f}" in table.stdout
    plain = json.loads(invoke("score", *images, "--prompt", "a red square", "--runs-dir", tmp_path / "runs",
                              "--json").stdout)
    assert "judge" not in plain[0]
