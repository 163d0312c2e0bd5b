"""The Generate-Critique-Refine loop.

It steps a SET of jobs together, round by round: every active job's images for round k are made
in one generator call and judged in one critic call, then each job's own stop rules decide whether
it goes on. A single `gcr refine` is a set of one; `gcr batch` passes many. The loop touches disk
and terminal only through the `sink` it is given, so it is tested in milliseconds with doubles.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

from . import decide
from .critics.base import Critic, critique_with_retry
from .errors import CriticUnavailable, OutOfMemory
from .records import STOP_ERROR, Candidate, CritiqueRequest, GenerationRequest, LoopSettings, Round
from .rewrite import Rewriter


@dataclass(eq=False)  # jobs are keyed by identity inside a round
class Job:
    """One run in progress. `rounds` may hold rounds completed earlier (resume)."""

    id: str
    request: str                      # the user's ORIGINAL request: every round is judged against it
    settings: LoopSettings
    source_image: Any = None          # PIL image for edit jobs
    rounds: list = field(default_factory=list)
    stop_reason: str | None = None
    error: str | None = None

    @property
    def next_index(self) -> int:
        return len(self.rounds) + 1

    @property
    def next_prompt(self) -> str:
        return self.rounds[-1].next_prompt if self.rounds else self.request

    @property
    def next_seeds(self) -> list[int]:
        """Seeds of the next round's candidates: never those of an earlier round with this prompt."""
        return decide.round_seeds(self.settings, self.rounds, self.next_prompt, self.next_index)

    @property
    def elapsed_s(self) -> float:
        return sum(r.timings.get("total_s", 0.0) for r in self.rounds)


class Generator(Protocol):
    """What the loop needs from a generator (gcr.generate.DiffusersGenerator; a fake in tests)."""

    id: str            # preset name or source, for records and tables
    task: str          # T2I or EDIT

    def generate(self, requests: Sequence[GenerationRequest]) -> list: ...


class Sink(Protocol):
    """Where the loop's results go: the run store and the terminal, or a list in a test."""

    def stage(self, round_index: int, stage: str, jobs: Sequence[Job]) -> None: ...

    def round_done(self, job: Job, round_: Round, images: list) -> Round:
        """Persist the round (images included); return it with image paths filled in."""
        ...

    def job_done(self, job: Job) -> None: ...


def run_loop(jobs: Sequence[Job], generator: Generator, critic: Critic, rewriter: Rewriter, sink: Sink,
             task: str, clock: Callable[[], float] = time.perf_counter) -> Sequence[Job]:
    active = []
    for job in jobs:  # a resumed job may already be done
        job.stop_reason = decide.stop_reason(job.rounds, job.settings, job.elapsed_s)
        (sink.job_done(job) if job.stop_reason else active.append(job))

    while active:
        index = min(j.next_index for j in active)
        group = [j for j in active if j.next_index == index]  # resumed jobs catch up first

        # 1. Generate every candidate of every job in one call.
        sink.stage(index, "generate", group)
        t0 = clock()
        images, failed = _generate(generator, group, index)
        t_gen = clock() - t0
        for job, err in failed.items():
            job.error, job.stop_reason = err, STOP_ERROR
            job.rounds.append(sink.round_done(job, Round(index, job.next_prompt, error=err), []))
        group = [j for j in group if j not in failed]

        # 2. Critique them all against the ORIGINAL requests; retry unreadable or incomplete ones once.
        sink.stage(index, "critique", group)
        t0 = clock()
        verdicts, failed = _critique(critic, group, images, task)
        t_crit = clock() - t0
        for job, err in failed.items():  # the images are kept, unscored, with the reason
            job.error, job.stop_reason = err, STOP_ERROR
            unjudged = tuple(Candidate(seed) for seed in job.next_seeds)
            job.rounds.append(sink.round_done(job, Round(index, job.next_prompt, unjudged, error=err),
                                              images[job]))
        group = [j for j in group if j not in failed]

        # 3. Per job: choose the round's best candidate, rewrite the prompt, record, decide.
        sink.stage(index, "rewrite", group)
        for job in group:
            t0 = clock()
            candidates = tuple(verdicts[job])
            round_ = Round(index, job.next_prompt, candidates, decide.best_candidate(candidates))
            rewrite = rewriter.rewrite(job.request, [*job.rounds, round_])
            timings = {"generate_s": t_gen, "critique_s": t_crit, "rewrite_s": clock() - t0,
                       "batch": len(group)}
            timings["total_s"] = timings["generate_s"] + timings["critique_s"] + timings["rewrite_s"]
            round_ = replace(round_, timings=timings, next_prompt=rewrite.prompt,
                             rewrite_note=rewrite.note)
            job.rounds.append(sink.round_done(job, round_, images[job]))
            job.stop_reason = decide.stop_reason(job.rounds, job.settings, job.elapsed_s)

        for job in [j for j in active if j.stop_reason]:
            sink.job_done(job)
        active = [j for j in active if not j.stop_reason]
    return jobs


