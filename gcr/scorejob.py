"""`gcr score`'s driver: the score job in the run store, of which it is the only writer.

A score job is a row in `score_jobs` owned like a batch (gcr.owner); each batch of results is
committed as it arrives, so a 10,000-image job that crashes keeps everything scored so far, and
`--resume` (the same images and options, hence the same job key) scores only what is missing. Every
job ends with a status. The images are scored in this process (gcr.scoring.score_group) or on Ray
workers (gcr.distributed.score), which send their results here.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from .devices import first_line
from .errors import GcrError, StorageError, UsageError
from .owner import lock_name
from .records import COMPLETED, FAILED, INTERRUPTED
from .scoring import DEFAULT_BATCH_SIZE, ScoreItem, items_from, score_group
from .store import RunStore, slug

KEY_VERSION = 1


def job_key(items: Sequence[ScoreItem], entries, opts) -> str:
    """What makes two `gcr score` commands the same job: the images (paths and bytes), prompts,
    sources and ids, and the options that change the verdicts (which critic and judge, how long a
    critique may be, the weights' precision). Where a critic runs, how many at a time, and what is
    done with the results afterwards (filters, copies, output) are not part of it."""
    payload = {
        "version": KEY_VERSION,
        "items": [[i.image, e.image_sha256, i.prompt, i.source, e.source_sha256, i.id] for i, e in zip(items, entries)],
        "options": {"critic": opts.critic, "critic_model": opts.critic_model,
                    "max_new_tokens": opts.critic_max_new_tokens, "critic_quant": opts.critic_quant,
                    "dtype": opts.dtype, "judge": opts.judge},
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_score_job_id(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"score-{stamp}-{slug(name, 16)}-{secrets.token_hex(2)}"


def run_score_job(store: RunStore, entries, opts, *, source: str, resume: bool = False,
                  batch_size: int = DEFAULT_BATCH_SIZE, cache=None, progress=None,
                  log: Callable = lambda message: None, resume_command: str = "gcr score ... --resume",
                  cluster=None) -> dict:
    """Score `entries` (gcr.manifest) into the store, or continue the job of the same images and
    options with `resume`; return the job's record (`score_record`). Every path ends the job with a
    status: completed, failed (an image could not be scored; the others are kept) or interrupted.
    With `cluster` (gcr.distributed.cluster.ClusterOptions) the images are scored on Ray workers and
    this process stores what they send."""
    from .runner import options_to_dict, package_versions

    items = items_from(entries)
    key = job_key(items, entries, opts)
    if resume:
        job = store.latest_score_job(key)
        if job is None:
            raise UsageError(f"There is no score job of these images (with these options) to resume in "
                             f"{store.root}: run it without --resume.")
        job_id = job["id"]
        if job["status"] == COMPLETED:
            log(f"score job {job_id} is already complete: nothing to score")
            return score_record(store, job_id)
        store.claim("score", [job_id], lock_name("score", job_id))  # refuses when a live process runs it
    else:
        job_id = new_score_job_id(Path(source).stem if source != "arguments" else Path(items[0].image).stem)
        settings = {"options": options_to_dict(opts), "batch_size": batch_size, "versions": package_versions()}
        store.create_score_job(job_id, key, source, settings, len(items))
    try:
        done = {r["position"] for r in store.scores(job_id) if not r.get("error")}
        pending = [item for item in items if item.position not in done]
        if resume:
            log(f"resuming score job {job_id}: {len(done)} of {len(items)} images already scored, "
                f"{len(pending)} to go")
        if progress is not None:
            progress.start_jobs(len(items), done=len(done), noun="images")
        payload = {"items": [i.to_dict() for i in pending], "options": options_to_dict(opts),
                   "batch_size": batch_size}
        if cluster is not None:
            _score_on_cluster(store, job_id, pending, payload, opts, cluster, progress, log)
        else:
            _score_here(store, job_id, payload, cache, progress, log)
        failed = [r for r in store.scores(job_id) if r.get("error")]
        error = (f"{len(failed)} of {len(items)} images could not be scored ({_first_error(failed)}); score "
                 f"them again with `{resume_command}`") if failed else None
        store.finish_score_job(job_id, FAILED if failed else COMPLETED, error)
    except KeyboardInterrupt:
        _finish_if_possible(store, job_id, INTERRUPTED, "interrupted by the user")
        raise
    except StorageError as e:
        _finish_if_possible(store, job_id, FAILED, str(e))
        raise e.then(f"continue the score job with `{resume_command}` (scored images are kept)") from None
    except GcrError as e:
        _finish_if_possible(store, job_id, FAILED, str(e))
        stopped = GcrError(f"{str(e).rstrip('.')}; the score job stopped: continue it with `{resume_command}` "
                           "after fixing that (scored images are kept).")
        stopped.exit_code = e.exit_code
        raise stopped from None
    except Exception as e:  # noqa: BLE001 - an unexpected fault still ends the job with a status
        from .storefaults import is_storage_fault, storage_error

        if is_storage_fault(e):
            fault = storage_error(e, f"store the scores of job {job_id} in {store.root}", store.root)
            _finish_if_possible(store, job_id, FAILED, str(fault))
            raise fault.then(f"continue the score job with `{resume_command}` (scored images are kept)") from None
        reason = f"unexpected {type(e).__name__}: {first_line(e)}"
        _finish_if_possible(store, job_id, FAILED, reason)
        raise GcrError(f"The score job failed ({reason}); scored images are kept: continue it with "
                       f"`{resume_command}`, and please report this.") from e
    return score_record(store, job_id)


def _score_here(store: RunStore, job_id: str, payload: dict, cache, progress, log) -> None:
    from .runner import ModelCache

    own_cache = cache is None
    cache = cache or ModelCache(runs_dir=store.root)
    try:
        for results in score_group(payload, cache, status=progress.update if progress else log):
            store.record_scores(job_id, results)  # committed as it comes: a crash keeps it
            if progress is not None:
                for _ in results:
                    progress.job_finished()
    finally:
        if own_cache:
            cache.close()


def _score_on_cluster(store: RunStore, job_id: str, pending: list[ScoreItem], payload: dict, opts, cluster,
                      progress, log) -> None:
    from .distributed.cluster import Cluster
    from .distributed.score import ScoreDriver

    with Cluster(cluster, gpus=opts.device != "cpu", progress=progress, log=log) as workers:
        workers.run(ScoreDriver(store, job_id, pending, {k: v for k, v in payload.items() if k != "items"},
                                progress=progress, log=log))


def _first_error(failed: list[dict]) -> str:
    first = failed[0]
    return f"{first.get('label') or first['image']}: {first['error'].rstrip('.')}"


def _finish_if_possible(store: RunStore, job_id: str, status: str, error: str) -> None:
    try:
        store.finish_score_job(job_id, status, error)
    except GcrError:
        store.release(lock_name("score", job_id))  # the job reads as interrupted once we are gone


def score_record(store: RunStore, job_id: str) -> dict:
    """A score job as stored: its record and every result, by position."""
    job = store.get_score_job(job_id)
    return {**job, "results": store.scores(job_id)}
