"""What a run left in the store, in a form tests compare: two ways of running the same work (batched or
solo, one process or Ray workers, interrupted and resumed or not) must leave equal values."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from gcr.store import RunStore


def round_results(run) -> list:
    """Per round: index, prompt, seeds, pixels and raw critiques."""
    return [(r.index, r.prompt, tuple(c.seed for c in r.candidates),
             tuple(Image.open(c.image).tobytes() for c in r.candidates),
             tuple(c.raw_critique for c in r.candidates)) for r in run.rounds]


def job_results(runs_dir: Path, record: dict) -> dict:
    """Per job of a batch's --json record: its run's round_results."""
    store = RunStore(runs_dir)
    try:
        return {job["id"]: round_results(store.get_run(job["run_id"])) for job in record["jobs"]}
    finally:
        store.close()
