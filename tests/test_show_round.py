"""`gcr show RUN --round K [--candidate N]`: a round's critique as text, no JSON needed."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app
from gcr.parse import parse_critique
from gcr.records import Candidate, Round, Run
from gcr.store import RunStore
from tests.fakes import critique_text

runner = CliRunner()
CUT_OFF = "# Detailed Judgement\n1. Text Faithfulness:\n## Justification: the fox is there.\n## Score: 2.5"


def candidate(seed, text, task="edit"):
    p = parse_critique(text, task)
    return Candidate(seed=seed, raw_critique=text, scores=dict(p.scores), overall=p.overall,
                     refined_request=p.refined_request, summary=p.summary, justifications=dict(p.justifications),
                     refinement_comments=p.refinement_comments, problems=tuple(p.problems), missing=tuple(p.missing))


@pytest.fixture
def store(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create_run(Run(id="run-1", request="make the sky [bold]stormy[/bold]", task="edit",
                               generator="g", critic="c"))
    good = critique_text(2.5, 3.25, tr="N/A", imf=3.75, refined="a stormy sky over the house",
                         summary="The sky is grey but calm.").replace(
        "## Refinement Comments: more detail", "## Refinement Comments: ask for lightning and dark clouds")
    better = critique_text(3.5, 3.5, tr="N/A", imf=4.0, refined="lightning over the house", summary="Stormy.")
    rounds = [Round(1, "make the sky stormy", (candidate(7, good), candidate(8, better)), chosen=1,
                    timings={"total_s": 2.0}, next_prompt="lightning over the house",
                    rewrite_note="critic's refined request"),
              Round(2, "lightning over the house", (candidate(7, "\x1b[31mno critique at all"),),
                    timings={"total_s": 2.0}, next_prompt="lightning over the house",
                    rewrite_note="critique unreadable: prompt kept"),
              Round(3, "lightning over the house", (candidate(9, CUT_OFF),), timings={"total_s": 2.0}),
              Round(4, "lightning over the house", (), error="generation failed: out of paint")]
    for r in rounds:
        store.record_round(run, r, [Image.new("RGB", (8, 8))] * len(r.candidates))
    store.finish_run("run-1", status="failed", stop_reason="error", best_round=1)
    return store


def show(store, *args):
    return runner.invoke(app, ["show", *args, "--runs-dir", str(store.root)], env={"COLUMNS": "80"})


def flat(text):
    return " ".join(text.split())


def test_a_rounds_critique_reads_as_text(store):
    result = show(store, "run-1", "--round", "1")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "round 1 of 4" in out and "candidate 2 of 2 (the round's result)" in out and "seed 8" in out
    assert "make the sky [bold]stormy[/bold]" in out  # the request, literally
    assert "overall 3.67 (complete)" in out
    for name, score in (("Text faithfulness", "3.50"), ("Image faithfulness", "4.00"),
                        ("Physical and visual quality", "3.50"), ("Text rendering", "N/A")):
        assert f"{name} {score}" in out
    assert out.count("because.") == 4  # every dimension's justification
    assert "Summary Stormy." in out and "Refined request lightning over the house" in out
    assert "Refinement comments more detail" in out
    assert "other candidates: 1 (seed 7, 3.17); read one with --candidate N" in out
    assert "next prompt: critic's refined request" in out


def test_another_candidate_of_the_round(store):
    out = flat(show(store, "run-1", "-r", "1", "--candidate", "1").stdout)
    assert "candidate 1 of 2 · seed 7" in out and "overall 3.17" in out
    assert "Summary The sky is grey but calm." in out
    assert "Refinement comments ask for lightning and dark clouds" in out
    assert "Refined request a stormy sky over the house" in out
    assert "other candidates: 2 (seed 8, 3.67)" in out


def test_an_unreadable_critique_shows_what_the_critic_wrote_and_the_parsers_problems(store):
    result = show(store, "run-1", "--round", "2")
    out = flat(result.stdout)
    assert "unscored: the critique could not be read" in out
    assert "What the parser could not read" in out
    assert "The critic wrote \\x1b[31mno critique at all" in out and "\x1b" not in result.stdout
    assert "next prompt: critique unreadable: prompt kept" in out


def test_an_incomplete_critique_names_what_was_not_judged(store):
    out = flat(show(store, "run-1", "--round", "3").stdout)
    assert "overall 2.50 (incomplete: image_faithfulness, physical_quality, text_rendering not judged)" in out
    assert "Text faithfulness 2.50 the fox is there." in out
    assert "Physical and visual quality not judged" in out


def test_a_failed_round_says_why(store):
    out = flat(show(store, "run-1", "--round", "4").stdout)
    assert "round failed: generation failed: out of paint" in out


def test_json_gives_the_round_or_the_candidate(store):
    whole = json.loads(show(store, "run-1", "--round", "1", "--json").stdout)
    assert whole["index"] == 1 and whole["chosen"] == 1 and len(whole["candidates"]) == 2
    one = json.loads(show(store, "run-1", "--round", "1", "--candidate", "1", "--json").stdout)
    assert one["seed"] == 7 and one["refinement_comments"] == "ask for lightning and dark clouds"


@pytest.mark.parametrize("args,phrase", [
    (["--round", "9"], "rounds 1 to 4"),
    (["--round", "1", "--candidate", "3"], "has 2 candidates"),
    (["--round", "4", "--candidate", "1"], "failed before it made an image"),
    (["--candidate", "1"], "add --round K"),
])
def test_a_round_or_candidate_that_does_not_exist_is_one_sentence(store, args, phrase):
    result = show(store, "run-1", *args)
    assert result.exit_code == 2 and phrase in flat(result.stderr) and "Traceback" not in result.output


def test_round_needs_a_run_not_a_batch(store):
    store.create_batch("batch-x", "b.yaml", [("j", "f")])
    result = show(store, "batch-x", "--round", "1")
    assert result.exit_code == 2 and "is a batch" in result.stderr


def test_runs_stored_before_comments_were_kept_read_them_from_the_raw_text(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run(Run(id="old", request="x", task="t2i", generator="g", critic="c"))
    text = critique_text(3.0, 3.0).replace("more detail", "name the colours")
    old = candidate(1, text, task="t2i").__class__(**{**candidate(1, text, task="t2i").__dict__,
                                                     "refinement_comments": ""})
    store.record_round(run, Round(1, "x", (old,)), [Image.new("RGB", (8, 8))])
    result = runner.invoke(app, ["show", "old", "--round", "1", "--runs-dir", str(tmp_path)])
    assert "Refinement comments name the colours" in flat(result.stdout)
