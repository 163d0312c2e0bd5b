"""Prompt-lookup drafting for speculative decoding of critiques, and the rule that keeps output exact.

A RationalRewards critique copies a great deal: the refined request restates the user's request, the
justifications quote it, the headings follow the prompt's output format. So the next few tokens can often
be guessed by finding the last few tokens written (an n-gram) earlier in the prompt or the critique and
proposing what followed them there. The decoder feeds the last committed token and K such drafts through
the model in ONE forward pass, and keeps the drafts up to the first one the model disagrees with, plus the
model's own next token: greedy output is unchanged, token for token, whatever the drafts were; only the
number of forward passes (each one a full read of the weights) goes down.

Everything here works on fixed-shape tensors with no host synchronisation, so the draft, the verify pass
and the bookkeeping run inside one recorded CUDA graph (or compiled function) per step. The same two
functions drive the decoder (`gcr.critics.fastdecode`) and the acceptance replay (`gcr.critics.replay`),
so the replay measures the drafter the decoder runs.
"""
from __future__ import annotations

# Tokens drafted per verify step when --critic-speculate is not given and the fast decoder runs (GPU).
# Chosen by `recommend_k` from the replay of the critiques in tests/data (README, "Speculative decoding")
# under the ASSUMED COST_PER_DRAFT: the K with the best expected batch-1 speed-up whose batch-16 speed-up
# stays within 5% of the best K's there. Replay: 1.45 / 1.51 / 1.55 tokens per step at K = 2 / 3 / 4,
# i.e. 1.37x / 1.38x / 1.39x at batch 1 and 1.25x / 1.22x / 1.18x at batch 16.
DEFAULT_SPECULATE = 3
MAX_SPECULATE = 16
# Longest and shortest n-gram looked up; the longest match found wins (a longer context is a better
# predictor), and among equal lengths the most recent occurrence (the critique's own recent text beats
# the prompt far behind it).
MAX_NGRAM = 3
MIN_NGRAM = 1

# The cost model used to choose DEFAULT_SPECULATE before GPU measurements exist (ASSUMED, not measured):
# a verify pass of K drafts costs (1 + COST_PER_DRAFT[batch] * K) one-token decode steps. At batch 1 an
# 8B decode step is bound by reading 17.5 GB of weights (~6-10 ms on an H100); K more tokens add ~17.6
# GFLOP each (~0.05 ms) plus less-efficient small-M GEMM and attention kernels: assume 3% of a step per
# draft. At batch 16 a verify pass feeds 16 (K + 1) tokens and compute starts to count: assume 8%.
# `gcr bench --speculate 2,4,8` measures the real figures (ms per verify step against K = 0).
COST_PER_DRAFT = {1: 0.03, 16: 0.08}


def draft_tokens(seq, end, valid, k: int, *, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
    """K draft tokens per row by prompt lookup.

    seq (batch, S) token ids; row r's text so far is seq[r, :end[r]] (prompt, then the tokens committed
    so far), with positions where `valid` (batch, S) is False (left padding) never matched. For n from
    `max_ngram` down to `min_ngram`, find the last n tokens earlier in the row; the longest n with a match
    wins, and the most recent match of that n. The draft is what followed the match, repeated with the
    period of the match if it runs into the present (so "abcabc" keeps drafting "abc"). Rows with no
    match draft their last token repeated: any draft is safe, since verification decides.

    Reads nothing at or beyond end[r] (the replay relies on that: it keeps the whole answer in seq).
    Fixed shapes and no host sync: the decoder runs it inside a CUDA graph. Returns (batch, k) long.
    """
    import torch

    batch, width = seq.shape
    device = seq.device
    end = end.view(batch)
    positions = torch.arange(width, device=device)
    continuation = torch.full((batch,), -1, dtype=torch.long, device=device)  # where the draft starts
    for n in range(max_ngram, min_ngram - 1, -1):
        starts = width - n                                  # a match at j is seq[j : j + n]
        if starts <= 0:
            continue
        suffix = seq.gather(1, (end[:, None] - n + torch.arange(n, device=device)).clamp(min=0))
        match = valid[:, :starts] & (positions[:starts] + n < end[:, None])   # continuation j + n < end
        for t in range(n):
            match = match & (seq[:, t:t + starts] == suffix[:, t:t + 1])
        latest = torch.where(match, positions[:starts], -1).amax(dim=1)
        found = (continuation < 0) & (latest >= 0)
        continuation = torch.where(found, latest + n, continuation)
    found = continuation >= 0
    start = torch.where(found, continuation, end - 1)
    period = (end - start).clamp(min=1)
    index = start[:, None] + torch.arange(k, device=device)[None, :] % period[:, None]
    return seq.gather(1, index.clamp(0, width - 1))


def commit_lengths(drafts, predicted, done, finished, eos_ids, max_new):
    """How many tokens each row commits after a verify pass, and where its first end-of-turn is.

    drafts (batch, K); predicted (batch, K + 1): the model's greedy token after the last committed one
    and after each draft; done (batch,): tokens committed so far; finished (batch,) bool; eos_ids (E,)
    (-1 entries never match); max_new: the token limit (int or 0-d tensor).

    A row commits predicted[:, :m] where m = (drafts agreeing with the model, in a row) + 1, cut after
    the first end-of-turn token and at the token limit, and 0 for finished rows. Those are exactly the
    tokens one-token-at-a-time greedy decoding writes next. Returns (m, first_eos), first_eos = K + 1
    where predicted has none.
    """
    import torch

    k = drafts.shape[1]
    offsets = torch.arange(k + 1, device=predicted.device)
    agree = (drafts == predicted[:, :k]).long().cumprod(dim=1).sum(dim=1)
    is_eos = torch.isin(predicted, eos_ids)
    first_eos = torch.where(is_eos, offsets, k + 1).amin(dim=1)
    m = torch.minimum(agree + 1, first_eos + 1)
    m = torch.minimum(m, max_new - done).clamp(min=0)
    return torch.where(finished, torch.zeros_like(m), m), first_eos


def verify_cost(k: int, batch: int = 1) -> float:
    """Assumed cost of a verify pass with k drafts, in one-token decode steps (COST_PER_DRAFT)."""
    per_draft = COST_PER_DRAFT[min(COST_PER_DRAFT, key=lambda b: abs(b - batch))]
    return 1.0 + per_draft * k


def recommend_k(tokens_per_step: dict, cost: dict, tolerance: float = 0.05) -> int | None:
    """The K to run: the best expected speed-up at the smallest batch, among the Ks whose speed-up at the
    largest batch is within `tolerance` of the best there (a batch run must not pay for a single run's K).

    tokens_per_step {K: tokens per verify step}; cost {batch: {K: verify cost in one-token steps}}.
    """
    ks = [k for k in tokens_per_step if all(k in c for c in cost.values())]
    if not ks or not cost:
        return None
    speedup = {b: {k: tokens_per_step[k] / cost[b][k] for k in ks} for b in cost}
    small, large = min(cost), max(cost)
    best_large = max(speedup[large].values())
    fair = [k for k in ks if speedup[large][k] >= (1 - tolerance) * best_large]
    return max(fair, key=lambda k: (speedup[small][k], -k))


def check_speculate(k) -> int | None:
    """None (auto) or a whole number 0..MAX_SPECULATE; anything else is refused with the fix."""
    from gcr.errors import UsageError

    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SPECULATE:
        raise UsageError(f"--critic-speculate takes a whole number of draft tokens from 0 (off) to "
                         f"{MAX_SPECULATE}, not {k!r}.")
    return k
