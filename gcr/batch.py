"""`gcr batch`: many jobs from a YAML file, models loaded once, rounds batched, resumable.

A batch is a record in the run store; each job's work is an ordinary run. Jobs that share models
and generation settings advance together through the same loop as `gcr refine` (one generator call
and one critic call per round for the whole group). After a crash or Ctrl-C, `--resume` finds the
batch for the same file and continues: finished jobs are skipped, unfinished ones continue from
their last stored round with the seeds and prompts recorded in their runs.
"""
from __future__ import annotations

import random
import secrets
import shlex
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from rich.text import Text

from .devices import first_line
from .errors import GcrError, OutOfMemory, StorageError, UsageError
from .loop import Job
from .owner import lock_name
from .records import COMPLETED, FAILED, INTERRUPTED, LoopSettings
from .runner import ModelCache, ModelOptions, load_models, refine_jobs, start_run
from .store import RunStore, slug

FINISHED = (COMPLETED,)  # what --resume skips: interrupted and failed jobs continue
# Compiling the critic's decode step costs ~2 min once and saves ~1.5 s per critique at full size
# (H100, bench-results/h100-2026-11-25.json): it pays after about 70 critiques.
COMPILE_PAYS_AFTER = 70


@dataclass
class PlannedJob:
    spec: object            # batchfile.JobSpec
    opts: ModelOptions
    loop: LoopSettings
    run_id: str | None = None
    status: str = "pending"
    error: str | None = None


def plan_job(spec, gen_batch: int = 1) -> PlannedJob:
    """A validated job's options, split into what loads models, what steers the loop, what draws."""
    from .generate import GenerationSettings

    o = spec.options
    generation = GenerationSettings(steps=o.get("steps"), guidance=o.get("guidance"), width=o.get("width"),
                                    height=o.get("height"), negative_prompt=o.get("negative_prompt"),
                                    extra=dict(o.get("gen_args") or {}), batch=gen_batch)
    opts = ModelOptions(
        generator=o.get("generator") or ("flux-kontext" if spec.image else "flux-dev"), task=o.get("task"),
        critic=o.get("critic"), critic_url=o.get("critic_url"), critic_model=o.get("critic_model"),
        api_key_env=o.get("api_key_env"), critic_timeout=o.get("critic_timeout"),
        critic_engine=o.get("critic_engine"), vllm_bin=o.get("vllm_bin"),
        critic_max_new_tokens=o.get("max_new_tokens", 2048),
        device=o.get("device", "auto"), dtype=o.get("dtype", "auto"), offload=o.get("offload"),
        memory=o.get("memory") or "auto", critic_decode=o.get("critic_decode") or "auto",
        critic_speculate=o.get("critic_speculate"), critic_quant=o.get("critic_quant") or "none",
        allow_remote_code=bool(o.get("allow_remote_code", False)), generation=generation, judge=o.get("judge"))
    loop = LoopSettings(**{k: o[k] for k in ("rounds", "target", "min_delta", "patience", "time_budget",
                                             "candidates", "seed_policy", "on_converged") if o.get(k) is not None},
                        seed=o["seed"] if o.get("seed") is not None else random.randrange(2**31))
    return PlannedJob(spec, opts, loop)


