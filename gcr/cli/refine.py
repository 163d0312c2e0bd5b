"""`gcr refine`: one request, round by round, until the scores say stop."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated, Optional

import typer

from gcr.cli import options
from gcr.cli.common import (JsonOut, RunsDir, check_args, finish_run, handled, interrupted, load_image,
                            open_store, parse_gen_args, read_request, resume_command)
from gcr.compilecache import use_compile_cache
from gcr.errors import UsageError
from gcr.records import LoopSettings


def refine(
    request: Annotated[Optional[str], typer.Argument(help="What you want to see (or, with --image, the edit to make); - reads it from stdin.", show_default=False)] = None,
    request_file: Annotated[Optional[Path], typer.Option("--request-file", help="Read the request from this UTF-8 text file (at most 64 KiB).", show_default=False)] = None,
    image: Annotated[Optional[Path], typer.Option(rich_help_panel="Generator", help="Source image to edit (edit generators only). Every round edits this image.")] = None,
    generator: Annotated[Optional[str], typer.Option("--generator", "-g", rich_help_panel="Generator", help="A preset (see `gcr generators`), a hub id or a local diffusers directory. Default: flux-dev, or flux-kontext with --image.", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option(rich_help_panel="Generator", help="t2i or edit. Default: the preset's, or inferred from the pipeline.", show_default=False)] = None,
    critic: options.Critic = None,
    critic_url: options.CriticUrl = None,
    critic_model: options.CriticModel = None,
    api_key_env: options.ApiKeyEnv = None,
    critic_timeout: options.CriticTimeout = options.DEFAULT_CRITIC_TIMEOUT,
    critic_engine: options.CriticEngine = None,
    vllm_bin: options.VllmBin = None,
    rounds: Annotated[int, typer.Option(rich_help_panel="Loop", min=1, max=100, help="Most rounds to run.")] = LoopSettings.rounds,
    target: Annotated[float, options.number(1.0, 4.0, rich_help_panel="Loop", help="Stop when every applicable score is at least this (1-4).")] = LoopSettings.target,
    min_delta: Annotated[float, options.number(0.0, 3.0, rich_help_panel="Loop", help="A gain smaller than this counts as no improvement.")] = LoopSettings.min_delta,
    patience: Annotated[int, typer.Option(rich_help_panel="Loop", min=1, max=100, help="Stop after this many rounds without improvement.")] = LoopSettings.patience,
    time_budget: Annotated[Optional[float], options.number(0.0, rich_help_panel="Loop", help="Stop starting new rounds after this many seconds.", show_default=False)] = None,
    candidates: Annotated[int, typer.Option(rich_help_panel="Loop", min=1, max=64, help="Images per round (one per seed); the best-scored is the round's result.")] = LoopSettings.candidates,
    seed: Annotated[Optional[int], typer.Option(rich_help_panel="Loop", min=0, max=2**31 - 1, help="Base seed. Default: random (recorded with the run).", show_default=False)] = None,
    seed_policy: Annotated[str, typer.Option(rich_help_panel="Loop", help="fixed: same seeds every round (isolates the prompt's effect); vary: new seeds each round.")] = LoopSettings.seed_policy,
    on_converged: Annotated[str, typer.Option(rich_help_panel="Loop", help="When the critic proposes a prompt already run with the same seeds: stop (converged), or reseed (spend the remaining rounds on fresh seeds).")] = LoopSettings.on_converged,
    steps: Annotated[Optional[int], typer.Option(rich_help_panel="Generator", min=1, max=1000, help="Denoising steps (default: the preset's).", show_default=False)] = None,
    guidance: Annotated[Optional[float], options.number(0.0, 100.0, rich_help_panel="Generator", help="Guidance scale (default: the preset's).", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(rich_help_panel="Generator", min=8, max=8192, help="Image width in pixels.", show_default=False)] = None,
    height: Annotated[Optional[int], typer.Option(rich_help_panel="Generator", min=8, max=8192, help="Image height in pixels.", show_default=False)] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(rich_help_panel="Generator", help="Negative prompt, where the pipeline supports one.", show_default=False)] = None,
    gen_arg: Annotated[Optional[list[str]], typer.Option("--gen-arg", rich_help_panel="Generator", help="Extra pipeline argument key=value (repeatable), e.g. max_sequence_length=256.", show_default=False)] = None,
    device: Annotated[str, typer.Option(rich_help_panel="Generator", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(rich_help_panel="Generator", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    offload: Annotated[Optional[str], typer.Option(rich_help_panel="Generator", help="Generator CPU offload: none, model, group or sequential (slower, far less GPU memory). Default: chosen by --memory.", show_default=False)] = None,
    memory: Annotated[str, typer.Option(rich_help_panel="Generator", help="GPU memory plan: auto (from free memory and model sizes), resident, offload-model, swap, offload-group or critic-cpu.")] = "auto",
    critic_decode: options.CriticDecode = "auto",
    critic_speculate: options.CriticSpeculate = None,
    critic_quant: options.CriticQuant = "none",
    max_new_tokens: options.MaxNewTokens = options.DEFAULT_MAX_NEW_TOKENS,
    judge: options.Judge = None,
    allow_remote_code: Annotated[bool, typer.Option("--allow-remote-code", rich_help_panel="Generator", help="Allow models to run code from their repository (off: safer).")] = False,
    runs_dir: RunsDir = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
):
    """Generate, critique against your request, rewrite the prompt, repeat; keep the best round.

    \b
    Examples:
      gcr refine "a fox reading a newspaper on a park bench" --generator flux-dev --rounds 4
      gcr refine --request-file prompt.txt -g flux-schnell       (or: cat prompt.txt | gcr refine -)
      gcr refine "make the sky stormy, keep the house" --image house.png --generator flux-kontext
      gcr refine "a red cube" -g ./my-pipeline --critic ./my-critic --steps 2 --device cpu --json
    """
    args = dict(locals())
    from rich.text import Text

    from gcr.view import Progress, err, text

    with handled():
        # 1. Check every input before any model loads.
        check_args(args)
        request = read_request(request, request_file)
        if not request.strip():
            raise UsageError("The request is empty: say what the image should show, e.g. gcr refine \"a red fox\".")
        # Choices are checked against the one table batch files use too (gcr.batchfile.OPTION_SPECS);
        # floats too: click's ranges let inf and nan through, batch files refuse them.
        options.check_critic_choices(
            critic_url=critic_url, critic_engine=critic_engine, vllm_bin=vllm_bin, critic_decode=critic_decode,
            critic_quant=critic_quant, judge=judge, task=task, seed_policy=seed_policy, on_converged=on_converged,
            offload=offload, memory=memory, target=target, min_delta=min_delta, time_budget=time_budget,
            guidance=guidance)
        source = load_image(image) if image is not None else None
        generator = generator or ("flux-kontext" if image is not None else "flux-dev")
        from gcr.modelspec import check_models

        # Known without loading anything (not even torch): typos, paths, tasks, sizes (gcr.modelspec).
        check_models(generator=generator, critic=critic, critic_url=critic_url, task=task,
                     has_image=source is not None, width=width, height=height)
        from gcr.generate import GenerationSettings
        from gcr.runner import ModelCache, ModelOptions, load_models, refine_jobs, start_run
        from gcr.loop import Job

        settings = LoopSettings(rounds=rounds, target=target, min_delta=min_delta, patience=patience,
                                time_budget=time_budget, candidates=candidates,
                                seed=seed if seed is not None else random.randrange(2**31),
                                seed_policy=seed_policy, on_converged=on_converged)
        opts = ModelOptions(
            generator=generator, task=task, device=device, dtype=dtype, offload=offload, memory=memory,
            allow_remote_code=allow_remote_code,
            **options.critic_fields(critic=critic, critic_url=critic_url, critic_model=critic_model,
                                    api_key_env=api_key_env, critic_timeout=critic_timeout,
                                    critic_engine=critic_engine, vllm_bin=vllm_bin, max_new_tokens=max_new_tokens,
                                    critic_decode=critic_decode, critic_speculate=critic_speculate,
                                    critic_quant=critic_quant, judge=judge),
            generation=GenerationSettings(steps=steps, guidance=guidance, width=width, height=height,
                                          negative_prompt=negative_prompt,
                                          extra=parse_gen_args(gen_arg or [])))
        store = open_store(runs_dir)
        use_compile_cache(store.root)   # compiled critic decoders persist under the runs home

        # 2. Load models, open the run, run the loop (every round is stored as it ends). A critic engine
        #    started here stops when the cache closes, whatever happens.
        with Progress(rounds, enabled=not quiet) as progress, \
                ModelCache(runs_dir=store.root, notice=lambda msg: err.print(text(msg)),
                           status=progress.update) as cache:
            models = load_models(opts, has_image=source is not None, log=progress.update, cache=cache)
            run = start_run(store, models, request, settings, str(image.resolve()) if image else None,
                            opts=opts)
            if not quiet:
                err.print(Text.assemble("run ", text(run.id, style="bold"), f" · seed {settings.seed} · ",
                                        text(f"{models.task} · {run.generator} → {run.critic}")))
            job = Job(run.id, request, settings, source_image=source)
            try:
                run = refine_jobs(store, models, [job], {run.id: run}, progress)[run.id]
            except KeyboardInterrupt:
                raise interrupted("completed rounds", resume_command(run.id, runs_dir)) from None

        # 3. Report: the table for people, the record for scripts.
        finish_run(run, json_out, runs_dir)