def _generate(generator: Generator, group: list[Job], index: int):
    """Images per job, and the jobs whose generation failed (with why)."""
    requests = {job: [GenerationRequest(job.next_prompt, seed, job.source_image)
                      for seed in job.next_seeds] for job in group}
    try:
        flat = generator.generate([r for rs in requests.values() for r in rs])
    except OutOfMemory:
        raise  # the caller changes the memory plan or stops the run cleanly
    except Exception as e:  # noqa: BLE001 - recorded with the round, completed rounds are kept
        if len(group) == 1:
            return {}, {group[0]: f"generation failed: {e}"}
        # Find the job that broke the batch: the others must not pay for it.
        images, failed = {}, {}
        for job in group:
            try:
                images[job] = generator.generate(requests[job])
            except OutOfMemory:
                raise
            except Exception as e:  # noqa: BLE001 - recorded with the job, the batch goes on
                failed[job] = f"generation failed: {e}"
        return images, failed
    images, at = {}, 0
    for job, rs in requests.items():
        images[job], at = flat[at: at + len(rs)], at + len(rs)
    return images, {}


def _critique(critic: Critic, group: list[Job], images: dict, task: str):
    """Parsed candidates per job, and the jobs whose critique failed (with why). One batched critic
    call, plus one for the unreadable or incomplete ones."""
    try:
        return _critique_group(critic, group, images, task), {}
    except OutOfMemory:
        raise  # the caller changes the memory plan, or stops the runs cleanly
    except Exception as e:  # noqa: BLE001 - recorded with the round, completed rounds are kept
        if len(group) == 1 or isinstance(e, CriticUnavailable):
            return {}, {job: f"critique failed: {e}" for job in group}
    # Find the job that broke the batch: the others must not pay for it.
    verdicts, failed = {}, {}
    for job in group:
        try:
            verdicts.update(_critique_group(critic, [job], images, task))
        except OutOfMemory:
            raise
        except Exception as e:  # noqa: BLE001 - recorded with the job, the batch goes on
            failed[job] = f"critique failed: {e}"
    return verdicts, failed


def _critique_group(critic: Critic, group: list[Job], images: dict, task: str) -> dict:
    keys = [(job, i) for job in group for i in range(len(images[job]))]
    requests = [CritiqueRequest(job.request, images[job][i], job.source_image) for job, i in keys]
    verdicts = dict(zip(keys, critique_with_retry(critic, requests, task)))  # one retry of the unreadable

    out = {job: [] for job in group}
    seeds = {job: job.next_seeds for job in group}
    for job, i in keys:
        v = verdicts[(job, i)]
        p = v.critique
        out[job].append(Candidate(
            seed=seeds[job][i], raw_critique=v.text,
            scores=dict(p.scores), overall=p.overall, refined_request=p.refined_request,
            summary=p.summary, justifications=dict(p.justifications),
            refinement_comments=p.refinement_comments, problems=tuple(p.problems),
            attempts=v.attempts, missing=tuple(p.missing)))
    return out
