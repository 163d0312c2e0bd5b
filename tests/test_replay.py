"""The speculation replay: critiques read with the requests they answer, replayed through the drafter."""
import json
import shutil
from pathlib import Path

import pytest

from gcr.critics.replay import infer_request, load_corpus, replay, replay_corpus
from gcr.errors import UsageError

DATA = Path(__file__).parent / "data" / "critiques"


def test_corpus_pairs_every_critique_with_its_task_and_request():
    samples = load_corpus(DATA)
    assert sorted(s.name for s in samples) == sorted(p.name for p in DATA.glob("*.txt"))
    by_name = {s.name: s for s in samples}
    assert by_name["edit_score_first.txt"].task == "edit" and by_name["t2i_fenced.txt"].task == "t2i"
    assert by_name["edit_score_first.txt"].request.startswith("Replace the blue car")
    assert not any(s.inferred for s in samples)   # all listed in requests.json


@pytest.mark.parametrize("name, task, wanted", [
    ("edit_score_first.txt", "edit", "Replace the blue car with a red bicycle leaning against the lamp post."),
    ("t2i_think_crlf.txt", "t2i", "a chalkboard menu outside a cafe that says SOUP OF THE DAY: TOMATO"),
    ("t2i_chatty_bold.txt", "t2i", 'a vintage travel poster of Kyoto with the headline "VISIT KYOTO" in bold serif letters'),
    ("t2i_fenced.txt", "t2i", "A minimalist logo: a single continuous line drawing of a hummingbird, black on white, no text"),
    ("edit_messy.txt", "edit", "the cat's fur changed from orange to grey while keeping the living room the same"),
])
def test_the_request_is_read_from_the_critiques_own_analysis(name, task, wanted):
    assert infer_request((DATA / name).read_bytes().decode("utf-8")) == (task, wanted)


def test_unlisted_critiques_are_inferred_and_bad_folders_are_refused(tmp_path):
    shutil.copy(DATA / "t2i_think_crlf.txt", tmp_path)
    [sample] = load_corpus(tmp_path)
    assert sample.inferred and sample.request.startswith("a chalkboard menu")
    with pytest.raises(UsageError, match="holds no critique texts"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "requests.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_corpus(tmp_path)
    (tmp_path / "requests.json").write_text(json.dumps({"t2i_think_crlf.txt": {"task": "video"}}))
    with pytest.raises(UsageError, match="needs a task"):
        load_corpus(tmp_path)


def test_replay_counts_passes_as_the_decoder_would():
    eos = 99
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    copied = [3, 4, 5, 6, 7, 8, eos]        # the answer copies the prompt: every draft is right
    counts = replay([prompt], [copied], 2, eos)
    # first token from the prefill; then passes of 3: (4 5 6), (7 8 eos)
    assert counts == {"k": 2, "verify_steps": 2, "drafted": 4, "accepted": 4, "tokens": 6}
    novel = [50, 51, 52, 53, eos]           # nothing to copy: one token a pass
    assert replay([prompt], [novel], 4, eos)["verify_steps"] == 4
    both = replay([prompt, prompt], [copied, novel], 2, eos)   # rows of a batch advance independently
    assert both["verify_steps"] == 2 + 4 and both["tokens"] == 6 + 4


def test_replay_corpus_reports_acceptance_and_tokens_per_pass_for_each_k():
    result = replay_corpus(load_corpus(DATA), ks=(2, 8))
    assert result["ks"] == [2, 8] and "real Qwen tokenizer" in result["note"]
    two, eight = result["by_k"]["2"], result["by_k"]["8"]
    for r in (two, eight):
        assert r["drafted"] == r["verify_steps"] * r["k"] and 0 < r["acceptance"] < 1
        assert r["tokens_per_step"] == pytest.approx(1 + r["accepted"] / r["verify_steps"])
        assert set(r["expected_speedup"]) == {"1", "16"}
    # longer drafts: more tokens a pass, a smaller fraction of them accepted
    assert eight["tokens_per_step"] > two["tokens_per_step"] > 1.2
    assert eight["acceptance"] < two["acceptance"]
    assert {s["name"] for s in result["samples"]} == {p.name for p in DATA.glob("*.txt")}
