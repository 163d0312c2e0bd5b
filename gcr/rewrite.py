"""Rewriters: from the rounds so far, the prompt for the next round.

One method, so other strategies (an LLM rewriter, prompt ensembling, a human in the loop) can be
added without touching the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .records import Round


@dataclass(frozen=True)
class Rewrite:
    prompt: str
    note: str = ""   # why the prompt did or did not change; stored with the round


class Rewriter(Protocol):
    name: str

    def rewrite(self, request: str, history: Sequence[Round]) -> Rewrite:
        """`request` is the user's original request; `history[-1]` is the round just judged."""
        ...


class RefinedRequestRewriter:
    """The paper's rewriter: the critic's own Refined Request becomes the next prompt.

    A prompt is never rewritten from a critique that could not be read: the loop would then be
    steered by noise. The prompt stays and the record says why. An incomplete critique's Refined
    Request is used (see gcr.decide for why), and the note says the critique was incomplete.
    """

    name = "refined-request"

    def rewrite(self, request: str, history: Sequence[Round]) -> Rewrite:
        last = history[-1]
        result = last.result
        if result is None or not result.scored:
            return Rewrite(last.prompt, "critique unreadable: prompt kept")
        if not result.refined_request:
            return Rewrite(last.prompt, "critic gave no refined request: prompt kept")
        if result.refined_request == last.prompt:
            return Rewrite(last.prompt, "refined request equals the prompt")
        if not result.complete:
            return Rewrite(result.refined_request, "critic's refined request (critique incomplete: "
                                                   f"{', '.join(result.missing)} not judged)")
        return Rewrite(result.refined_request, "critic's refined request")
