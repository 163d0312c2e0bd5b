"""`gcr bench --workers 1,2`: what running a batch on Ray costs and gains on this machine.

One batch of tiny models (gcr.tiny: the real architectures with random weights, built in a temporary
folder; no download) runs in this process, then on a local Ray cluster with each number of workers.
Each job is its own group (batch size 1), so the workers share the jobs out. For each run:

- wall time: everything a user waits for, the cluster's start-up and the workers' model loading
  included;
- seconds per round in steady state: from the first round committed to the last, per round (the
  start-up and model loading left out; with more workers, rounds run side by side);
- overhead per round: the time between two rounds of a job being committed to the store, less that
  round's own compute as the loop timed it (generate + critique + rewrite), median over rounds 2+.
  In this process that is the store's write (PNGs, then one transaction); on Ray it is the pixels' trip
  to the driver plus whatever of the store's write the worker's next round does not hide (the worker
  goes on while the driver writes). The Ray path's overhead per round is the difference between the
  1-worker run and the in-process run, in both measures;
- whether every job's prompts, seeds, pixels and raw critiques equal the in-process run's.

It also times the Ray path's one per-image cost that grows with image size: taking a full-size
image's pixels out (the worker) and back into an image (the driver); Ray moves the bytes.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class ClusterBenchSettings:
    workers: tuple = (1, 2)     # worker counts to run on (each a fresh local Ray cluster)
    jobs: int = 8               # tiny text-to-image jobs, each its own group
    rounds: int = 3             # rounds per job (every round runs: the target is out of reach)
    size: int = 32              # image width and height (tiny Flux: keep it small)
    steps: int = 2
    critique_tokens: int = 16
    device: str = "auto"        # auto: one GPU per worker where there are GPUs
    image_px: int = 1024        # the image size of the pixel round trip


def run_cluster_bench(settings: ClusterBenchSettings, log=lambda msg: None) -> dict:
    from gcr.batch import run_batch
    from gcr.batchfile import load_batch_file
    from gcr.distributed.cluster import ClusterOptions, require_ray
    from gcr.errors import GcrError
    from gcr.store import RunStore

    require_ray(ClusterOptions(workers=max(settings.workers)))
    out = {"settings": asdict(settings), "runs": [], "image_trip_ms": image_trip_ms(settings.image_px)}
    with tempfile.TemporaryDirectory(prefix="gcr-bench-cluster-") as tmp:
        from gcr.devices import quiet_transformers

        root = Path(tmp)
        log("building tiny models")
        with quiet_transformers():
            spec = load_batch_file(_jobs_file(root, settings))
        reference = None
        for workers in (None, *settings.workers):
            name = "in this process" if workers is None else f"{workers} Ray worker{'s' if workers > 1 else ''}"
            log(f"running the batch {name}")
            store = RunStore(root / f"runs-{workers or 0}")
            t0 = time.perf_counter()
            try:
                record = run_batch(store, spec, batch_size=1,
                                   cluster=ClusterOptions(workers=workers) if workers else None)
            except GcrError as e:  # e.g. more workers than GPUs: the other counts still run
                out["runs"].append({"run": name, "workers": workers, "error": str(e)})
                continue
            wall = time.perf_counter() - t0
            results, overheads, commits = _measure(store, record)
            reference = results if reference is None else reference
            commits.sort()
            out["runs"].append({"run": name, "workers": workers, "wall_s": wall, "rounds": len(commits),
                                "steady_s_per_round": (commits[-1] - commits[0]) / (len(commits) - 1)
                                if len(commits) > 1 else None,
                                "overhead_ms_per_round": _median(overheads),
                                "same_results": results == reference, "status": record["status"]})
            store.close()
    base = out["runs"][0]
    one = next((r for r in out["runs"] if r["workers"] == 1 and "error" not in r), None)
    out["ray_overhead_ms_per_round"] = _difference(one, base, "overhead_ms_per_round", 1)
    out["ray_steady_ms_per_round"] = _difference(one, base, "steady_s_per_round", 1000)
    return out


def _difference(run: dict | None, base: dict, key: str, scale: float):
    if run is None or run.get(key) is None or base.get(key) is None:
        return None
    return (run[key] - base[key]) * scale


def _jobs_file(root: Path, s: ClusterBenchSettings) -> Path:
    import yaml

    from gcr.tiny import build_tiny_critic, build_tiny_pipeline

    spec = {"defaults": {"generator": str(build_tiny_pipeline("flux", root / "flux")),
                         "critic": str(build_tiny_critic(root / "critic")), "rounds": s.rounds,
                         "patience": s.rounds, "target": 4.0, "steps": s.steps, "width": s.size, "height": s.size,
                         "device": s.device, "max_new_tokens": s.critique_tokens},
            "jobs": [{"id": f"job-{i}", "prompt": f"a small test scene number {i}", "seed": i}
                     for i in range(s.jobs)]}
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _measure(store, record: dict):
    """Per job: (prompt, seeds, pixels, raw critiques) per round; each round's commit overhead (ms);
    when each round was committed (s)."""
    from PIL import Image

    results, overheads, commits = {}, [], []
    for job in record["jobs"]:
        run = store.get_run(job["run_id"])
        rounds = sorted(run.rounds, key=lambda r: r.index)
        results[job["id"]] = [(r.index, r.prompt, tuple(c.seed for c in r.candidates),
                               tuple(Image.open(c.image).tobytes() for c in r.candidates),
                               tuple(c.raw_critique for c in r.candidates)) for r in rounds]
        # When each round was committed: the store keeps it, not the Round record.
        committed = {i: datetime.fromisoformat(c).timestamp() for i, c in store.db.execute(
            "SELECT idx, created FROM rounds WHERE run_id=?", (run.id,)).fetchall()}
        commits += committed.values()
        for before, r in zip(rounds, rounds[1:]):
            interval = committed[r.index] - committed[before.index]
            overheads.append((interval - r.timings.get("total_s", 0.0)) * 1000)
    return results, overheads, commits


def image_trip_ms(px: int) -> dict:
    """The Ray path's own work per image, for one px-by-px image: its pixels out (the worker), its
    pixels back into an image (the driver), and a pickle round trip of them (what Ray does locally;
    across machines the bytes also cross the network)."""
    import pickle

    import numpy as np
    from PIL import Image

    from gcr.distributed.refine import Pixels

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (px, px, 3), dtype=np.uint8))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        pixels = pickle.loads(pickle.dumps(Pixels.of(image), protocol=5))
        pixels.image()
        times.append((time.perf_counter() - t0) * 1000)
    return {"px": px, "ms": statistics.median(times), "bytes": len(pixels.data)}


def _median(values):
    return statistics.median(values) if values else None


def cluster_table(result: dict):
    """The bench result as a Rich table (fits 80 columns)."""
    from rich.table import Table

    from gcr.view import text

    s = result["settings"]
    table = Table(title=f"gcr bench --workers · {s['jobs']} jobs x {s['rounds']} rounds, tiny models, "
                        f"{s['size']} px", title_justify="left")
    for column, justify in (("run", "left"), ("wall s", "right"), ("steady s/round", "right"),
                            ("overhead ms/round", "right"), ("same results", "left")):
        table.add_column(column, justify=justify)
    for r in result["runs"]:
        if "error" in r:
            table.add_row(text(r["run"]), "-", "-", "-", text(r["error"], style="red"))
            continue
        table.add_row(text(r["run"]), f"{r['wall_s']:.1f}", _num(r["steady_s_per_round"], 3),
                      _num(r["overhead_ms_per_round"], 1), "yes" if r["same_results"] else "NO")
    trip = result["image_trip_ms"]
    extra = result.get("ray_overhead_ms_per_round")
    steady = result.get("ray_steady_ms_per_round")
    table.caption = (f"Ray path over in-process, per round: {_num(extra, 1)} ms of overhead, {_num(steady, 0)} ms "
                     f"in steady state. A {trip['px']}x{trip['px']} "
                     f"image's trip (pixels out, pickled, back): {trip['ms']:.1f} ms for "
                     f"{trip['bytes'] / 2**20:.0f} MiB.")
    table.caption_justify = "left"
    return table


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
