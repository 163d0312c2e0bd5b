"""`gcr score`'s unit of work: the critic's verdict on images that already exist.

- `score_group(payload, cache)`: the unit of work. A group of items (image paths, or their bytes,
  with the prompt and, for an edit, the source) plus the model options, all plain data, in; a stream
  of plain result records out, one list per batched critic call. It loads its models through the
  `gcr.runner.ModelCache` it is given (one load per critic, the critic chosen by each item's task as
  refine chooses it) and holds no other state, so a cluster worker runs it as it is (the kind
  `score` of gcr.distributed: `gcr score --workers N`).
- The driver, the only writer of the run store, is gcr.scorejob (`run_score_job`).

Critiques are asked for exactly as the refine loop asks (gcr.critics.base.critique_with_retry: one
batched call, one sampled retry of an unreadable or incomplete critique), and parsed by the same
parser; the independent judge (gcr.judge), when asked for, scores the same images against the same
prompts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .critics.base import critique_with_retry
from .devices import first_line
from .errors import CriticUnavailable, OutOfMemory
from .images import ImageProblem, decode_image, read_image
from .records import EDIT, T2I, CritiqueRequest

DEFAULT_BATCH_SIZE = 8


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
            results[item.position] = failed_result(item, f"{str(e)[:1].upper()}{str(e)[1:]} now")
            continue
        loaded.append((item, image, source))
    verdicts = _critique(critic, loaded, task)  # 2. Critique them all against their prompts
    judged = {}
    if judge is not None and loaded:  # 3. The independent judge: reported, never acted on
        scores = judge.score([(item.prompt, image) for item, image, _ in loaded])
        judged = {item.position: s for (item, _, _), s in zip(loaded, scores)}
    for item, _, _ in loaded:
        verdict = verdicts[item.position]
        results[item.position] = (failed_result(item, verdict) if isinstance(verdict, str)
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


def failed_result(item: ScoreItem, error: str) -> dict:
    return {**_base(item), "scores": {}, "overall": None, "complete": False, "missing": [], "problems": [],
            "refined_request": "", "summary": "", "justifications": {}, "refinement_comments": "",
            "raw_critique": "", "attempts": 0, "judge": None, "error": error}
