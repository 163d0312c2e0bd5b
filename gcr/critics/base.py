"""What every way of running the critic provides: one method, raw text in, raw text out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from gcr.parse import Critique, parse_critique
from gcr.records import CritiqueRequest

# Sampling for retries: Qwen3-VL-Instruct's own recommended settings, with a fixed seed so a rerun of
# the same retry writes the same text.
RETRY_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
RETRY_SEED = 0


@runtime_checkable
class Critic(Protocol):
    id: str      # what the user named (preset, directory, hub id or server model); recorded with each run
    task: str    # T2I or EDIT: picks the prompt and the image slots

    def critique(self, requests: Sequence[CritiqueRequest], retry: bool = False) -> list[str]:
        """The critic's raw text for each request, in order. `retry=True` asks again for requests whose
        first critique was unreadable: a greedy critic would repeat itself, so retries sample instead."""
        ...


@dataclass(frozen=True)
class Verdict:
    """One request's critique as kept: the raw text, what the parser read, and the calls it took."""

    text: str
    critique: Critique
    attempts: int = 1    # 2: the first text was unreadable or incomplete, and the critic was asked again


def critique_with_retry(critic: Critic, requests: Sequence[CritiqueRequest], task: str) -> list[Verdict]:
    """Every request critiqued in one batched call; an unreadable or incomplete critique (an expected
    dimension neither scored nor N/A, e.g. cut off) gets one more, sampled, try, and the better of the
    two texts is kept (ties: the newer). The refine loop and `gcr score` both ask the critic this way."""
    requests = list(requests)
    texts = list(critic.critique(requests)) if requests else []
    parsed = [parse_critique(t, task) for t in texts]
    attempts = [1] * len(requests)
    retry = [i for i, p in enumerate(parsed) if not p.complete]
    if retry:
        again = critic.critique([requests[i] for i in retry], retry=True)
        for i, text in zip(retry, again):
            attempts[i] = 2
            p = parse_critique(text, task)
            if _quality(p) >= _quality(parsed[i]):
                texts[i], parsed[i] = text, p
    return [Verdict(t, p, a) for t, p, a in zip(texts, parsed, attempts)]


def _quality(p: Critique) -> tuple:
    """How usable a parsed critique is: complete, then readable, then fewer unjudged dimensions."""
    return (p.complete, p.readable, -len(p.missing))
