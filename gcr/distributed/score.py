"""The `score` kind of cluster work: `gcr score --workers N`, the store on the driver.

Worker side (`run_group`): gcr.scoring.score_group on the worker's models (loaded once per worker),
every batch of results streamed back as it is scored. Images travel as their files' bytes, so a
worker needs no shared file system.

Driver side (`ScoreDriver`): the only writer of the run store. It commits each batch of results as
it arrives (the same `record_scores` a local score job uses); a group whose worker died is handed
out again with only the images that have no stored result, so no image is scored twice; a group that
cannot run records its images as failed, so the job ends failed and `--resume` scores them again.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gcr.distributed.work import Group
from gcr.errors import GcrError

KIND = "score"
SCORED, GROUP_FAILED = "scored", "group_failed"
GROUP_BATCHES = 4   # critic batches per group: big enough to keep a worker busy, small enough to share out


# -- worker side ---------------------------------------------------------------------------------

def run_group(payload: dict, ctx) -> None:
    """Score a group on this worker; every batch of results goes to `ctx.emit`."""
    from gcr.runner import unexpected
    from gcr.scoring import score_group

    options = dict(payload["options"])
    if str(options.get("device", "")).startswith("cuda:"):  # a worker owns one GPU: `cuda:N` means it
        options["device"] = "cuda"
    try:
        for results in score_group({**payload, "options": options}, ctx.cache, ctx.status):
            ctx.emit((SCORED, results))
    except GcrError as e:  # the critic cannot answer, out of memory ...: the driver records the rest
        ctx.emit((GROUP_FAILED, str(e)))
    except Exception as e:  # noqa: BLE001 - reported with the images it concerns
        ctx.emit((GROUP_FAILED, unexpected(e)))


# -- driver side ---------------------------------------------------------------------------------

class ScoreDriver:
    """Hands the job's pending images to workers in groups and stores what comes back (gcr.distributed.work.Work)."""

    def __init__(self, store, job_id: str, items: list, payload: dict, *, progress=None, log=lambda msg: None):
        self.store, self.job_id, self.payload, self.progress, self.log = store, job_id, payload, progress, log
        size = max(1, int(payload.get("batch_size") or 1)) * GROUP_BATCHES
        by_task = sorted(items, key=lambda item: (item.task, item.position))  # critic batches of one task
        self._groups = [self._group(by_task[i:i + size]) for i in range(0, len(by_task), size)]

    def groups(self) -> list[Group]:
        return list(self._groups)

    def start(self, group: Group) -> Group | None:
        left = self._unscored(group)
        if not left:
            return None
        items = [replace(item, image_data=Path(item.image).read_bytes(),
                         source_data=Path(item.source).read_bytes() if item.source else None) for item in left]
        return replace(group, payload={**self.payload, "items": [i.to_dict() for i in items]})

    def handle(self, group: Group, event: tuple, worker: str) -> None:
        if event[0] == SCORED:
            self.store.record_scores(self.job_id, event[1])
            if self.progress is not None:
                for _ in event[1]:
                    self.progress.job_finished()
        elif event[0] == GROUP_FAILED:
            self.abandon(group, event[1])

    def remaining(self, group: Group) -> Group | None:
        left = self._unscored(group)
        return replace(self._group(left), losses=group.losses) if left else None

    def abandon(self, group: Group, reason: str) -> None:
        from gcr.scoring import failed_result

        left = self._unscored(group)
        if left:
            self.store.record_scores(self.job_id, [failed_result(item, reason) for item in left])
            if self.progress is not None:
                for _ in left:
                    self.progress.job_finished()
        self.log(f"images {_label(left)} could not be scored: {reason}")

    def _group(self, items: list) -> Group:
        return Group(KIND, {"items": items}, key="score", label=_label(items))

    def _unscored(self, group: Group) -> list:
        from gcr.scoring import ScoreItem

        done = {r["position"] for r in self.store.scores(self.job_id) if not r.get("error")}
        items = [i if isinstance(i, ScoreItem) else ScoreItem(**i) for i in group.payload["items"]]
        return [replace(i, image_data=None, source_data=None) for i in items if i.position not in done]


def _label(items: list) -> str:
    names = [i.label or Path(i.image).name for i in items]
    return ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
