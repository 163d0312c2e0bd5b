"""Turning critiques into decisions: which candidate, which round, and when to stop.

The reference sources disagree on these; the choices made here (and why):
- overall score = equal-weight mean of the applicable dimensions, N/A excluded (paper Eq. 13);
  computed by the parser, so every consumer agrees.
- an unscored critique never wins against a scored one, and ties go to the earlier candidate or
  round: the earlier one is cheaper to reproduce and was not chosen by noise.
- the target is met only when EVERY applicable dimension reaches it (the paper refines when ANY
  dimension is below 3.0; this is the same rule seen from the other side, with a tunable bar).
"""
from __future__ import annotations

from typing import Sequence

from .records import (
    STOP_MAX_ROUNDS,
    STOP_PLATEAU,
    STOP_TARGET,
    STOP_TIME,
    Candidate,
    LoopSettings,
    Round,
)


def best_candidate(candidates: Sequence[Candidate]) -> int:
    """Index of the highest-overall candidate; ties and all-unscored go to the first."""
    best = 0
    for i, c in enumerate(candidates):
        if c.overall is not None and (candidates[best].overall is None or c.overall > candidates[best].overall):
            best = i
    return best


def best_round(rounds: Sequence[Round]) -> int | None:
    """Index (1-based, as stored) of the highest-overall round; ties go to the earlier round."""
    best = None
    for r in rounds:
        if r.overall is not None and (best is None or r.overall > best.overall):
            best = r
    return best.index if best else None


def _best_overall(rounds: Sequence[Round]) -> float | None:
    scored = [r.overall for r in rounds if r.overall is not None]
    return max(scored) if scored else None


def meets_target(round_: Round, target: float) -> bool:
    applicable = [v for v in round_.scores.values() if v is not None]
    return bool(applicable) and all(v >= target for v in applicable)


def stop_reason(rounds: Sequence[Round], s: LoopSettings, elapsed_s: float) -> str | None:
    """Why the run should stop after its last round, or None to go on. Checked in this order."""
    if not rounds:
        return None
    if meets_target(rounds[-1], s.target):
        return STOP_TARGET
    if len(rounds) >= s.rounds:
        return STOP_MAX_ROUNDS
    if len(rounds) > s.patience:
        # Plateau: the best so far has not gained min_delta over the best `patience` rounds ago.
        now, before = _best_overall(rounds), _best_overall(rounds[: -s.patience])
        if now is None or (before is not None and now - before < s.min_delta):
            return STOP_PLATEAU
    if s.time_budget is not None and elapsed_s >= s.time_budget:
        return STOP_TIME
    return None
