"""The in-process critic path with a critic that writes READABLE critiques: the real CLI loop end to end.

A random-weight critic writes gibberish, so the other end-to-end tests only see unscored rounds. Here the
tiny Qwen3-VL critic is first taught (gcr.tiny.teach: teacher forcing, a few seconds on CPU) to answer the
t2i critic prompt with one fixed RationalRewards critique, whatever the image. The prompt it learns from is
built exactly as the in-process critic builds it, so when the CLI loads the saved checkpoint, renders,
generates greedily and decodes, it must get that critique back: the rounds are scored, the critic's Refined
Request becomes the next prompt, and the unchanged scores end the run on a plateau.
"""
import json

import pytest
from typer.testing import CliRunner

from gcr.cli import app
from gcr.parse import parse_critique
from tests.fakes import critique_text

REQUEST = "a fox reading a newspaper"
REFINED = "a red fox reading a newspaper on a park bench"
TF, PQ = 2.5, 3.0                     # Text Rendering is N/A: not part of the mean
OVERALL = (TF + PQ) / 2
SCORES = {"text_faithfulness": TF, "physical_quality": PQ, "text_rendering": None}
# Short on purpose (~130 tokens): a short text is memorised in a few seconds.
TARGET = critique_text(TF, PQ, refined=REFINED, summary="ok")

TRAIN_IMAGES = 8         # half solid colours, half noise: the answer must not depend on the image

runner = CliRunner()


def _training_images():
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = []
    for i in range(TRAIN_IMAGES):
        if i % 2:
            pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
            images.append(Image.fromarray(pixels))
        else:
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator))
            images.append(Image.new("RGB", (32, 32), colour))
    return images


@pytest.fixture(scope="module")
def trained_critic(tmp_path_factory):
    """The tiny critic, taught (gcr.tiny.teach, as `gcr demo` does) to answer every t2i critique prompt
    with TARGET, saved as a checkpoint dir."""
    from gcr.tiny import build_tiny_critic
    from gcr.tiny.teach import Lesson, teach_critic

    source = build_tiny_critic(tmp_path_factory.mktemp("critic-random"))
    lessons = [Lesson("t2i", REQUEST, image, TARGET) for image in _training_images()]
    return teach_critic(source, tmp_path_factory.mktemp("critic-trained"), lessons, steps=150)


def _assert_is_the_taught_critique(text: str):
    parsed = parse_critique(text, "t2i")
    assert parsed.problems == (), text
    assert parsed.scores == SCORES
    assert parsed.overall == OVERALL and parsed.refined_request == REFINED


def test_load_critic_writes_the_taught_critique_for_unseen_images(trained_critic):
    from PIL import Image

    from gcr.critics.inprocess import load_critic
    from gcr.records import CritiqueRequest

    critic = load_critic(str(trained_critic), task="t2i", device="cpu", max_new_tokens=200)
    images = [Image.new("RGB", (32, 32), (200, 30, 90)), Image.new("RGB", (48, 32), (10, 240, 120))]
    texts = critic.critique([CritiqueRequest(REQUEST, image) for image in images])  # one left-padded batch
    assert len(texts) == 2
    for text in texts:
        _assert_is_the_taught_critique(text)


