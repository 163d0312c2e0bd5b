"""`gcr selftest`: prove an install works, offline, in seconds.

Builds tiny random-weight models (a Flux text-to-image pipeline, a Flux Kontext edit pipeline and a
Qwen3-VL critic) and runs the real loop on them through the same loaders real checkpoints use.
Random weights draw noise and write gibberish critiques: the run must record those rounds as
unscored and carry on, which is exactly the path a flaky real critic takes.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

SAMPLE_CRITIQUE = """# User Request Analysis
The user wants a fox on a park bench, reading a newspaper: the fox, the bench and the paper must all be visible.
# Detailed Judgement
1. Text Faithfulness:
## Justification: The fox and the bench are present, but the fox holds a book rather than a newspaper.
## Score: 2.75
2. Physical and Visual Quality:
## Justification: Natural lighting; one paw merges into the page.
## Score: **3.25/4**
3. Text Rendering:
## Justification: No text was requested.
## Score: N/A (no text in the request)
# Summary: Close, but the reading material is wrong and a paw is malformed.

# User Request Refinement:
## Refinement Comments: Name the newspaper explicitly and describe the paws.
## Refined Request: A red fox sitting on a wooden park bench, holding an open broadsheet newspaper
with both front paws clearly separated from the pages, soft morning light."""


def _stage(report: dict, name: str, log, fn):
    t0 = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except Exception as e:  # noqa: BLE001 - a selftest reports every failure instead of stopping
        detail, ok = f"{e.__class__.__name__}: {e}", False
    seconds = time.perf_counter() - t0
    report["stages"].append({"name": name, "ok": ok, "seconds": round(seconds, 3), "detail": detail})
    if log:  # Rich Text lines: an error's text is data, never markup (plain `print` shows them too)
        from rich.text import Text

        from .view import text

        log(Text.assemble(("ok", "green") if ok else ("FAILED", "red"), f" {name:<40} {seconds:6.2f}s"))
        if isinstance(detail, str):
            log(Text("   ").append_text(text(detail, style="dim")))
    return ok


def run_selftest(log=print) -> dict:
    report = {"ok": False, "stages": []}
    with tempfile.TemporaryDirectory(prefix="gcr-selftest-") as tmp:
        tmp = Path(tmp)
        _stage(report, "install: imports and versions", log, _check_install)
        _stage(report, "parser: sample critique", log, _check_parser)
        _stage(report, "build tiny models", log, lambda: _build(tmp))
        for task, family, image in (("t2i", "flux", False), ("edit", "flux-kontext", True)):
            _stage(report, f"loop: {family} → tiny critic ({task})", log,
                   lambda f=family, i=image: _run_loop(tmp, f, i))
    report["ok"] = all(s["ok"] for s in report["stages"])
    return report


def _check_install() -> str:
    from .runner import package_versions

    versions = package_versions()
    missing = [k for k in ("torch", "torchvision", "diffusers", "transformers") if not versions.get(k)]
    if missing:
        raise RuntimeError(f"missing packages: {', '.join(missing)}; reinstall with `pip install gcr`")
    major = {k: int(str(versions[k]).split(".")[0]) for k in ("transformers",)}
    if major["transformers"] < 5:
        raise RuntimeError(f"transformers {versions['transformers']} is too old: gcr needs 5.x "
                           "(pip install -U 'transformers>=5,<6')")
    import torch  # noqa: F401
    import torchvision  # noqa: F401  (the Qwen-VL processor needs it; a mismatched build fails here)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    return " ".join(f"{k} {v}" for k, v in versions.items() if k != "gcr")


def _check_parser() -> str:
    from .parse import parse_critique

    c = parse_critique(SAMPLE_CRITIQUE, "t2i")
    expected = {"text_faithfulness": 2.75, "physical_quality": 3.25, "text_rendering": None}
    if c.scores != expected or c.overall != 3.0 or "both front paws" not in c.refined_request or c.problems:
        raise RuntimeError(f"sample critique misread: {c.scores} {c.problems}")
    return f"overall {c.overall:.2f}, refined request {len(c.refined_request)} chars"


def _build(tmp: Path) -> str:
    from .devices import quiet_transformers
    from .tiny import build_tiny_critic, build_tiny_pipeline

    with quiet_transformers():  # no "Writing model shards" bars in the report
        build_tiny_pipeline("flux", tmp / "flux")
        build_tiny_pipeline("flux-kontext", tmp / "flux-kontext")
        build_tiny_critic(tmp / "critic")
    return "flux, flux-kontext, qwen3-vl critic"


def _run_loop(tmp: Path, family: str, edit: bool) -> str:
    from PIL import Image

    from .generate import GenerationSettings
    from .loop import Job
    from .records import LoopSettings
    from .runner import ModelOptions, load_models, refine_jobs, start_run
    from .store import RunStore

    opts = ModelOptions(generator=str(tmp / family), critic=str(tmp / "critic"), device="cpu",
                        dtype="fp32", critic_max_new_tokens=24,
                        generation=GenerationSettings(steps=2, width=32, height=32))
    models = load_models(opts, has_image=edit)
    store = RunStore(tmp / "runs")
    source = Image.new("RGB", (32, 32), (90, 140, 200)) if edit else None
    request = "make the sky stormy" if edit else "a fox reading a newspaper"
    settings = LoopSettings(rounds=2, seed=0)
    run = start_run(store, models, request, settings, None)
    run = refine_jobs(store, models, [Job(run.id, request, settings, source)], {run.id: run})[run.id]
    if len(run.rounds) != 2 or run.status != "completed" or any(not Path(r.image).is_file() for r in run.rounds):
        raise RuntimeError(f"loop did not complete two stored rounds (status {run.status}, error {run.error})")
    scored = sum(r.overall is not None for r in run.rounds)
    return (f"{models.task}: 2 rounds stored, {scored} scored "
            f"({'random weights write unreadable critiques: recorded as unscored' if not scored else 'ok'})")
