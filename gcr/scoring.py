"""`gcr score`: the critic's verdict on images that already exist (data curation, evaluation).

Two halves, with a clear seam between them:

- `score_group(payload, cache)`: the unit of work. A group of items (image paths, or their bytes,
  with the prompt and, for an edit, the source) plus the model options, all plain data, in; a stream
  of plain result records out, one list per batched critic call. It loads its models through the
  `gcr.runner.ModelCache` it is given (one load per critic, the critic chosen by each item's task as
  refine chooses it) and holds no other state, so a cluster worker can run it as it is (the kind
  `score` of gcr.distributed, once wired: `for results in score_group(payload, context.cache):
  context.emit(("scored", results))`).
- `run_score_job(...)`: the driver, the only writer of the run store. A score job is a row in
  `score_jobs` owned like a batch (gcr.owner); each batch of results is committed as it arrives, so a
  10,000-image job that crashes keeps everything scored so far, and `--resume` (the same images and
  options, hence the same job key) scores only what is missing. Every job ends with a status.

Critiques are asked for exactly as the refine loop asks (gcr.critics.base.critique_with_retry: one
batched call, one sampled retry of an unreadable or incomplete critique), and parsed by the same
parser; the independent judge (gcr.judge), when asked for, scores the same images against the same
prompts.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .critics.base import critique_with_retry
from .devices import first_line
from .errors import CriticUnavailable, GcrError, OutOfMemory, StorageError, UsageError
from .images import ImageProblem, decode_image, read_image
from .owner import lock_name
from .records import COMPLETED, EDIT, FAILED, INTERRUPTED, T2I, CritiqueRequest
from .store import RunStore, slug

DEFAULT_BATCH_SIZE = 8
KEY_VERSION = 1


@dataclass(frozen=True)
class ScoreItem:
    """One image to score, as plain data: what a worker needs and nothing else."""

    position: int                 # 1-based place in the job (the manifest's order)
    image: str                    # absolute path
    prompt: str                   # the request the image is judged against
    source: str | None = None     # an edit's source image (absolute path); None: text-to-image
    id: str | None = None
    label: str = ""               # how tables name it (its id, or the path as written)
    image_data: bytes | None = None   # the file's bytes, for a worker that cannot read `image`
    source_data: bytes | None = None

    @property
    def task(self) -> str:
        return EDIT if self.source else T2I

    def to_dict(self) -> dict:
        return asdict(self)


def items_from(entries) -> list[ScoreItem]:
    """gcr.manifest entries as score items."""
    return [ScoreItem(position=e.index, image=str(e.image), prompt=e.prompt,
                      source=str(e.source) if e.source else None, id=e.id, label=e.label) for e in entries]


# -- the unit of work -------------------------------------------------------------------------


def score_group(payload: dict, cache, status: Callable[[str], None] = lambda message: None
                ) -> Iterator[list[dict]]:
    """Score a group of items; yield the result records of each batched critic call as it completes.

    `payload`: {"items": [ScoreItem.to_dict()], "options": gcr.runner.options_to_dict(opts),
    "batch_size": int}. `cache`: a gcr.runner.ModelCache (the models stay loaded for the next group).
    Raises OutOfMemory (score fewer at a time) and CriticUnavailable (the critic cannot answer at
    all); any other failure of a critique is recorded with the items it concerns (`error`)."""
    from .devices import resolve_device
    from .runner import check_critic_options, options_from_dict

    opts = options_from_dict(payload["options"])
    items = [ScoreItem(**d) for d in payload["items"]]
    batch_size = max(1, int(payload.get("batch_size") or DEFAULT_BATCH_SIZE))
    check_critic_options(opts, resolve_device(opts.device))
    judge = cache.judge(opts, status)
    for task in (T2I, EDIT):
        group = [item for item in items if item.task == task]
        if not group:
            continue
        critic = cache.critic(opts, task, status)
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            status(f"critiquing {len(chunk)} {'edit' if task == EDIT else 'text-to-image'} "
                   f"image{'s' if len(chunk) != 1 else ''}")
            yield score_chunk(critic, judge, chunk, task)


def score_chunk(critic, judge, chunk: Sequence[ScoreItem], task: str) -> list[dict]:
    """The result records of one batch of items of one task: one critic call (plus its retry) and
    one judge call for all of them."""
    results, loaded = {}, []
    for item in chunk:  # 1. Read the images (checked when the job started; gone or damaged since?)
        try:
            image = _open(item.image, item.image_data)
            source = _open(item.source, item.source_data) if item.source else None
        except ImageProblem as e:
            results[item.position] = _failed(item, f"{str(e)[:1].upper()}{str(e)[1:]} now")
            continue
        loaded.append((item, image, source))
    verdicts = _critique(critic, loaded, task)  # 2. Critique them all against their prompts
    judged = {}
    if judge is not None and loaded:  # 3. The independent judge: reported, never acted on
        scores = judge.score([(item.prompt, image) for item, image, _ in loaded])
        judged = {item.position: s for (item, _, _), s in zip(loaded, scores)}
    for item, _, _ in loaded:
        verdict = verdicts[item.position]
        results[item.position] = (_failed(item, verdict) if isinstance(verdict, str)
                                  else _result(item, verdict, judged.get(item.position)))
    return [results[item.position] for item in chunk]


def _open(path: str, data: bytes | None):
    return decode_image(data, path) if data is not None else read_image(Path(path))[0]


def _critique(critic, loaded: list, task: str) -> dict:
    """position -> Verdict, or the reason its critique failed. One batched call; when it fails for
    another reason than memory or an unreachable critic, the items are tried one by one, so the
    others do not pay for the one that broke the batch."""
    requests = [CritiqueRequest(item.prompt, image, source) for item, image, source in loaded]
    try:
        return {item.position: v for (item, _, _), v in zip(loaded, critique_with_retry(critic, requests, task))}
    except (OutOfMemory, CriticUnavailable):
        raise
    except Exception as e:  # noqa: BLE001 - recorded with the item; the job goes on
        if len(loaded) == 1:
            return {loaded[0][0].position: f"critique failed: {first_line(e)}"}
    out = {}
    for one in loaded:
        out.update(_critique(critic, [one], task))
    return out


def _base(item: ScoreItem) -> dict:
    return {"position": item.position, "id": item.id, "label": item.label, "image": item.image,
            "source": item.source, "prompt": item.prompt, "task": item.task}


def _result(item: ScoreItem, verdict, judge: float | None) -> dict:
    c = verdict.critique
    return {**_base(item), "scores": dict(c.scores), "overall": c.overall, "complete": c.complete,
            "missing": list(c.missing), "problems": list(c.problems), "refined_request": c.refined_request,
            "summary": c.summary, "justifications": dict(c.justifications),
            "refinement_comments": c.refinement_comments, "raw_critique": verdict.text,
            "attempts": verdict.attempts, "judge": judge, "error": None}


def _failed(item: ScoreItem, error: str) -> dict:
    return {**_base(item), "scores": {}, "overall": None, "complete": False, "missing": [], "problems": [],
            "refined_request": "", "summary": "", "justifications": {}, "refinement_comments": "",
            "raw_critique": "", "attempts": 0, "judge": None, "error": error}


# -- the driver: the run store ----------------------------------------------------------------


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
                  log: Callable = lambda message: None, resume_command: str = "gcr score ... --resume") -> dict:
    """Score `entries` (gcr.manifest) into the store, or continue the job of the same images and
    options with `resume`; return the job's record (`score_record`). Every path ends the job with a
    status: completed, failed (an image could not be scored; the others are kept) or interrupted."""
    from .runner import ModelCache, options_to_dict, package_versions

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