def test_refine_cli_scores_every_round_follows_the_refined_request_and_stops_on_plateau(
    trained_critic, tiny_dir, tmp_path
):
    runs_dir = tmp_path / "runs"
    # --rounds 4, not 3: the round limit is checked before the plateau, so 3 rounds would stop on max_rounds
    # and hide whether the plateau rule fired. Patience 2 with equal scores stops after round 3.
    # --on-converged reseed: round 3 runs REFINED again, which round 2 ran with seed 5 (by default the
    # run would stop there as converged), so it gets a fresh seed.
    args = ["refine", REQUEST, "-g", tiny_dir("flux"), "--critic", trained_critic, "--steps", 2,
            "--width", 32, "--height", 32, "--device", "cpu", "--max-new-tokens", 200, "--rounds", 4,
            "--patience", 2, "--seed", 5, "--on-converged", "reseed", "--json", "--quiet", "--runs-dir", runs_dir]
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)

    assert record["status"] == "completed" and record["stop_reason"] == "plateau"
    assert [r["index"] for r in record["rounds"]] == [1, 2, 3]
    assert record["best_round"] == 1   # equal scores: the earliest round wins the tie
    assert [r["prompt"] for r in record["rounds"]] == [REQUEST, REFINED, REFINED]
    assert [r["seed"] for r in record["rounds"]] == [5, 5, 6]  # no round repeats another
    assert record["rounds"][0]["rewrite_note"] == "critic's refined request"
    for r in record["rounds"]:
        assert r["error"] is None
        assert r["overall"] == OVERALL
        assert r["scores"] == SCORES
        assert r["refined_request"] == REFINED
        _assert_is_the_taught_critique(r["raw_critique"])

    shown = runner.invoke(app, ["show", record["id"], "--runs-dir", str(runs_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == record


# -- speculative decoding on a critic that copies ---------------------------------------------------


def test_speculation_writes_the_taught_critique_in_fewer_passes_exactly_as_the_replay_counts(trained_critic):
    """The taught critique restates the request and the prompt's headings, as RationalRewards does:
    prompt-lookup drafts are accepted, the text is unchanged, and the replay (no model) counts the
    decoder's verify passes and accepted drafts exactly."""
    import torch
    from PIL import Image

    from gcr.critics.inprocess import load_critic
    from gcr.critics.replay import replay
    from gcr.records import CritiqueRequest

    images = [Image.new("RGB", (32, 32), (200, 30, 90)), Image.new("RGB", (48, 32), (10, 240, 120))]
    reqs = [CritiqueRequest(REQUEST, image) for image in images]
    one_at_a_time = load_critic(str(trained_critic), task="t2i", device="cpu", max_new_tokens=200, speculate=0)
    speculating = load_critic(str(trained_critic), task="t2i", device="cpu", max_new_tokens=200, speculate=4)
    texts = speculating.critique(reqs)
    assert texts == one_at_a_time.critique(reqs)
    for text in texts:
        _assert_is_the_taught_critique(text)
    stats = speculating.fast.last
    assert stats.path == "fast-eager" and stats.speculate == 4
    assert stats.tokens_per_step > 1.3 and stats.steps < stats.new_tokens * 0.8

    from gcr.tiny.teach import Lesson, render_prompt

    inputs = render_prompt(speculating.processor, Lesson("t2i", REQUEST, images[0], TARGET))
    out = speculating.fast.generate(inputs, **speculating._generate_kwargs(False))
    prompt_len = inputs["input_ids"].shape[1]
    eos = speculating.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    counts = replay([inputs["input_ids"][0].tolist()], [out[0, prompt_len:].tolist()], 4, eos)
    assert out[0, -1] == eos and torch.is_tensor(out)
    assert (counts["verify_steps"], counts["accepted"]) == (speculating.fast.last.row_steps,
                                                            speculating.fast.last.accepted)


def test_refine_cli_with_critic_speculate_writes_the_same_raw_critiques_as_k0(trained_critic, tiny_dir, tmp_path,
                                                                              monkeypatch):
    import os

    from gcr.compilecache import ENV

    monkeypatch.setenv(ENV, "unset-below")   # recorded, so the test's change is undone afterwards
    monkeypatch.delenv(ENV)
    runs_dir = tmp_path / "runs"
    records = {}
    for k in (0, 4):
        args = ["refine", REQUEST, "-g", tiny_dir("flux"), "--critic", trained_critic, "--steps", 2,
                "--width", 32, "--height", 32, "--device", "cpu", "--max-new-tokens", 200, "--rounds", 2,
                "--seed", 5, "--critic-speculate", k, "--json", "--quiet", "--runs-dir", runs_dir]
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        records[k] = json.loads(result.stdout)
    critiques = {k: [r["raw_critique"] for r in record["rounds"]] for k, record in records.items()}
    assert critiques[4] == critiques[0] and len(critiques[0]) == 2
    for text in critiques[4]:
        _assert_is_the_taught_critique(text)
    assert records[4]["settings"]["critic"]["speculate"] == 4
    assert records[4]["settings"]["critic"]["fast_decode"]["mode"] == "eager"
    assert records[0]["settings"]["critic"]["speculate"] == 0
    # compiled decoders would be cached under the runs home
    assert os.environ[ENV] == str((runs_dir / "cache" / "torch-compile").resolve())
