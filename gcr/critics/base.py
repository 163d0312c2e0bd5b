"""What every way of running the critic provides: one method, raw text in, raw text out."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

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
