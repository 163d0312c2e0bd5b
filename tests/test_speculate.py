"""Prompt-lookup speculative decoding writes exactly what K = 0 (plain greedy generate) writes.

The drafter and the commit rule are checked on hand-made token rows; the decoder on the tiny Qwen3-VL
critic against plain `generate`, on left-padded batches of both tasks, with the real drafter and with a
drafter that knows the answer (so drafts are accepted, run into an end-of-turn, or past the token limit,
exactly where a test wants them).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcr.critics.fastdecode import FastGreedyDecoder
from gcr.critics.inprocess import load_critic
from gcr.critics.speculate import commit_lengths, draft_tokens, recommend_k
from gcr.errors import UsageError
from tests.test_fastdecode import fast, load, plain, rendered, requests


def row(*tokens):
    return torch.tensor([tokens])


def drafts(tokens, end, k, valid=None):
    seq = row(*tokens)
    valid = torch.ones_like(seq, dtype=torch.bool) if valid is None else valid
    return draft_tokens(seq, torch.tensor([end]), valid, k)[0].tolist()


# -- the drafter -----------------------------------------------------------------------------------


def test_drafts_continue_the_most_recent_match_of_the_longest_ngram():
    # last 3 tokens (7 8 9) occurred at 0, followed by 1 2 3
    assert drafts([7, 8, 9, 1, 2, 3, 4, 5, 7, 8, 9], 11, 3) == [1, 2, 3]
    # two earlier "8 9" (no earlier "3 8 9"): the more recent one, followed by 6, wins
    assert drafts([8, 9, 1, 2, 8, 9, 6, 0, 3, 8, 9], 11, 1) == [6]
    # a 2-gram match (4 8 9 -> no; 8 9 at 1 -> 5) beats a more recent 1-gram match (9 at 6 -> 3)
    assert drafts([4, 8, 9, 5, 0, 2, 9, 3, 8, 9], 10, 1) == [5]


def test_a_match_running_into_the_present_repeats_with_its_period():
    assert drafts([5, 1, 2, 3, 1, 2, 3], 7, 7) == [1, 2, 3, 1, 2, 3, 1]
    assert drafts([4, 4, 4], 3, 4) == [4, 4, 4, 4]


def test_no_match_drafts_the_last_token_and_padding_is_never_matched():
    assert drafts([1, 2, 3, 4], 4, 3) == [4, 4, 4]
    valid = torch.tensor([[False, False, True, True, True, True]])   # two left pads
    assert drafts([0, 9, 5, 6, 7, 0], 6, 2, valid) == [0, 0]        # "0" only matches a pad: no match
    assert drafts([0, 9, 5, 0, 7, 0], 6, 2, valid) == [7, 0]        # "0" at 3 is real text


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_drafts_read_nothing_at_or_beyond_the_end_and_rows_are_independent(data):
    width = data.draw(st.integers(4, 40))
    rows = data.draw(st.lists(st.lists(st.integers(0, 5), min_size=width, max_size=width), min_size=1, max_size=4))
    ends = [data.draw(st.integers(1, width)) for _ in rows]
    k = data.draw(st.integers(1, 6))
    seq = torch.tensor(rows)
    valid = torch.ones_like(seq, dtype=torch.bool)
    got = draft_tokens(seq, torch.tensor(ends), valid, k)
    scrambled = seq.clone()
    for r, end in enumerate(ends):
        scrambled[r, end:] = torch.randint(0, 6, (width - end,))
    assert torch.equal(got, draft_tokens(scrambled, torch.tensor(ends), valid, k))
    for r, end in enumerate(ends):
        alone = draft_tokens(seq[r:r + 1], torch.tensor([end]), valid[r:r + 1], k)
        assert torch.equal(alone[0], got[r])


def test_commit_keeps_agreeing_drafts_plus_the_models_token_cut_at_end_of_turn_and_limit():
    eos = torch.tensor([9, -1])
    drafts_ = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 9, 3], [1, 2, 3], [1, 2, 3]])
    predicted = torch.tensor([[1, 2, 3, 4], [1, 5, 3, 4], [1, 9, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    done = torch.tensor([1, 1, 1, 8, 1])
    finished = torch.tensor([False, False, False, False, True])
    m, first_eos = commit_lengths(drafts_, predicted, done, finished, eos, 10)
    # all agree: 3 drafts + 1; disagree at the 2nd: 1 draft + the model's 5; end-of-turn accepted at
    # position 1: cut after it; 2 tokens left before the limit; finished: nothing
    assert m.tolist() == [4, 2, 2, 2, 0]
    assert first_eos.tolist() == [4, 4, 1, 4, 4]


def test_recommend_k_takes_the_best_single_run_k_that_does_not_hurt_batches():
    tokens = {2: 1.5, 4: 1.7, 8: 1.8}
    cost = {1: {2: 1.0, 4: 1.05, 8: 1.1}, 16: {2: 1.1, 4: 1.3, 8: 1.8}}
    # batch 1: 1.50, 1.62, 1.64; batch 16: 1.36, 1.31, 1.0 -> 8 hurts batches; 4 is within 5%
    assert recommend_k(tokens, cost) == 4
    assert recommend_k(tokens, {1: cost[1]}) == 8
    assert recommend_k({}, cost) is None


# -- the decoder: identical to plain greedy generate -------------------------------------------------


@pytest.fixture(scope="module")
def critic_dir(tiny_dir):
    return tiny_dir("critic")


def oracle(expected, prompt_len, filler=3, wrong_every=0):
    """A drafter that knows the answer (plain generate's output): drafts the true next tokens, a filler
    past the end, and a wrong token at every `wrong_every`-th position when asked."""
    width = expected.shape[1]

    def draft(seq, end, valid, k):
        index = end[:, None] + torch.arange(k)
        out = expected.gather(1, index.clamp(max=width - 1))
        out = torch.where(index < width, out, torch.full_like(out, filler))
        if wrong_every:
            out = torch.where((index - prompt_len) % wrong_every == wrong_every - 1, (out + 1) % 1000, out)
        return out

    return draft


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("k", [1, 4])
def test_prompt_lookup_speculation_matches_plain_generate_on_padded_batches(critic_dir, task, k):
    critic = load(critic_dir, task, tokens=32)
    batch = rendered(critic, requests(task))   # left-padded: rows of different lengths (edit: 2 images)
    assert (batch["attention_mask"] == 0).any()
    expected = plain(critic, batch)
    decoder = FastGreedyDecoder(critic.model, "eager", speculate=k)
    assert torch.equal(expected, fast(decoder, critic, batch))
    stats = decoder.last
    assert stats.path == "fast-eager" and stats.speculate == k and stats.row_steps >= stats.steps > 0
    assert decoder.describe()["speculate_failed"] is None
    one = rendered(critic, requests(task)[1:2])   # alone, reusing the decoder with buffers of another shape
    assert torch.equal(plain(critic, one), fast(decoder, critic, one))


def test_accepted_drafts_commit_several_tokens_a_pass_and_wrong_ones_change_nothing(critic_dir):
    critic = load(critic_dir, "t2i", tokens=40)
    batch = rendered(critic, requests("t2i"))
    prompt_len = batch["input_ids"].shape[1]
    expected = plain(critic, batch)
    perfect = FastGreedyDecoder(critic.model, "eager", speculate=4, drafter=oracle(expected, prompt_len))
    assert torch.equal(expected, fast(perfect, critic, batch))
    assert perfect.last.steps == 8   # 39 tokens after the first, 5 a pass (the last pass: 4, the limit)
    assert perfect.last.tokens_per_step == pytest.approx(39 / 8)
    flawed = FastGreedyDecoder(critic.model, "eager", speculate=4,
                               drafter=oracle(expected, prompt_len, wrong_every=3))
    assert torch.equal(expected, fast(flawed, critic, batch))
    assert 0 < flawed.last.acceptance < 1


def _doctored_to_end_early(critic, batch):
    """Make end-of-turn win where row 0 would write its 6th token: rows then end at different steps."""
    eos = critic.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    prompt_len = batch["input_ids"].shape[1]
    trigger = int(plain(critic, batch)[0, prompt_len + 5])
    with torch.no_grad():
        critic.model.lm_head.weight[eos] = critic.model.lm_head.weight[trigger] * 1.5
    return eos


def test_end_of_turn_inside_a_draft_stops_the_row_like_generate(critic_dir):
    k = 4
    critic = load(critic_dir, "t2i", tokens=40)
    batch = rendered(critic, requests("t2i"))
    eos = _doctored_to_end_early(critic, batch)
    prompt_len = batch["input_ids"].shape[1]
    expected = plain(critic, batch)
    assert (expected[:, prompt_len:] == eos).any(), "the doctored model should end a turn"
    # The oracle drafts straight through end-of-turn and on into filler tokens after it.
    for drafter in (None, oracle(expected, prompt_len, filler=eos), oracle(expected, prompt_len, filler=7)):
        decoder = FastGreedyDecoder(critic.model, "eager", speculate=k, drafter=drafter, check_every=4)
        assert torch.equal(expected, fast(decoder, critic, batch))
    # min_new_tokens bans end-of-turn until then (past where the rows ended), inside a verify pass too:
    # the oracle drafts the end-of-turn the unconstrained model would write, and must see it refused.
    expected_min = plain(critic, batch, min_new_tokens=12)
    assert not torch.equal(expected_min, expected)
    for drafter in (oracle(expected, prompt_len, filler=eos), oracle(expected_min, prompt_len), None):
        decoder = FastGreedyDecoder(critic.model, "eager", speculate=k, drafter=drafter)
        assert torch.equal(expected_min, fast(decoder, critic, batch, min_new_tokens=12))


def test_drafts_reaching_past_the_token_limit_are_cut_at_it(critic_dir):
    critic = load(critic_dir, "t2i", tokens=40)
    batch = rendered(critic, requests("t2i"))
    prompt_len = batch["input_ids"].shape[1]
    k = 4
    # 2: the first pass may commit one token; 5: exactly k + 1; 7: the second pass is cut
    for max_new in (2, 5, 7):
        expected = plain(critic, batch, max_new_tokens=max_new)
        for drafter in (oracle(expected, prompt_len), None):
            decoder = FastGreedyDecoder(critic.model, "eager", speculate=k, drafter=drafter)
            assert torch.equal(expected, fast(decoder, critic, batch, max_new_tokens=max_new)), max_new


def test_a_failing_speculative_path_falls_back_to_one_token_a_step(critic_dir):
    critic = load(critic_dir, "t2i", tokens=16)
    batch = rendered(critic, requests("t2i")[:2])

    def broken(seq, end, valid, k):
        raise RuntimeError("drafter exploded")

    decoder = FastGreedyDecoder(critic.model, "eager", speculate=3, drafter=broken)
    assert torch.equal(plain(critic, batch), fast(decoder, critic, batch))
    assert decoder.last.path == "fast-eager" and decoder.last.speculate == 0
    assert decoder.describe()["speculate_failed"] == "RuntimeError: drafter exploded"
    assert decoder.speculate == 0 and decoder.describe()["failed"] is None


def test_speculation_picks_the_loop_it_needs_and_refuses_plain_generate(critic_dir):
    critic = load(critic_dir, "t2i")
    assert FastGreedyDecoder(critic.model, "auto", speculate=3).mode == "eager"   # CPU: asked for, so eager
    assert FastGreedyDecoder(critic.model, "auto", speculate=None).speculate == 0  # CPU default: off
    assert FastGreedyDecoder(critic.model, "auto", speculate=None).mode == "off"
    with pytest.raises(ValueError, match="mode 'off'"):
        FastGreedyDecoder(critic.model, "off", speculate=2)
    with pytest.raises(UsageError, match="--critic-decode off"):
        load_critic(str(critic_dir), task="t2i", device="cpu", fast="off", speculate=2)
    with pytest.raises(UsageError, match="--critic-speculate takes"):
        load_critic(str(critic_dir), task="t2i", device="cpu", speculate=99)


def test_critic_records_its_speculation_and_writes_the_same_critiques(critic_dir):
    reqs = requests("edit")
    off = load_critic(str(critic_dir), task="edit", device="cpu", max_new_tokens=24, speculate=0)
    on = load_critic(str(critic_dir), task="edit", device="cpu", max_new_tokens=24, speculate=5)
    assert on.critique(reqs) == off.critique(reqs)
    assert off.describe()["speculate"] == 0 and off.fast.last.path.startswith("generate")
    assert on.describe()["speculate"] == 5 and on.describe()["fast_decode"]["speculate"] == 5
    assert on.fast.last.path == "fast-eager" and on.fast.last.speculate == 5
