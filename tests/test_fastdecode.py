"""The fast critic decoder (static KV cache, one decode step run in a loop, compiled and recorded as a CUDA
graph on a GPU) writes exactly the tokens plain greedy `generate` writes, on the tiny Qwen3-VL critic."""
import shutil

import pytest
import torch
from PIL import Image

from gcr.critics.inprocess import load_critic
from gcr.records import CritiqueRequest
from gcr.critics.fastdecode import FastGreedyDecoder
from gcr.prompts import build_messages


def requests(task):
    source = (lambda size, color: Image.new("RGB", size, color)) if task == "edit" else (lambda *a: None)
    return [
        CritiqueRequest("a red cube", Image.new("RGB", (64, 48), "red"), source((40, 40), "blue")),
        CritiqueRequest("a much longer request about a blue sphere resting on a wooden table",
                        Image.new("RGB", (32, 64), (20, 200, 90)), source((48, 32), "white")),
        CritiqueRequest("text", Image.effect_noise((48, 48), 60).convert("RGB"), source((32, 32), "black")),
    ]


@pytest.fixture(scope="module")
def critic_dir(tiny_dir):
    return tiny_dir("critic")


def load(critic_dir, task, device="cpu", dtype="auto", tokens=24):
    return load_critic(str(critic_dir), task=task, device=device, dtype=dtype, max_new_tokens=tokens, fast="off")


def rendered(critic, reqs):
    inputs = critic._render([build_messages(critic.task, r.request, r.image, r.source_image) for r in reqs])
    return inputs.to(critic.model.device)


def plain(critic, inputs, **overrides):
    with torch.inference_mode():
        return critic.model.generate(**inputs, **{**critic._generate_kwargs(False), **overrides})


def fast(decoder, critic, inputs, **overrides):
    return decoder.generate(inputs, **{**critic._generate_kwargs(False), **overrides})


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_static_cache_loop_matches_plain_generate_batched_and_alone(critic_dir, task):
    critic = load(critic_dir, task)
    decoder = FastGreedyDecoder(critic.model, "eager")
    reqs = requests(task)
    batch = rendered(critic, reqs)  # left-padded: rows of different lengths
    assert (batch["attention_mask"] == 0).any()
    expected = plain(critic, batch)
    got = fast(decoder, critic, batch)
    assert decoder.last.path == "fast-eager"
    assert torch.equal(expected, got)
    for r in reqs:  # a row alone, and a second call reusing the same buffers
        one = rendered(critic, [r])
        assert torch.equal(plain(critic, one), fast(decoder, critic, one))
    assert torch.equal(expected, fast(decoder, critic, batch))


def test_end_of_turn_mid_sequence_stops_and_pads_like_generate(critic_dir):
    critic = load(critic_dir, "t2i", tokens=40)
    reqs = requests("t2i")
    batch = rendered(critic, reqs)
    eos = critic.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    # Make end-of-turn win wherever the token row 0 writes 6th would: rows then end at different steps.
    prompt_len = batch["input_ids"].shape[1]
    trigger = int(plain(critic, batch)[0, prompt_len + 5])
    with torch.no_grad():
        critic.model.lm_head.weight[eos] = critic.model.lm_head.weight[trigger] * 1.5
    expected = plain(critic, batch)
    new = expected[:, prompt_len:]
    assert (new == eos).any(), "the doctored model should end a turn"
    assert expected.shape[1] < prompt_len + 40 or not (new == eos).all()
    decoder = FastGreedyDecoder(critic.model, "eager", check_every=4)
    assert torch.equal(expected, fast(decoder, critic, batch))
    # min_new_tokens bans end-of-turn until then, as generate's processor does.
    assert torch.equal(plain(critic, batch, min_new_tokens=12), fast(decoder, critic, batch, min_new_tokens=12))
    assert torch.equal(plain(critic, batch, max_new_tokens=1), fast(decoder, critic, batch, max_new_tokens=1))


def test_critic_uses_the_fast_path_and_writes_the_same_critiques(critic_dir):
    reqs = requests("edit")
    slow = load(critic_dir, "edit")
    quick = load_critic(str(critic_dir), task="edit", device="cpu", max_new_tokens=24, fast="eager")
    assert quick.critique(reqs) == slow.critique(reqs)
    assert quick.fast.last.path == "fast-eager" and slow.fast.last.path.startswith("generate")
    assert quick.describe()["fast_decode"]["mode"] == "eager"


def test_anything_the_loop_does_not_reproduce_goes_to_plain_generate(critic_dir):
    critic = load(critic_dir, "t2i")
    decoder = FastGreedyDecoder(critic.model, "eager")
    inputs = rendered(critic, requests("t2i")[:1])
    critic.model.generation_config.repetition_penalty = 1.3
    try:
        assert torch.equal(plain(critic, inputs), fast(decoder, critic, inputs))
        assert decoder.last.path.startswith("generate: generation_config.repetition_penalty")
    finally:
        critic.model.generation_config.repetition_penalty = None
    out = decoder.generate(inputs, **critic._generate_kwargs(True))  # sampling (a retry)
    assert decoder.last.path == "generate: sampling" and out.shape[0] == 1
    assert FastGreedyDecoder(critic.model, "auto").mode == "off"  # CPU: plain generate stays the default


def test_unknown_mode_is_refused(critic_dir):
    with pytest.raises(ValueError, match="unknown fast decode mode"):
        FastGreedyDecoder(load(critic_dir, "t2i").model, "turbo")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C compiler")
def test_compiled_step_matches_plain_generate(critic_dir):
    """torch.compile(fullgraph) of the decode step, on the CPU (~30 s: one compile for all shapes)."""
    critic = load(critic_dir, "t2i", tokens=12)
    decoder = FastGreedyDecoder(critic.model, "compile")
    batch = rendered(critic, requests("t2i")[:2])
    assert torch.equal(plain(critic, batch), fast(decoder, critic, batch))
    assert decoder.last.path == "fast-compile"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_cuda_graph_decode_matches_plain_generate_in_fp32(critic_dir, mode):
    critic = load(critic_dir, "edit", device="cuda", dtype="fp32", tokens=48)
    decoder = FastGreedyDecoder(critic.model, mode)
    for reqs in (requests("edit"), requests("edit")[:1]):
        inputs = rendered(critic, reqs)
        assert torch.equal(plain(critic, inputs), fast(decoder, critic, inputs))
        assert decoder.last.path == f"fast-{mode}"


@cuda
def test_cuda_graph_decode_in_bf16_reports_agreement(critic_dir):
    """bf16 kernels differ from generate's; record how far the tokens agree (not asserted equal)."""
    critic = load(critic_dir, "t2i", device="cuda", dtype="bf16", tokens=48)
    decoder = FastGreedyDecoder(critic.model, "graph")
    inputs = rendered(critic, requests("t2i"))
    a, b = plain(critic, inputs), fast(decoder, critic, inputs)
    assert a.shape == b.shape
    agree = (a == b).float().mean().item()
    print(f"bf16 graph vs plain: {agree:.3f} of tokens equal")
