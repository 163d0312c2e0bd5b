"""Wiring: load the models once, open runs in the store, drive the loop, close the runs.

The CLI's `refine` and `selftest` (and `batch`) go through here, so they share one code path.
"""
from __future__ import annotations

import copy
import platform
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from importlib import metadata
from typing import Any

from . import decide
from .devices import first_line
from .errors import GcrError, OutOfMemory, StorageError, UsageError
from .loop import Job, run_loop
from .modelspec import check_image_task
from .records import COMPLETED, FAILED, INTERRUPTED, STOP_ERROR, LoopSettings, Run
from .rewrite import RefinedRequestRewriter
from .owner import lock_name
from .store import RunStore, new_run_id
from .storefaults import is_storage_fault, storage_error


@dataclass(frozen=True)
class ModelOptions:
    """How to find and place the models. None means: the preset's or the library's default."""

    generator: str = "flux-dev"
    task: str | None = None
    critic: str | None = None               # preset, hub id or local dir; None = by task
    critic_url: str | None = None           # OpenAI-compatible server instead of in-process
    critic_model: str | None = None
    api_key_env: str | None = None
    critic_timeout: float | None = None     # served critic: seconds per request; None = its default
    critic_engine: str | None = None        # start a server for the critic: vllm or transformers-serve
    vllm_bin: str | None = None             # the vllm executable (its own virtualenv); None: $GCR_VLLM_BIN or PATH
    critic_max_new_tokens: int = 2048
    device: str = "auto"
    dtype: str = "auto"
    offload: str | None = None              # None: the memory plan decides (on CUDA), else "none"
    memory: str = "auto"                    # memory plan on CUDA: auto or a plan name (gcr.memory)
    critic_decode: str = "auto"             # in-process critic decoding: auto, compile, graph, eager, off
    critic_speculate: int | None = None     # prompt-lookup drafts per step; None: default on a GPU, off on CPU
    critic_quant: str = "none"              # in-process critic weights: none or fp8 (compute capability 8.9+)
    allow_remote_code: bool = False
    generation: Any = None                  # GenerationSettings
    judge: str | None = None                # the independent judge (gcr.judge): reported, never optimized


