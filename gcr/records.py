"""What a run is made of, as plain frozen data: no tensors, no I/O.

Images live on disk; stored records hold their paths (only the two requests, which never reach the
store, carry PIL images in memory). Everything here round-trips through JSON
(`to_dict` / `from_dict`) so the store, `--json` output and tests all see the same shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

T2I = "t2i"
EDIT = "edit"
TASKS = (T2I, EDIT)

# What the critic judges per task, in the order it writes them (the edit critic also sees the source).
DIMENSIONS = {
    T2I: ("text_faithfulness", "physical_quality", "text_rendering"),
    EDIT: ("text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering"),
}

# Run statuses.
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
INTERRUPTED = "interrupted"

# Stop reasons.
STOP_TARGET = "target"          # every applicable dimension reached --target
STOP_MAX_ROUNDS = "max_rounds"  # --rounds used up
STOP_PLATEAU = "plateau"        # best overall did not improve by --min-delta in --patience rounds
STOP_TIME = "time_budget"       # --time-budget seconds spent
STOP_ERROR = "error"            # a round failed; completed rounds are kept
STOP_CONVERGED = "converged"    # the critic proposed a prompt already run with the same seeds

# What to do when the next round would repeat an earlier one (same prompt, same seeds).
ON_CONVERGED = ("stop", "reseed")


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make: its prompt, its seed and, for edit models, the image to edit."""

    prompt: str
    seed: int
    source_image: Any = None          # PIL image (edit task only)


@dataclass(frozen=True)
class CritiqueRequest:
    """One thing to judge. `request` is the user's ORIGINAL request, never a refined one: the critic
    scores against what the user asked for."""

    request: str
    image: Any                        # PIL image to judge
    source_image: Any = None          # edit task only: the image that was edited


@dataclass(frozen=True)
class Candidate:
    """One image of a round and the critic's verdict on it."""

    seed: int
    image: str = ""                 # path of the PNG, relative to the runs dir ("" until stored)
    raw_critique: str = ""          # the critic's text, kept verbatim even when unreadable
    scores: dict = field(default_factory=dict)  # dimension -> float, or None for N/A
    overall: float | None = None    # mean of the float scores; None = unscored
    refined_request: str = ""
    summary: str = ""
    justifications: dict = field(default_factory=dict)
    refinement_comments: str = ""   # the critic's notes on how to refine the request
    problems: tuple = ()            # what the parser could not read (empty = clean critique)
    attempts: int = 1               # critic calls spent (2 = the first text was unreadable or incomplete)
    missing: tuple = ()             # expected dimensions judged neither with a score nor N/A
    judge: float | None = None      # the independent judge's score (gcr.judge): reported, never optimized

    @property
    def scored(self) -> bool:
        return self.overall is not None

    @property
    def complete(self) -> bool:
        """Scored, and every expected dimension has a score or an explicit N/A (gcr.decide)."""
        return self.scored and not self.missing