def new_batch_id(file: Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"batch-{stamp}-{slug(file.stem, 16)}-{secrets.token_hex(2)}"


def prepare(store: RunStore, spec, *, resume: bool, force: bool, gen_batch: int = 1
            ) -> tuple[str, list[PlannedJob]]:
    """Open (or reopen) the batch record, owned by this process from here on; return its id and the
    jobs with their stored runs. A batch that a live process is running is refused."""
    file = str(Path(spec.path).resolve())
    planned = [plan_job(j, gen_batch) for j in spec.jobs]
    if not resume:
        batch_id = new_batch_id(Path(file))
        store.create_batch(batch_id, file, [(p.spec.id, p.spec.fingerprint()) for p in planned])
        return batch_id, planned

    batch = store.latest_batch_for(file)
    if batch is None:
        raise UsageError(f"There is no batch of {spec.path} to resume in {store.root}: run it without --resume.")
    lock = lock_name("batch", batch["id"])
    store.claim("batch", [batch["id"]], lock)  # refuses when a live process runs this batch
    try:
        _reopen(store, batch["id"], planned, force, spec.path, lock)
    except BaseException:
        store.release(lock)
        raise
    return batch["id"], planned


def _reopen(store: RunStore, batch_id: str, planned: list[PlannedJob], force: bool, path, lock: str) -> None:
    """Match the file's jobs to the stored ones: completed jobs are skipped, interrupted and failed
    ones continue from their last good round with the seeds their runs recorded."""
    stored = {j["job_id"]: j for j in store.get_batch(batch_id)["jobs"]}
    changed, continuing = [], []
    for p in planned:
        row = stored.get(p.spec.id)
        run = store.get_run(row["run_id"]) if row and row["run_id"] else None
        if run and run.status in FINISHED:
            p.run_id, p.status, p.error = run.id, run.status, run.error
            continue
        if row and row["fingerprint"] != p.spec.fingerprint():
            if not force:
                changed.append(p.spec.id)
                continue
            run = None  # --force: the changed job starts over
        if run:  # unfinished: continue with the seeds its run recorded
            p.run_id, p.loop = run.id, LoopSettings(**run.settings["loop"])
            continuing.append(run.id)
    if changed:
        raise UsageError(f"{len(changed)} unfinished job(s) changed in {path} since the batch started "
                         f"({', '.join(changed)}): restore them, or pass --force to restart those jobs.")
    if continuing:  # refuses when a live `gcr resume` is advancing one of them
        done = store.claim("run", continuing, lock)
        for p in planned:
            if p.run_id in done:  # a `gcr resume` finished it meanwhile
                p.status = COMPLETED
    for position, p in enumerate(planned):
        if p.status not in FINISHED:
            store.set_batch_job(batch_id, p.spec.id, run_id=p.run_id, fingerprint=p.spec.fingerprint(),
                                position=position)


def run_batch(store: RunStore, spec, *, resume=False, force=False, batch_size=8, gen_batch=1,
              progress=None, log=lambda msg: None, resume_command: str | None = None,
              cache: ModelCache | None = None, cluster=None, workers=None) -> dict:
    """Run (or continue) every job of a batch file; returns the batch record. A job that fails is
    recorded with its reason and the others go on; a fault that stops the whole batch (Ctrl-C, out
    of memory, the store failing) leaves it interrupted or failed, resumable with `resume_command`.
    Critic engines started for the batch stop with it (or with `cache`, when the caller owns one).
    With `cluster` (gcr.distributed.cluster.ClusterOptions) the jobs run on Ray workers started for
    the batch, or on `workers`, a gcr.distributed.cluster.Cluster the caller started (its workers
    keep their models from one batch to the next); this process stores their rounds."""
    if cluster is not None or workers is not None:
        check_cluster_jobs(spec, workers.options if workers is not None else cluster)  # before anything starts
    if cluster is not None and workers is None:
        from .distributed.cluster import Cluster

        # The cluster first: a batch it cannot run (too few GPUs, no cluster at that address) is
        # refused before the batch is recorded.
        gpus = any(j.options.get("device", "auto") != "cpu" for j in spec.jobs)
        with Cluster(cluster, gpus=gpus, progress=progress, log=log) as workers:
            return run_batch(store, spec, resume=resume, force=force, batch_size=batch_size, gen_batch=gen_batch,
                             progress=progress, log=log, resume_command=resume_command, cache=cache,
                             cluster=cluster, workers=workers)
    if cache is None:
        with ModelCache(runs_dir=store.root) as cache:
            return run_batch(store, spec, resume=resume, force=force, batch_size=batch_size, gen_batch=gen_batch,
                             progress=progress, log=log, resume_command=resume_command, cache=cache,
                             cluster=cluster, workers=workers)
    batch_id, planned = prepare(store, spec, resume=resume, force=force, gen_batch=gen_batch)
    if resume:
        log(resume_summary(store, batch_id, planned))
    again = resume_command or f"gcr batch {shlex.quote(str(spec.path))} --resume" + (
        workers.options.flags() if workers is not None else "")
    try:
        _run_jobs(store, batch_id, planned, batch_size, progress, log, cache, workers)
        failed = [p for p in planned if p.status != COMPLETED]
        store.set_batch_status(batch_id, FAILED if failed else COMPLETED)
        return batch_record(store, batch_id, spec.path)
    except KeyboardInterrupt:
        _set_status_if_possible(store, batch_id, INTERRUPTED)
        raise
    except StorageError as e:
        _set_status_if_possible(store, batch_id, FAILED)
        raise e.then(f"continue the batch with `{again}` (completed rounds are kept)") from None
    except GcrError as e:  # out of memory even after a more conservative plan: no job can go on
        _set_status_if_possible(store, batch_id, FAILED)
        raise GcrError(f"{str(e).rstrip('.')}; the batch stopped: continue it with `{again}` after "
                       "fixing that (completed rounds are kept).") from None
    finally:
        store.release(lock_name("batch", batch_id))


def _set_status_if_possible(store: RunStore, batch_id: str, status: str) -> None:
    try:
        store.set_batch_status(batch_id, status)
    except GcrError:
        pass  # the store cannot be written: the batch reads as interrupted once this process is gone


def check_cluster_jobs(spec, cluster) -> None:
    """What cannot run on Ray workers, refused in one sentence before anything starts."""
    from .distributed.cluster import require_ray

    require_ray(cluster)
    engines = [j.id for j in spec.jobs if j.options.get("critic_engine")]
    if engines:
        raise UsageError(f"critic_engine (job {engines[0]}) starts a critic server for one process and cannot "
                         "serve Ray workers: start one server (`gcr critic start`, or vllm serve) and give its URL "
                         "as critic_url, or drop --workers.")


def _run_jobs(store: RunStore, batch_id: str, planned: list[PlannedJob], batch_size: int, progress, log,
              cache: ModelCache, workers=None) -> None:
    pending = [p for p in planned if p.status not in FINISHED]
    per_process = sum(p.loop.rounds * p.loop.candidates for p in pending) / (len(workers.slots) if workers else 1)
    if per_process >= COMPILE_PAYS_AFTER:
        from .devices import resolve_device

        for p in pending:
            on_gpu = (workers.gpu_workers and p.opts.device != "cpu") if workers else \
                resolve_device(p.opts.device).startswith("cuda")
            if p.opts.critic_decode == "auto" and on_gpu:
                p.opts = replace(p.opts, critic_decode="compile")
    if progress:
        progress.start_jobs(len(planned), done=len(planned) - len(pending))

    # Models: order jobs so each critic, and each generator, is loaded once.
    def model_key(p):
        return (repr(p.opts.critic), repr(p.opts.critic_url), repr(p.opts.critic_engine), repr(p.opts.generator),
                repr(p.opts.task), repr(p.opts.generation), repr(p.opts.judge))
    pending.sort(key=model_key)
    groups = []
    for p in pending:
        if groups and model_key(groups[-1][0]) == model_key(p):
            groups[-1].append(p)
        else:
            groups.append([p])

    def job_failed(p: PlannedJob, error: str) -> None:
        p.status, p.error = FAILED, error
        store.set_batch_job(batch_id, p.spec.id, run_id=p.run_id, fingerprint=p.spec.fingerprint(),
                            position=planned.index(p), error=p.error)
        if p.run_id:  # its run ends failed too, with the same reason
            run = store.get_run(p.run_id)
            store.finish_run(p.run_id, status=FAILED, stop_reason=None, best_round=run.best_round, error=error)
        if progress:
            progress.job_finished()

    if workers is not None:
        _run_on_cluster(store, batch_id, planned, [g[i:i + batch_size] for g in groups
                                                   for i in range(0, len(g), batch_size)],
                        job_failed, progress, log, workers)
        return
    for gi, group in enumerate(groups):
        later = [p for g in groups[gi:] for p in g]
        first = group[0]
        try:
            models = load_models(first.opts, has_image=first.spec.image is not None, log=log, cache=cache)
        except Exception as e:  # noqa: BLE001 - one job's models failing must not stop the others
            reason = str(e) if isinstance(e, GcrError) else f"{type(e).__name__}: {first_line(e)}"
            for p in group:
                job_failed(p, f"models could not be loaded: {reason}")
            log(Text(f"jobs {', '.join(p.spec.id for p in group)} failed: {reason}", style="red"))
            continue
        cache.keep_only({cache.generator_key(p.opts) for p in later},
                        {cache.critic_key(p.opts, models.task) for p in later})

        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            jobs, runs = [], {}
            for p in chunk:
                try:
                    source = _source_image(p)
                except GcrError as e:
                    job_failed(p, str(e))
                    continue
                if p.run_id:
                    run = store.get_run(p.run_id)
                    rounds = [r for r in run.rounds if not r.error]  # a round that failed is done again
                else:
                    run = start_run(store, models, p.spec.prompt, p.loop,
                                    str(p.spec.image) if p.spec.image else None, batch_id=batch_id,
                                    job_id=p.spec.id, opts=p.opts)
                    p.run_id, rounds = run.id, []
                    store.set_batch_job(batch_id, p.spec.id, run_id=run.id, fingerprint=p.spec.fingerprint(),
                                        position=planned.index(p))
                runs[run.id] = run
                jobs.append(Job(run.id, p.spec.prompt, p.loop, source_image=source, rounds=rounds))
            if not jobs:
                continue
            try:
                finished = refine_jobs(store, models, jobs, runs, progress)
            except (StorageError, OutOfMemory):
                raise  # no job can go on
            except GcrError as e:  # an unexpected fault: these runs ended failed, the other jobs go on
                log(Text(f"jobs {', '.join(p.spec.id for p in chunk)} failed: {e}", style="red"))
                finished = {run_id: store.get_run(run_id) for run_id in runs}
            for p in chunk:
                if p.run_id in finished:
                    run = finished[p.run_id]
                    p.status, p.error = run.status, run.error


def _run_on_cluster(store: RunStore, batch_id: str, planned: list[PlannedJob], chunks: list, job_failed,
                    progress, log, workers) -> None:
    """The chunks a local batch would run one after another, handed to Ray workers as they become
    free; this process stores every round they send (gcr.distributed.refine)."""
    from .distributed.refine import RefineDriver
    from .runner import unexpected

    def job_recorded(p: PlannedJob) -> None:
        store.set_batch_job(batch_id, p.spec.id, run_id=p.run_id, fingerprint=p.spec.fingerprint(),
                            position=planned.index(p))

    driver = RefineDriver(store, batch_id, chunks, job_failed=job_failed, job_recorded=job_recorded,
                          progress=progress, log=log)
    try:
        workers.run(driver)
    except KeyboardInterrupt:
        driver.close_unfinished(INTERRUPTED, "interrupted by the user")
        raise
    except GcrError as e:  # the store failing: no job can go on
        driver.close_unfinished(FAILED, str(e))
        raise
    except Exception as e:  # an unexpected fault still ends every run with a status
        reason = unexpected(e)
        driver.close_unfinished(FAILED, reason)
        raise GcrError(f"The batch failed ({reason}); completed rounds are kept: please report this with "
                       "`gcr show --json`") from e


def _source_image(p: PlannedJob):
    if not p.spec.image:
        return None
    from PIL import Image

    try:
        with Image.open(p.spec.image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # checked by --check; gone or damaged since
        raise UsageError(f"the image {p.spec.image} of job {p.spec.id} cannot be read now "
                         f"({type(e).__name__})") from None


def resume_summary(store: RunStore, batch_id: str, planned: list[PlannedJob]) -> str:
    """What a resume skips (finished jobs), continues (with the round it starts at) and starts."""
    skipped = [p.spec.id for p in planned if p.status in FINISHED]
    continued, started = [], []
    for p in planned:
        if p.status in FINISHED:
            continue
        done = len([r for r in store.get_run(p.run_id).rounds if not r.error]) if p.run_id else 0
        (continued.append(f"{p.spec.id} at round {done + 1}") if done else started.append(p.spec.id))
    parts = [f"skipping {_count(skipped, 'finished job')}{_names(skipped)}",
             f"continuing {_count(continued, 'job')}{_names(continued)}"]
    if started:
        parts.append(f"starting {_count(started, 'job')} from round 1{_names(started)}")
    return f"resuming batch {batch_id}: " + "; ".join(parts)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _names(items: list, most: int = 8) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")
    return f" ({shown})"


def batch_record(store: RunStore, batch_id: str, file=None) -> dict:
    batch = store.get_batch(batch_id)
    jobs = []
    for j in batch["jobs"]:
        run = store.get_run(j["run_id"]) if j["run_id"] else None
        jobs.append({"id": j["job_id"], "run_id": j["run_id"],
                     "status": run.status if run else ("failed" if j["error"] else "pending"),
                     "error": run.error if run and run.error else j["error"],
                     "best_overall": run.best_overall if run else None})
    return {"id": batch_id, "file": str(file or batch["file"]), "status": batch["status"],
            "owner": batch["owner"], "created": batch["created"], "jobs": jobs}
