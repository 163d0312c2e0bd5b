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
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .errors import GcrError, UsageError
from .loop import Job
from .records import COMPLETED, FAILED, INTERRUPTED, LoopSettings
from .runner import ModelCache, ModelOptions, load_models, refine_jobs, start_run
from .store import RunStore, slug

FINISHED = (COMPLETED, FAILED)
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
        api_key_env=o.get("api_key_env"), critic_max_new_tokens=o.get("max_new_tokens", 2048),
        device=o.get("device", "auto"), dtype=o.get("dtype", "auto"), offload=o.get("offload"),
        memory=o.get("memory") or "auto", critic_decode=o.get("critic_decode") or "auto",
        allow_remote_code=bool(o.get("allow_remote_code", False)), generation=generation)
    loop = LoopSettings(**{k: o[k] for k in ("rounds", "target", "min_delta", "patience", "time_budget",
                                             "candidates", "seed_policy", "on_converged") if o.get(k) is not None},
                        seed=o["seed"] if o.get("seed") is not None else random.randrange(2**31))
    return PlannedJob(spec, opts, loop)


def new_batch_id(file: Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"batch-{stamp}-{slug(file.stem, 16)}-{secrets.token_hex(2)}"


def prepare(store: RunStore, spec, *, resume: bool, force: bool, gen_batch: int = 1
            ) -> tuple[str, list[PlannedJob]]:
    """Open (or reopen) the batch record; return its id and the jobs with their stored runs."""
    file = str(Path(spec.path).resolve())
    planned = [plan_job(j, gen_batch) for j in spec.jobs]
    if not resume:
        batch_id = new_batch_id(Path(file))
        store.create_batch(batch_id, file, [(p.spec.id, p.spec.fingerprint()) for p in planned])
        return batch_id, planned

    batch = store.latest_batch_for(file)
    if batch is None:
        raise UsageError(f"There is no batch of {spec.path} to resume in {store.root}: run it without --resume.")
    stored = {j["job_id"]: j for j in store.get_batch(batch["id"])["jobs"]}
    changed = []
    for position, p in enumerate(planned):
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
        store.set_batch_job(batch["id"], p.spec.id, run_id=p.run_id, fingerprint=p.spec.fingerprint(),
                            position=position)
    if changed:
        raise UsageError(f"{len(changed)} unfinished job(s) changed in {spec.path} since the batch started "
                         f"({', '.join(changed)}): restore them, or pass --force to restart those jobs.")
    store.set_batch_status(batch["id"], "running")
    return batch["id"], planned


def run_batch(store: RunStore, spec, *, resume=False, force=False, batch_size=8, gen_batch=1,
              progress=None, log=lambda msg: None) -> dict:
    from PIL import Image

    batch_id, planned = prepare(store, spec, resume=resume, force=force, gen_batch=gen_batch)
    pending = [p for p in planned if p.status not in FINISHED]
    if resume:
        log(resume_summary(store, batch_id, planned))
    expected = sum(p.loop.rounds * p.loop.candidates for p in pending)
    if expected >= COMPILE_PAYS_AFTER:
        from .devices import resolve_device

        for p in pending:
            if p.opts.critic_decode == "auto" and resolve_device(p.opts.device).startswith("cuda"):
                p.opts = replace(p.opts, critic_decode="compile")
    if progress:
        progress.start_jobs(len(planned), done=len(planned) - len(pending))

    # Models: order jobs so each critic, and each generator, is loaded once.
    cache = ModelCache()
    def model_key(p):
        return (repr(p.opts.critic), repr(p.opts.critic_url), repr(p.opts.generator), repr(p.opts.task),
                repr(p.opts.generation))
    pending.sort(key=model_key)
    groups = []
    for p in pending:
        if groups and model_key(groups[-1][0]) == model_key(p):
            groups[-1].append(p)
        else:
            groups.append([p])

    for gi, group in enumerate(groups):
        later = [p for g in groups[gi:] for p in g]
        first = group[0]
        try:
            models = load_models(first.opts, has_image=first.spec.image is not None, log=log, cache=cache)
        except GcrError as e:
            for p in group:
                p.status, p.error = FAILED, f"models could not be loaded: {e}"
                store.set_batch_job(batch_id, p.spec.id, run_id=p.run_id, fingerprint=p.spec.fingerprint(),
                                    position=planned.index(p), error=p.error)
                if progress:
                    progress.job_finished()
            log(f"jobs {', '.join(p.spec.id for p in group)} failed: {e}")
            continue
        cache.keep_only({cache.generator_key(p.opts) for p in later},
                        {cache.critic_key(p.opts, models.task) for p in later})

        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            jobs, runs = [], {}
            for p in chunk:
                source = Image.open(p.spec.image).convert("RGB") if p.spec.image else None
                if p.run_id:
                    run = store.get_run(p.run_id)
                    rounds = [r for r in run.rounds if not r.error]
                else:
                    run = start_run(store, models, p.spec.prompt, p.loop,
                                    str(p.spec.image) if p.spec.image else None, batch_id=batch_id,
                                    job_id=p.spec.id)
                    p.run_id, rounds = run.id, []
                    store.set_batch_job(batch_id, p.spec.id, run_id=run.id, fingerprint=p.spec.fingerprint(),
                                        position=planned.index(p))
                runs[run.id] = run
                jobs.append(Job(run.id, p.spec.prompt, p.loop, source_image=source, rounds=rounds))
            try:
                finished = refine_jobs(store, models, jobs, runs, progress)
            except KeyboardInterrupt:
                store.set_batch_status(batch_id, INTERRUPTED)
                raise
            except GcrError as e:  # out of memory, or the store itself failing: no job can go on
                store.set_batch_status(batch_id, FAILED)
                raise GcrError(f"{str(e).rstrip('.')}. The batch stopped; continue it with "
                               f"`gcr batch {spec.path} --resume` after fixing that.") from None
            for p in chunk:
                run = finished[p.run_id]
                p.status, p.error = run.status, run.error

    failed = [p for p in planned if p.status != COMPLETED]
    status = FAILED if failed else COMPLETED
    store.set_batch_status(batch_id, status)
    return batch_record(store, batch_id, spec.path)


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
            "created": batch["created"], "jobs": jobs}