@dataclass
class Models:
    generator: Any
    critic: Any
    task: str
    plan: Any = None        # gcr.memory.MemoryPlan on CUDA, None on the CPU or with an explicit --offload
    device: str = "cpu"
    judge: Any = None       # gcr.judge.ClipJudge, or None without --judge


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("gcr", "torch", "torchvision", "diffusers", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def load_models(opts: ModelOptions, has_image: bool, log=lambda msg: None, cache=None) -> Models:
    """Load the generator, then the critic that matches its task, placed by the memory plan.

    Heavy imports happen here. With a `ModelCache`, a model already loaded for the same options is
    reused (batch jobs).
    """
    from .devices import resolve_device
    from .presets import GENERATOR_PRESETS

    cache = cache or ModelCache()
    preset = GENERATOR_PRESETS.get(opts.generator)
    task = opts.task or (preset.task if preset else None)
    if task:  # known before loading anything: fail fast
        check_image_task(task, has_image, opts.generator)
    device = resolve_device(opts.device)
    check_critic_options(opts, device)   # before the generator loads: fail in seconds, not minutes
    # A critic engine kept warm by `gcr critic start` already holds its GPU memory: plan as for a served critic.
    running = cache.running_engine(opts, task, log) if task is not None else None
    plan = choose_memory_plan(replace(opts, critic_url=running.url) if running else opts, task, device, log)
    generator = cache.generator(opts, log, offload=plan.generator_offload if plan else None)
    task = opts.task or generator.task
    check_image_task(task, has_image, opts.generator)
    critic = cache.critic(opts, task, log, device=plan.critic_load_device if plan else None,
                          dtype=plan.critic_load_dtype if plan else None,
                          engine_gpu_bytes=plan.free_bytes - plan.need_bytes if plan and opts.critic_engine else None)
    if plan and plan.critic_in_process and getattr(critic, "url", None):
        # The critic turned out to be served (a warm engine found once the task was known): place the
        # generator alone.
        plan = replace(plan, critic_in_process=False, swap=False)
    if plan:
        from .memory import apply_plan

        generator, critic = apply_plan(plan, generator, critic, device)
    judge = cache.judge(opts, log) if opts.judge else None
    return Models(generator, critic, task, plan, device, judge)


def check_critic_options(opts: ModelOptions, device: str) -> None:
    """The in-process critic's decoding and weight options, checked before any model loads."""
    from .critics.inprocess import check_speculate_with_decoder
    from .critics.quant import check_quant
    from .critics.speculate import check_speculate

    if opts.critic_url:
        if opts.critic_quant not in (None, "none"):
            raise UsageError("--critic-quant applies to the in-process critic; a served critic is quantized by "
                             "its server (e.g. vLLM's --quantization fp8): drop --critic-quant or --critic-url.")
        return
    if opts.critic_engine == "transformers-serve" and opts.critic_quant not in (None, "none"):
        raise UsageError("--critic-quant fp8 needs the in-process critic or --critic-engine vllm; transformers "
                         "serve loads the weights as they are: drop --critic-quant.")
    if not opts.critic_engine:  # an engine drafts with its own n-gram speculation
        check_speculate_with_decoder(check_speculate(opts.critic_speculate), opts.critic_decode)
    check_quant(opts.critic_quant, device)


def choose_memory_plan(opts: ModelOptions, task: str | None, device: str, log):
    """Where the models live on a GPU (gcr.memory). None on the CPU, with an explicit --offload, or
    when the generator's size cannot be known before downloading it. A critic engine that gcr starts
    runs in its own process on the same GPU: the generator is planned in what that engine leaves."""
    if not device.startswith("cuda") or opts.offload is not None:
        return None
    from . import memory
    from .presets import GENERATOR_PRESETS, default_critic_for

    g = opts.generation
    width, height = (g.width, g.height) if g else (None, None)
    preset = GENERATOR_PRESETS.get(opts.generator)
    if preset:
        generator = memory.generator_footprint(preset.name, width or preset.width or 1024,
                                               height or preset.height or 1024)
    elif Path(opts.generator).is_dir():
        weights, largest = _weights_on_disk(Path(opts.generator))
        generator = memory.Footprint(weights, largest, memory.generator_activations(width, height))
    else:
        log(f"memory plan: the size of {opts.generator} is unknown before download; loading it whole "
            "(pass --offload model if it does not fit)")
        return None
    critic = None
    engine_share = 0
    if not opts.critic_url:
        if opts.critic and Path(opts.critic).is_dir():
            weights, _ = _weights_on_disk(Path(opts.critic))
            critic = memory.Footprint(weights, weights, memory.critic_footprint(
                max_new_tokens=opts.critic_max_new_tokens).activations)
        else:
            name = opts.critic or default_critic_for(task or "t2i").name
            critic = memory.critic_footprint(name if name.startswith("rationalrewards") else "rationalrewards-edit",
                                             max_new_tokens=opts.critic_max_new_tokens)
        if opts.critic_engine:
            engine_share, critic = critic.weights + critic.activations + memory.RESERVE, None
    free = memory.free_gpu_bytes(device)
    plan = memory.choose_plan(free - engine_share, generator, critic, requested=opts.memory)
    if engine_share:  # the engine gets what the generator's plan leaves (MemoryPlan.free - need)
        plan = replace(plan, free_bytes=free)
    log(plan.describe())
    return plan


def _weights_on_disk(root: Path) -> tuple[int, int]:
    """(all weights, largest component) in bytes, from a checkpoint's safetensors files."""
    parts: dict = {}
    for f in root.rglob("*.safetensors"):
        parts[f.parent] = parts.get(f.parent, 0) + f.stat().st_size
    return sum(parts.values()), max(parts.values(), default=0)


class ModelCache:
    """Loaded models by what identifies them, so a batch loads each distinct model once.

    Critic engines it starts are stopped by `close()` (use it as a context manager); engines kept warm
    by `gcr critic start` under `runs_dir` are used instead of loading the same critic again, and
    `notice` says so. `status` shows an engine's start-up progress (a transient line; default: the
    `log` of the call)."""

    def __init__(self, runs_dir=None, notice=lambda msg: None, status=None, warm_engines: bool = True):
        self.generators, self.critics, self.judges = {}, {}, {}
        self.runs_dir, self.notice, self.status = runs_dir, notice, status
        self.warm_engines = warm_engines  # False in a cluster worker: it has no runs home to look in

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop every critic engine this cache started."""
        for key in list(self.critics):
            _close(self.critics.pop(key))

    @staticmethod
    def generator_key(opts: ModelOptions) -> tuple:
        return (opts.generator, opts.task, opts.device, opts.dtype, opts.offload, opts.memory,
                opts.allow_remote_code)

    @staticmethod
    def critic_key(opts: ModelOptions, task: str) -> tuple:
        # The default critic differs by task (two checkpoints); an explicit one serves both tasks.
        return (opts.critic or f"default-{task}", opts.critic_url, opts.critic_model, opts.api_key_env,
                opts.critic_timeout, opts.device, opts.dtype, opts.critic_max_new_tokens, opts.critic_decode,
                opts.critic_speculate, opts.critic_quant, opts.memory, opts.allow_remote_code,
                opts.critic_engine, opts.vllm_bin,
                task if opts.critic_engine else None)  # an engine takes one task's images per prompt

    def generator(self, opts: ModelOptions, log, offload: str | None = None):
        from .generate import GenerationSettings, load_generator

        settings = opts.generation or GenerationSettings()
        key = self.generator_key(opts)
        if key not in self.generators:
            log(f"loading generator {opts.generator}")
            self.generators[key] = load_generator(
                opts.generator, task=opts.task, settings=settings, device=opts.device, dtype=opts.dtype,
                offload=opts.offload or offload or "none", allow_remote_code=opts.allow_remote_code)
        return self.generators[key].with_settings(settings)

    def critic(self, opts: ModelOptions, task: str, log, device: str | None = None, dtype: str | None = None,
               engine_gpu_bytes: int | None = None):
        key = self.critic_key(opts, task)
        if key not in self.critics and self.running_engine(opts, task, log) is None:
            from . import critics

            if opts.critic_url and opts.critic_engine:
                raise UsageError("--critic-url and --critic-engine both say where the critic runs: pass one.")
            if opts.critic_url:
                log(f"checking critic server {opts.critic_url}")
                timeout = {} if opts.critic_timeout is None else {"timeout": opts.critic_timeout}
                critic = critics.load("served", url=opts.critic_url, model=opts.critic_model,
                                      api_key_env=opts.api_key_env, task=task,
                                      max_tokens=opts.critic_max_new_tokens, **timeout)
            elif opts.critic_engine:
                from .critics.engine import start_timeout

                critic = critics.load("engine", engine=opts.critic_engine, spec=opts.critic, task=task,
                                      home=self.engines_home(), device=device or opts.device,
                                      dtype=dtype or opts.dtype, max_new_tokens=opts.critic_max_new_tokens,
                                      allow_remote_code=opts.allow_remote_code, vllm_bin=opts.vllm_bin,
                                      gpu_memory_bytes=engine_gpu_bytes, ready_timeout=start_timeout(),
                                      speculate=opts.critic_speculate != 0,
                                      quantization=None if opts.critic_quant in (None, "none") else opts.critic_quant,
                                      request_timeout=opts.critic_timeout, log=self.status or log)
            else:
                log(f"loading critic {opts.critic or 'for ' + task}")
                critic = critics.load("inprocess", spec=opts.critic, task=task, device=device or opts.device,
                                      dtype=dtype or opts.dtype, allow_remote_code=opts.allow_remote_code,
                                      max_new_tokens=opts.critic_max_new_tokens, fast=opts.critic_decode,
                                      speculate=opts.critic_speculate, quant=opts.critic_quant)
            self.critics[key] = critic
        critic = self.critics[key]
        if critic.task != task:  # same weights, the other task's prompts
            critic = copy.copy(critic)
            critic.task = task
        return critic

    def judge(self, opts: ModelOptions, log):
        """The independent judge named by `opts.judge` (gcr.judge), loaded once; None when there is none.
        It is small (a CLIP), so it sits beside the critic on the same device."""
        if not opts.judge:
            return None
        key = (opts.judge, opts.device, opts.dtype, opts.allow_remote_code)
        if key not in self.judges:
            from .judge import load_judge

            log(f"loading judge {opts.judge}")
            self.judges[key] = load_judge(opts.judge, device=opts.device, dtype=opts.dtype,
                                          allow_remote_code=opts.allow_remote_code)
        return self.judges[key]

    def running_engine(self, opts: ModelOptions, task: str, log):
        """A critic engine kept warm by `gcr critic start` for this critic, as a ready critic (cached
        under the critic's key); None when there is none, or with --critic-url."""
        key = self.critic_key(opts, task)
        if key in self.critics:
            return self.critics[key] if getattr(self.critics[key], "owned", True) is False else None
        if opts.critic_url or not self.warm_engines:
            return None
        from .critics import engine
        from .critics.inprocess import resolve_critic

        if not any(engine.engines_dir(self.engines_home()).glob("*.json")):
            return None  # no engine was ever left running here: nothing to look up
        model = resolve_critic(opts.critic, task=task).location
        state, reason = engine.find_running(self.engines_home(), model, task, opts.critic_max_new_tokens)
        if reason:
            self.notice(f"not using a running critic engine: {reason}.")
        if state is None:
            return None
        self.notice(f"using the running {state['engine']} critic engine for {state['critic']} at "
                    f"{state['url']} (pid {state['pid']}; stop it with gcr critic stop)")
        self.critics[key] = engine.connect_running(state, task=task, max_tokens=opts.critic_max_new_tokens,
                                                    timeout=opts.critic_timeout)
        return self.critics[key]

    def engines_home(self) -> Path:
        from .store import default_runs_dir

        return Path(self.runs_dir or default_runs_dir())

    def keep_only(self, generator_keys: set, critic_keys: set) -> None:
        """Free the models no remaining job needs (GPU memory is the scarce thing)."""
        freed = False
        for store, keep in ((self.generators, generator_keys), (self.critics, critic_keys)):
            for key in [k for k in store if k not in keep]:
                _close(store.pop(key))
                freed = True
        if freed:
            from .memory import free_gpu_cache

            free_gpu_cache()


def _close(model) -> None:
    """Stop what a model holds outside this process (a critic engine gcr started)."""
    close = getattr(model, "close", None)
    if callable(close):
        close()


class StoreSink:
    """The loop's sink for real runs: every round goes to the store as soon as it ends."""

    def __init__(self, store: RunStore, runs: dict, progress=None):
        self.store, self.runs, self.progress = store, runs, progress

    def stage(self, round_index, stage, jobs):
        if self.progress:
            self.progress.stage(round_index, stage, len(jobs))

    def round_done(self, job, round_, images):
        run = self.runs[job.id]
        stored = self.store.record_round(run, round_, images, {
            "gcr:generator": run.generator, "gcr:critic": run.critic})
        if self.progress:  # ids and errors are data: a Text, never markup (gcr.view.text)
            from .view import text

            score = "unscored" if stored.overall is None else f"{stored.overall:.2f}" + (
                "" if stored.complete else " (incomplete)")
            label = f"{run.settings.get('job_id') or job.id} " if len(self.runs) > 1 or run.batch_id else ""
            self.progress.log(text(label, style="dim").append_text(text(f"round {stored.index}: {score}"))
                              .append_text(text(f" {stored.error}" if stored.error else "", style="red")))
        return stored

    def job_done(self, job):
        status = FAILED if job.stop_reason == STOP_ERROR else COMPLETED
        self.runs[job.id] = self.store.finish_run(
            job.id, status=status, stop_reason=job.stop_reason,
            best_round=decide.best_round(job.rounds), error=job.error)
        if self.progress and hasattr(self.progress, "job_finished"):
            self.progress.job_finished()


def describe_models(models: Models) -> dict:
    """What a run records about its models: plain data, so a cluster worker can send it to the
    driver, which records the run (gcr.distributed)."""
    return {"generator": getattr(models.generator, "describe", lambda: {})(),
            "critic": getattr(models.critic, "describe", lambda: {})(),
            "generator_id": getattr(models.generator, "id", "?"), "critic_id": getattr(models.critic, "id", "?"),
            "task": models.task, "memory_plan": models.plan.to_dict() if models.plan is not None else None,
            "judge": models.judge.describe() if models.judge is not None else None}


def start_run(store: RunStore, models: Models | dict, request: str, loop: LoopSettings,
              source_image_path: str | None, batch_id: str | None = None, job_id: str | None = None,
              opts: ModelOptions | None = None) -> Run:
    """Open a run owned by this process. `models` are the loaded models, or `describe_models` of
    them. `opts` (how the models were asked for) is recorded so that `gcr resume` can load the same
    models again."""
    described = models if isinstance(models, dict) else describe_models(models)
    describe = described["generator"]
    settings = {"loop": loop.to_dict(), "generation": describe.get("settings", {}),
                "generator": describe, "critic": described["critic"]}
    if described.get("judge") is not None:
        settings["judge"] = described["judge"]
    if opts is not None:
        settings["options"] = options_to_dict(opts)
    if job_id:
        settings["job_id"] = job_id
    if described["memory_plan"] is not None:
        settings["memory_plan"] = described["memory_plan"]
    run = Run(id=new_run_id(request), request=request, task=described["task"],
              generator=described["generator_id"], critic=described["critic_id"],
              source_image=source_image_path, settings=settings, versions=package_versions(),
              device=str(describe.get("device", "")), batch_id=batch_id)
    return store.create_run(run)


def options_to_dict(opts: ModelOptions) -> dict:
    from dataclasses import asdict

    return asdict(opts)  # generation settings included: all plain JSON values


def options_from_dict(d: dict) -> ModelOptions:
    from dataclasses import fields

    from .generate import GenerationSettings

    known = {f.name for f in fields(ModelOptions)}
    values = {k: v for k, v in d.items() if k in known}
    if isinstance(values.get("generation"), dict):
        g = values["generation"]
        values["generation"] = GenerationSettings(**{k: g[k] for k in g if k in
                                                     {f.name for f in fields(GenerationSettings)}})
    return ModelOptions(**values)


def refine_jobs(store: RunStore, models: Models, jobs: list[Job], runs: dict, progress=None) -> dict:
    """Run the loop over jobs whose runs exist in the store; return the final runs by id.

    Every path ends every run with a status: Ctrl-C as interrupted, any fault as failed (when even
    that cannot be written, the run reads as interrupted once this process is gone), and this
    process gives up its ownership of the runs on the way out.
    """
    try:
        return _refine_jobs(store, models, jobs, runs, progress)
    except StorageError as e:
        single = [j.id for j in jobs if not runs[j.id].batch_id]
        if len(single) == 1 and len(jobs) == 1:
            raise e.then(f"continue the run with `gcr resume {single[0]}` (completed rounds are kept)") from None
        raise
    finally:
        for job in jobs:
            store.release(lock_name("run", job.id))


def _refine_jobs(store: RunStore, models: Models, jobs: list[Job], runs: dict, progress=None) -> dict:
    sink = StoreSink(store, runs, progress)
    try:
        advance(models, jobs, sink, progress.log if progress else lambda msg: None)
    except KeyboardInterrupt:
        close_unfinished(store, jobs, INTERRUPTED, "interrupted by the user")
        raise
    except GcrError as e:  # out of memory under the most conservative plan too, or another fault
        close_unfinished(store, jobs, FAILED, str(e))
        raise
    except Exception as e:  # noqa: BLE001 - an unexpected fault still ends every run with a status
        if is_storage_fault(e):  # the disk under the store, whichever layer let it through
            unfinished = [j for j in jobs if not j.stop_reason]
            what = (f"round {unfinished[0].next_index} of run {unfinished[0].id}" if len(unfinished) == 1
                    else f"the rounds of {len(unfinished)} runs")
            fault = storage_error(e, f"store {what} in {store.root}", store.root)
            close_unfinished(store, jobs, FAILED, str(fault))
            raise fault from None
        reason = unexpected(e)
        close_unfinished(store, jobs, FAILED, reason)
        raise GcrError(f"The run failed ({reason}); completed rounds are kept: please report this "
                       "with `gcr show --json`.") from e
    return {job.id: store.get_run(job.id) for job in jobs}


def unexpected(e: BaseException) -> str:
    """A fault no layer named, as a run records it."""
    return f"unexpected {type(e).__name__}: {first_line(e)}"


def advance(models: Models, jobs: list[Job], sink, log=lambda msg: None) -> None:
    """Run the loop until every job stops. A round that runs out of GPU memory was not recorded: it
    is retried once under a more conservative memory plan; a second OutOfMemory is raised. Shared by
    this process's runs and a cluster worker's (gcr.distributed)."""
    if models.judge is not None:  # scores every candidate after the loop decided: reported, never optimized
        from .judge import JudgedSink

        sink = JudgedSink(sink, models.judge)
    retried = False
    while True:
        try:
            pending = [j for j in jobs if not j.stop_reason]
            run_loop(pending, models.generator, models.critic, RefinedRequestRewriter(), sink, models.task)
            return
        except OutOfMemory:
            fallback = None if retried or models.plan is None else _more_conservative(models.plan)
            if fallback is None:
                raise
            from .memory import apply_plan

            log(f"out of GPU memory: retrying the round under {fallback.describe()}")
            models.generator, models.critic = apply_plan(fallback, models.generator, models.critic,
                                                         models.device)
            models.plan, retried = fallback, True


def _more_conservative(plan):
    from .memory import more_conservative

    return more_conservative(plan)


def close_unfinished(store: RunStore, jobs: list[Job], status: str, error: str) -> None:
    for job in jobs:
        if not job.stop_reason:
            try:
                store.finish_run(job.id, status=status, stop_reason=None,
                                 best_round=decide.best_round(job.rounds), error=error)
            except (GcrError, OSError, sqlite3.Error):
                pass  # the store cannot be written: the run reads as interrupted once we are gone
