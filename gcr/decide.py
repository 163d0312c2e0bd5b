"""Turning critiques into decisions: which candidate, which round, and when to stop.

The reference sources disagree on these; the choices made here (and why):
- overall score = equal-weight mean of the applicable dimensions, N/A excluded (paper Eq. 13);
  computed by the parser, so every consumer agrees.
- a critique is COMPLETE when every dimension its task expects (gcr.records.DIMENSIONS) has a score
  or an explicit N/A. A dimension that is missing (the text was cut off, a score was unreadable or
  out of range) was never judged, which is not the same as N/A: its mean would overstate the image.
  The loop retries an incomplete critique once, like an unreadable one; if it is still incomplete it
  is recorded with its problems and:
  - never meets the target (the target needs every dimension judged);
  - ranks below every complete critique when choosing the best candidate and the best round, and
    above every unscored one (`standing`); among equals the highest overall wins.
  - may still steer the next prompt: its Refined Request, when it has one, is the critic's whole
    proposal, written after the dimensions it did judge, so the rewriter uses it (and notes that the
    critique was incomplete). A truncated critique usually has none, and the prompt is then kept.
- an unscored critique never wins against a scored one, and ties go to the earlier candidate or
  round: the earlier one is cheaper to reproduce and was not chosen by noise.
- the target is met only when EVERY applicable dimension reaches it (the paper refines when ANY
  dimension is below 3.0; this is the same rule seen from the other side, with a tunable bar).
- no round is ever repeated: a round whose prompt and seeds equal an earlier round's would draw the
  same image and get the same critique, at full price. When the critic's refined request is a prompt
  already run with the seeds the policy gives next, the loop has converged: by default the run stops
  (`converged`); with `on_converged="reseed"` the round runs with the policy's next unused seed set
  instead. A prompt kept because the critique proposed nothing usable (unreadable, no Refined
  Request) is not convergence: that round always runs with fresh seeds, a new chance at a usable
  critique. Seeds stay a pure function of the stored rounds (`round_seeds`), so a resume repeats them.
- plateau: the best round so far (by `standing`) must have improved within the last `patience`
  rounds: a first complete critique after incomplete ones counts as an improvement, otherwise the
  overall must have risen by at least `min_delta`.
"""
from __future__ import annotations

from typing import Sequence

from .records import (
    STOP_CONVERGED,
    STOP_MAX_ROUNDS,
    STOP_PLATEAU,
    STOP_TARGET,
    STOP_TIME,
    Candidate,
    LoopSettings,
    Round,
)


def standing(judged: Candidate | Round | None) -> int:
    """2 for a complete critique, 1 for an incomplete but scored one, 0 for none or an unscored one."""
    if judged is None or judged.overall is None:
        return 0
    return 2 if judged.complete else 1


def best_of(items: Sequence[Candidate | Round]) -> int | None:
    """Position of the best item: highest standing, then highest overall; ties go to the earlier
    one. None when nothing is scored."""
    best = None
    for i, item in enumerate(items):
        rank = standing(item)
        if rank == 0:
            continue
        if best is None or (rank, item.overall) > (standing(items[best]), items[best].overall):
            best = i
    return best


def best_candidate(candidates: Sequence[Candidate]) -> int:
    """Index of the round's best candidate (see `best_of`); the first when none is scored."""
    best = best_of(candidates)
    return 0 if best is None else best


def best_round(rounds: Sequence[Round]) -> int | None:
    """Index (1-based, as stored) of the best round (see `best_of`); None when none is scored.
    gcr.compare uses this too, so tables and the run record always agree."""
    best = best_of(rounds)
    return None if best is None else rounds[best].index


def _best(rounds: Sequence[Round]) -> Round | None:
    best = best_of(rounds)
    return None if best is None else rounds[best]


def meets_target(round_: Round, target: float) -> bool:
    if not round_.complete:
        return False  # an unjudged dimension cannot be said to reach anything
    applicable = [v for v in round_.scores.values() if v is not None]
    return bool(applicable) and all(v >= target for v in applicable)


def _improved(now: Round, before: Round | None, min_delta: float) -> bool:
    if before is None or standing(now) > standing(before):
        return True
    return now.overall - before.overall >= min_delta


def round_seeds(s: LoopSettings, earlier: Sequence[Round], prompt: str, index: int) -> list[int]:
    """Seeds of round `index`, run with `prompt` after the `earlier` rounds: the seed policy's, unless
    an earlier round already ran this prompt with them; then the policy's next seed set not yet run
    with this prompt. A pure function of what is stored, so a resumed run repeats it."""
    used = {_seeds(r) for r in earlier if r.prompt == prompt and r.candidates}
    k = 0 if s.seed_policy == "fixed" else index - 1
    while tuple(s.seed_set(k)) in used:
        k += 1
    return s.seed_set(k)


def _seeds(r: Round) -> tuple:
    return tuple(c.seed for c in r.candidates)


def converged(rounds: Sequence[Round], s: LoopSettings) -> bool:
    """The critic's refined request is a prompt already run with the seeds the policy gives the next
    round: running it would repeat that round (see the module notes)."""
    last = rounds[-1]
    result = last.result
    proposed = (result is not None and result.scored and bool(result.refined_request)
                and last.next_prompt == result.refined_request)
    if not proposed:
        return False  # a kept prompt runs again with fresh seeds (round_seeds)
    policy = tuple(s.seeds_for(len(rounds) + 1))
    return any(r.prompt == last.next_prompt and _seeds(r) == policy for r in rounds)


def stop_reason(rounds: Sequence[Round], s: LoopSettings, elapsed_s: float) -> str | None:
    """Why the run should stop after its last round, or None to go on. Checked in this order."""
    if not rounds:
        return None
    if meets_target(rounds[-1], s.target):
        return STOP_TARGET
    if len(rounds) >= s.rounds:
        return STOP_MAX_ROUNDS
    if s.on_converged == "stop" and converged(rounds, s):
        return STOP_CONVERGED
    if len(rounds) > s.patience:
        # Plateau: the best so far has not improved on the best `patience` rounds ago.
        now, before = _best(rounds), _best(rounds[: -s.patience])
        if now is None or not _improved(now, before, s.min_delta):
            return STOP_PLATEAU
    if s.time_budget is not None and elapsed_s >= s.time_budget:
        return STOP_TIME
    return None
