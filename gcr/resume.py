"""Continuing an unfinished run: from its last stored round, exactly as it was started.

A run stops short when its process is killed, when it is interrupted, or when it fails (the critic
server was down, the disk filled up ...). Its record holds everything needed to go on: the request,
the source image's path, the loop settings with the seed, the models as they were asked for, and
every completed round with the prompt the next round starts from. A round stored with an error is
done again. Only one process advances a run at a time (gcr.owner): resuming a run that a live
process owns is refused with a sentence naming that process.
"""
from __future__ import annotations

from . import decide
from .errors import GcrError, UsageError
from .loop import Job
from .owner import lock_name
from .records import COMPLETED, FAILED, INTERRUPTED, LoopSettings, Run
from .runner import ModelOptions, load_models, options_from_dict, refine_jobs
from .store import RunStore


class AlreadyComplete(Exception):
    """The run needs nothing more: it finished."""

    def __init__(self, run: Run):
        super().__init__(run.id)
        self.run = run


def options_of(run: Run) -> ModelOptions:
    """The models a run was started with: as recorded, or (runs recorded before gcr kept them) as
    they are described in its settings."""
    if isinstance(run.settings.get("options"), dict):
        return options_from_dict(run.settings["options"])
    from .generate import GenerationSettings

    g, c, gen = (run.settings.get(k) or {} for k in ("generator", "critic", "generation"))
    served = c.get("backend") == "served"
    generation = GenerationSettings(steps=gen.get("steps"), guidance=gen.get("guidance"),
                                    width=gen.get("width"), height=gen.get("height"),
                                    negative_prompt=gen.get("negative_prompt"), extra=dict(gen.get("extra") or {}))
    return ModelOptions(
        generator=g.get("preset") or g.get("source") or run.generator, task=run.task,
        critic=None if served else (c.get("source") or run.critic), critic_url=c.get("url") if served else None,
        critic_model=c.get("model") if served else None, api_key_env=c.get("api_key_env"),
        critic_max_new_tokens=c.get("max_new_tokens") or c.get("max_tokens") or 2048,
        dtype=g.get("dtype") or "auto", generation=generation)


def resume_run(store: RunStore, ref: str, *, log=lambda msg: None, progress=None) -> Run:
    """Continue run `ref` in this process until it ends; returns the final run.

    Raises AlreadyComplete for a completed run, and UsageError when a live process owns it."""
    run = store.get_run(ref)
    if run.status == COMPLETED:
        raise AlreadyComplete(run)
    lock = lock_name("run", run.id)
    if store.claim("run", [run.id], lock):  # finished by another process since we looked
        store.release(lock)
        raise AlreadyComplete(store.get_run(run.id))
    run = store.get_run(run.id)  # as it is now that this process owns it
    rounds = [r for r in run.rounds if not r.error]  # a round that failed is done again
    try:
        loop = LoopSettings(**run.settings["loop"])
        opts = options_of(run)
        source = _source_image(run)
        models = load_models(opts, has_image=source is not None, log=log)
        if models.task != run.task:
            raise UsageError(f"Run {run.id} was a {run.task} run but {opts.generator} now loads as "
                             f"{models.task}: it cannot be continued with this model.")
    except BaseException as e:
        # Nothing ran: the run ends as it was found, failed with the reason, and unowned again.
        interrupted = isinstance(e, KeyboardInterrupt)
        reason = ("interrupted by the user" if interrupted else str(e) if isinstance(e, GcrError)
                  else f"could not resume: {type(e).__name__}: {e}")
        try:
            store.finish_run(run.id, status=INTERRUPTED if interrupted else FAILED, stop_reason=None,
                             best_round=decide.best_round(rounds), error=reason)
        except GcrError:
            pass
        store.release(lock)
        raise
    job = Job(run.id, run.request, loop, source_image=source, rounds=rounds)
    return refine_jobs(store, models, [job], {run.id: store.get_run(run.id)}, progress)[run.id]


def _source_image(run: Run):
    if not run.source_image:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(run.source_image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"The source image {run.source_image} of run {run.id} is gone: put it back "
                         "there to continue the run.") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"The source image {run.source_image} of run {run.id} cannot be read "
                         f"({type(e).__name__}): restore it to continue the run.") from None
