"""The `refine` kind of cluster work: jobs through the same loop as `gcr refine`, the store on the driver.

Worker side (`run_group`): load the group's models through the worker's ModelCache (once per worker
per distinct model), run the group's jobs through `gcr.runner.advance` (the loop, with the same
out-of-memory fallback as a local run) and stream every finished round back with its images' pixels:
a worker needs no access to the run store or to a shared file system (source images travel as the
file's bytes). Pixels travel raw, not as PNG: the driver writes the PNG with gcr's metadata anyway,
and encoding one first costs ~100 ms per 1024x1024 image (`gcr bench --workers`) where moving 3 MB
costs a few.

Driver side (`RefineDriver`): the only writer of the run store. It records each round with the
same `StoreSink` as a local batch (PNGs written, then one transaction), exactly once: a round that
arrives again after a worker died (its group handed out again) is recognised by its index and
skipped. A group handed out again is rebuilt from what the store holds, so its jobs continue from
their last committed round with their recorded prompts and seeds, as `--resume` does.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace

from gcr.devices import first_line
from gcr.errors import GcrError, UsageError
from gcr.loop import Job
from gcr.records import FAILED, TASKS, LoopSettings
from gcr.distributed.work import Group

KIND = "refine"
# Events of this kind (the worker's STATUS and LOG lines are the cluster's).
MODELS, UNLOADABLE, ROUND, JOB_DONE, GROUP_FAILED = "models", "unloadable", "round", "job_done", "group_failed"


@dataclass(frozen=True)
class JobWork:
    id: str                     # the batch job's id
    request: str                # the user's original request
    loop: LoopSettings          # with the seed the run recorded
    source: bytes | None = None  # the source image file's bytes (edits)
    rounds: tuple = ()          # rounds already committed (gcr.records.Round), without their errors


@dataclass(frozen=True)
class GroupWork:
    options: object             # gcr.runner.ModelOptions shared by the group
    has_image: bool
    jobs: tuple


# -- worker side ---------------------------------------------------------------------------------

def run_group(work: GroupWork, ctx) -> None:
    """Run a group of jobs on this worker; every event goes to `ctx.emit`."""
    from gcr.runner import advance, describe_models, load_models, unexpected

    opts = on_this_worker(work.options)
    ctx.status(f"loading models · {label([j.id for j in work.jobs])}")
    try:
        # Free what this group does not use first: a worker's GPU holds one group's models at a time.
        ctx.cache.keep_only({ctx.cache.generator_key(opts)}, {ctx.cache.critic_key(opts, t) for t in TASKS})
        models = load_models(opts, has_image=work.has_image, log=ctx.log, cache=ctx.cache)
    except Exception as e:  # noqa: BLE001 - the driver records these jobs as failed, the batch goes on
        ctx.emit((UNLOADABLE, str(e) if isinstance(e, GcrError) else f"{type(e).__name__}: {first_line(e)}"))
        return
    ctx.emit((MODELS, describe_models(models)))
    jobs = [Job(j.id, j.request, j.loop, source_image=_image(j.source), rounds=list(j.rounds)) for j in work.jobs]
    try:
        advance(models, jobs, StreamSink(ctx), ctx.log)
    except GcrError as e:  # out of memory under the most conservative plan too, a critic that is down ...
        ctx.emit((GROUP_FAILED, str(e), str(e)))
    except Exception as e:  # noqa: BLE001 - an unexpected fault still ends every run with a status
        reason = unexpected(e)
        ctx.emit((GROUP_FAILED, reason, f"The run failed ({reason}); completed rounds are kept: please "
                                        "report this with `gcr show --json`."))


def on_this_worker(opts):
    """A worker owns one GPU (Ray's CUDA_VISIBLE_DEVICES): `cuda:N` from the batch file means it."""
    if str(opts.device).startswith("cuda:"):
        return replace(opts, device="cuda")
    return opts


class StreamSink:
    """The loop's sink on a worker: each finished round goes to the driver, which stores it."""

    def __init__(self, ctx):
        self.ctx = ctx

    def stage(self, round_index, stage, jobs):
        most = max(j.settings.rounds for j in jobs) if jobs else round_index
        self.ctx.status(f"round {round_index}/{most} · {stage} · {label([j.id for j in jobs])}")

    def round_done(self, job, round_, images):
        self.ctx.emit((ROUND, job.id, round_, [Pixels.of(im) for im in images]))
        return round_

    def job_done(self, job):
        self.ctx.emit((JOB_DONE, job.id, job.stop_reason, job.error))


@dataclass(frozen=True)
class Pixels:
    """An image as it travels from a worker to the driver: exactly its pixels."""

    mode: str
    size: tuple
    data: bytes

    @classmethod
    def of(cls, image) -> Pixels:
        return cls(image.mode, image.size, image.tobytes())

    def image(self):
        from PIL import Image

        return Image.frombytes(self.mode, self.size, self.data)


def _image(data: bytes | None):
    if data is None:
        return None
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")  # as a local batch reads the file


def label(ids: list[str]) -> str:
    return ", ".join(ids[:2]) + (f" +{len(ids) - 2}" if len(ids) > 2 else "")


# -- driver side ---------------------------------------------------------------------------------

class RefineDriver:
    """The driver's side of a batch's refine groups (gcr.distributed.work.Work).

    `chunks` are lists of gcr.batch.PlannedJob that share models and settings; `job_failed(p,
    reason)` records a job as failed (its run too, when it has one) and `job_recorded(p)` records
    its run id with the batch."""

    def __init__(self, store, batch_id: str, chunks: list, *, job_failed, job_recorded, progress=None,
                 log=lambda msg: None):
        from gcr.runner import StoreSink

        self.store, self.batch_id, self.progress, self.log = store, batch_id, progress, log
        self.job_failed, self.job_recorded = job_failed, job_recorded
        self.planned = {p.spec.id: p for chunk in chunks for p in chunk}
        self.jobs: dict = {}     # batch job id -> Job mirroring what the store holds for its run
        self.sink = StoreSink(store, {}, progress)
        self._groups = [Group(KIND, tuple(p.spec.id for p in chunk), key=_model_key(chunk[0]),
                              label=label([p.spec.id for p in chunk])) for chunk in chunks if chunk]

    # -- Work ------------------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        return list(self._groups)

    def start(self, group: Group) -> Group | None:
        """The group as a worker gets it: its unfinished jobs, each with the rounds the store holds
        and its source image's bytes. None when none of them can run."""
        works = []
        for job_id in group.payload:
            p = self.planned[job_id]
            if p.status != "pending":
                continue
            try:
                source = _source_bytes(p)
            except GcrError as e:
                self.job_failed(p, str(e))
                continue
            rounds = []
            if p.run_id:  # a round that failed is done again
                self.jobs[job_id] = job = self._stored(p)
                self.sink.runs[job.id] = self.store.get_run(job.id)
                rounds = list(job.rounds)
            works.append(JobWork(job_id, p.spec.prompt, p.loop, source, tuple(rounds)))
        if not works:
            return None
        first = self.planned[works[0].id]
        payload = GroupWork(first.opts, first.spec.image is not None, tuple(works))
        return replace(group, payload=payload, label=label([w.id for w in works]))

    def handle(self, group: Group, event: tuple, worker: str) -> None:
        kind, *data = event
        if kind == MODELS:
            self._open_runs(group, data[0])
        elif kind == ROUND:
            self._commit(*data)
        elif kind == JOB_DONE:
            self._finish(*data)
        elif kind == UNLOADABLE:
            ids = self._unfinished(group)
            for p in ids:
                self.job_failed(p, f"models could not be loaded: {data[0]}")
            self._say_failed(ids, data[0])
        elif kind == GROUP_FAILED:
            reason, message = data
            ids = self._unfinished(group)
            for p in ids:
                self._end_run(p, FAILED, reason)
            self._say_failed(ids, message)

    def remaining(self, group: Group) -> Group | None:
        ids = tuple(j for j in _ids(group) if self.planned[j].status == "pending")
        return replace(group, payload=ids, label=label(list(ids))) if ids else None

    def abandon(self, group: Group, reason: str) -> None:
        ids = [self.planned[j] for j in _ids(group) if self.planned[j].status == "pending"]
        for p in ids:
            self.job_failed(p, reason)
        self._say_failed(ids, reason)

    # -- faults that stop the whole batch ----------------------------------------------------------

    def close_unfinished(self, status: str, reason: str) -> None:
        """Every run this batch holds that has not ended ends `status` (Ctrl-C: interrupted)."""
        from gcr.runner import close_unfinished

        unfinished = [p for p in self.planned.values() if p.status == "pending" and p.run_id]
        close_unfinished(self.store, [self.jobs.get(p.spec.id) or self._stored(p) for p in unfinished], status,
                         reason)

    # -- internals ---------------------------------------------------------------------------------

    def _open_runs(self, group: Group, described: dict) -> None:
        from gcr.runner import start_run

        for job in group.payload.jobs:
            p = self.planned[job.id]
            if p.run_id or p.status != "pending":
                continue
            run = start_run(self.store, described, p.spec.prompt, p.loop,
                            str(p.spec.image) if p.spec.image else None, batch_id=self.batch_id,
                            job_id=p.spec.id, opts=p.opts)
            p.run_id = run.id
            self.job_recorded(p)
            self.sink.runs[run.id] = run
            self.jobs[job.id] = Job(run.id, p.spec.prompt, p.loop)

    def _stored(self, p) -> Job:
        """A job not handed out yet in this batch, as its run stands in the store."""
        run = self.store.get_run(p.run_id)
        return Job(run.id, run.request, p.loop, rounds=[r for r in run.rounds if not r.error])

    def _commit(self, job_id: str, round_, pixels: list) -> None:
        job = self.jobs.get(job_id)
        if job is None or round_.index != job.next_index:
            return  # committed already (a retry after a worker died sent it again): stored once
        job.rounds.append(self.sink.round_done(job, round_, [p.image() for p in pixels]))

    def _finish(self, job_id: str, stop_reason, error) -> None:
        p, job = self.planned[job_id], self.jobs.get(job_id)
        if job is None or p.status != "pending":
            return
        job.stop_reason, job.error = stop_reason, error
        self.sink.job_done(job)
        run = self.sink.runs[job.id]
        p.status, p.error = run.status, run.error

    def _end_run(self, p, status: str, reason: str) -> None:
        from gcr import decide

        job = self.jobs.get(p.spec.id)
        if job is not None:
            run = self.store.finish_run(job.id, status=status, stop_reason=None,
                                        best_round=decide.best_round(job.rounds), error=reason)
            p.status, p.error = run.status, run.error
        else:
            self.job_failed(p, reason)
            return
        if self.progress and hasattr(self.progress, "job_finished"):
            self.progress.job_finished()

    def _unfinished(self, group: Group) -> list:
        return [self.planned[j] for j in _ids(group) if self.planned[j].status == "pending"]

    def _say_failed(self, planned: list, reason: str) -> None:
        if planned:
            from rich.text import Text

            self.log(Text(f"jobs {', '.join(p.spec.id for p in planned)} failed: {reason}", style="red"))


def _ids(group: Group) -> list[str]:
    payload = group.payload
    return [j.id for j in payload.jobs] if isinstance(payload, GroupWork) else list(payload)


def _model_key(p) -> str:
    o = p.opts
    return repr((o.critic, o.critic_url, o.critic_engine, o.generator, o.task, o.generation))


def _source_bytes(p) -> bytes | None:
    """The job's source image, read as a local batch reads it (checked by --check; gone or damaged since?)."""
    if not p.spec.image:
        return None
    from PIL import Image

    try:
        data = open(p.spec.image, "rb").read()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UsageError(f"the image {p.spec.image} of job {p.spec.id} cannot be read now "
                         f"({type(e).__name__})") from None
    return data