@dataclass(frozen=True)
class Round:
    """One Generate-Critique-Refine step of one run. Index starts at 1."""

    index: int
    prompt: str                       # what the generator was given this round
    candidates: tuple = ()            # Candidate, one per seed; `chosen` is the round's result
    chosen: int = 0
    timings: dict = field(default_factory=dict)  # generate_s, critique_s, rewrite_s
    next_prompt: str | None = None    # what the rewriter proposed for the next round
    rewrite_note: str = ""            # why the prompt did or did not change
    error: str | None = None

    @property
    def result(self) -> Candidate | None:
        return self.candidates[self.chosen] if self.candidates else None

    # The chosen candidate's fields, flattened: what tables and `--json` show.
    @property
    def seed(self) -> int | None:
        return self.result.seed if self.result else None

    @property
    def image(self) -> str:
        return self.result.image if self.result else ""

    @property
    def scores(self) -> dict:
        return dict(self.result.scores) if self.result else {}

    @property
    def overall(self) -> float | None:
        return self.result.overall if self.result else None

    @property
    def refined_request(self) -> str:
        return self.result.refined_request if self.result else ""

    @property
    def raw_critique(self) -> str:
        return self.result.raw_critique if self.result else ""

    @property
    def complete(self) -> bool:
        return self.result.complete if self.result else False

    @property
    def judge(self) -> float | None:
        """The independent judge's score of the round's result (None without a judge)."""
        return self.result.judge if self.result else None

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "seed": self.seed,
            "image": self.image,
            "scores": self.scores,
            "overall": self.overall,
            "complete": self.complete,
            "judge": self.judge,
            "refined_request": self.refined_request,
            "raw_critique": self.raw_critique,
            "timings": dict(self.timings),
            "error": self.error,
            "next_prompt": self.next_prompt,
            "rewrite_note": self.rewrite_note,
            "chosen": self.chosen,
            "candidates": [_candidate_dict(c) for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Round:
        return cls(
            index=d["index"],
            prompt=d["prompt"],
            candidates=tuple(_candidate(c) for c in d.get("candidates", ())),
            chosen=d.get("chosen", 0),
            timings=dict(d.get("timings") or {}),
            next_prompt=d.get("next_prompt"),
            rewrite_note=d.get("rewrite_note", ""),
            error=d.get("error"),
        )


def _candidate_dict(c: Candidate) -> dict:
    d = asdict(c)
    d["problems"] = list(c.problems)
    d["missing"] = list(c.missing)
    return d


def _candidate(d: dict) -> Candidate:
    problems = tuple(d.get("problems", ()))
    if "missing" in d:
        missing = tuple(d["missing"])
    else:  # stored before completeness was recorded: the parser named each unjudged dimension
        scores = d.get("scores") or {}
        missing = tuple(dict.fromkeys(
            p.split(":", 1)[0] for p in problems
            if ":" in p and p.split(":", 1)[0] in DIMENSIONS[EDIT] and p.split(":", 1)[0] not in scores
            and not p.endswith("ignored")))
    return Candidate(**{**d, "problems": problems, "missing": missing})




@dataclass(frozen=True)
class LoopSettings:
    """The knobs of the refine loop. Defaults are defined here and nowhere else."""

    rounds: int = 4               # most rounds to run
    target: float = 3.5           # stop when every applicable dimension is >= target
    min_delta: float = 0.05       # smaller gains than this count as no improvement
    patience: int = 2             # rounds without improvement before stopping
    time_budget: float | None = None  # seconds; checked between rounds
    candidates: int = 1           # images (seeds) per round; the best one is the round's result
    seed: int = 0                 # base seed (the CLI draws a random one when not given)
    seed_policy: str = "fixed"    # fixed: same seeds every round; vary: new seeds each round
    on_converged: str = "stop"    # the critic proposes a prompt already run: stop, or reseed (gcr.decide)

    def seeds_for(self, round_index: int) -> list[int]:
        """The seed policy's seeds for a round's candidates: a pure function of settings. A round
        that would repeat an earlier one gets other seeds (gcr.decide.round_seeds)."""
        return self.seed_set(0 if self.seed_policy == "fixed" else round_index - 1)

    def seed_set(self, k: int) -> list[int]:
        """The k-th set of `candidates` consecutive seeds after the base seed (k = 0, 1, ...)."""
        return [self.seed + k * self.candidates + c for c in range(self.candidates)]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Run:
    """A whole refine run as stored: settings, provenance and every completed round."""

    id: str
    request: str
    task: str
    generator: str
    critic: str
    created: str = ""
    source_image: str | None = None
    settings: dict = field(default_factory=dict)   # loop + generation settings, resolved
    versions: dict = field(default_factory=dict)   # package versions at run time
    device: str = ""
    status: str = RUNNING
    stop_reason: str | None = None
    best_round: int | None = None
    final_image: str | None = None
    error: str | None = None
    batch_id: str | None = None
    rounds: tuple = ()
    owner: dict | None = None                      # host, pid, since: the live process advancing it

    @property
    def best(self) -> Round | None:
        return next((r for r in self.rounds if r.index == self.best_round), None)

    @property
    def best_overall(self) -> float | None:
        best = self.best
        return best.overall if best else None

    def with_(self, **changes) -> Run:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "request": self.request,
            "task": self.task,
            "generator": self.generator,
            "critic": self.critic,
            "created": self.created,
            "source_image": self.source_image,
            "settings": self.settings,
            "versions": self.versions,
            "device": self.device,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "best_round": self.best_round,
            "best_overall": self.best_overall,
            "final_image": self.final_image,
            "error": self.error,
            "batch_id": self.batch_id,
            "owner": self.owner,
            "rounds": [r.to_dict() for r in self.rounds],
        }
