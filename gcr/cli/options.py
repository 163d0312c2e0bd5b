"""Options that several commands take, defined once: the critic's (refine and score) and the judge's
(refine, batch and score). A command lists them as parameters with these types; `check_critic_choices`
and `critic_fields` turn their values into checks and gcr.runner.ModelOptions fields the same way for
every command."""
from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from gcr.critics.served import CRITIC_TIMEOUT_HELP, DEFAULT_TIMEOUT_S as DEFAULT_CRITIC_TIMEOUT_S
from gcr.critics.speculate import DEFAULT_SPECULATE
from gcr.errors import UsageError

CRITIC = "Critic"


def number(low: float | None = None, high: float | None = None, **option):
    """A typer.Option for a real number between `low` and `high`. Its own parser, because the range check
    typer does would call nan 'greater than 4' (every comparison with nan is false) and let inf through
    where there is no upper bound: the command line refuses what batch files refuse, in words."""
    bounds = (f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}") if low is not None else ""
    fix = f"give a number {bounds}" if bounds else "give a plain number such as 3.5"

    def parse(text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a number; {fix}.") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"{text} is not a finite number; {fix}.")
        if (low is not None and value < low) or (high is not None and value > high):
            raise typer.BadParameter(f"{text} is out of range; {fix}.")
        return value

    # min and max are recorded too: help shows them, and the batch-file table is tested against them.
    return typer.Option(parser=parse, min=low, max=high, metavar="<number>", **option)


Critic = Annotated[Optional[str], typer.Option(rich_help_panel=CRITIC, help="Critic preset, hub id or local dir. Default: rationalrewards-t2i or rationalrewards-edit by task.", show_default=False)]
CriticUrl = Annotated[Optional[str], typer.Option(rich_help_panel=CRITIC, help="Use a served critic (vLLM or any OpenAI-compatible /v1 URL) instead of loading it in-process.", show_default=False)]
CriticModel = Annotated[Optional[str], typer.Option(rich_help_panel=CRITIC, help="Model name on the critic server (default: the one it serves).", show_default=False)]
ApiKeyEnv = Annotated[Optional[str], typer.Option(rich_help_panel=CRITIC, help="Name of the environment variable holding the critic server's API key.", show_default=False)]
CriticTimeout = Annotated[float, number(0.1, 3600.0, rich_help_panel=CRITIC, help=CRITIC_TIMEOUT_HELP)]
CriticEngine = Annotated[Optional[str], typer.Option(rich_help_panel=CRITIC, help="Start a server for the critic and use it: vllm or transformers-serve. It stops when gcr exits.", show_default=False)]
VllmBin = Annotated[Optional[str], typer.Option(rich_help_panel=CRITIC, help="The vllm executable for --critic-engine vllm (vLLM in its own virtualenv). Default: $GCR_VLLM_BIN, else vllm on PATH.", show_default=False)]
CriticDecode = Annotated[str, typer.Option(rich_help_panel=CRITIC, help="In-process critic decoding: auto (CUDA graphs on a GPU), compile (fastest after a ~2 min first call), graph, eager or off (plain generate).")]
CriticSpeculate = Annotated[Optional[int], typer.Option(rich_help_panel=CRITIC, min=0, max=16, help=f"In-process critic: tokens drafted per decode step by prompt lookup (speculative decoding: the same critiques, fewer forward passes). 0 = off. Default: {DEFAULT_SPECULATE} with the fast decoder on a GPU, off on a CPU.", show_default=False)]
CriticQuant = Annotated[str, typer.Option(rich_help_panel=CRITIC, help="In-process critic weights: none, or fp8 (GPUs of compute capability 8.9+, e.g. H100). fp8 CHANGES the critiques, and gcr bench's random weights cannot show by how much.")]
MaxNewTokens = Annotated[int, typer.Option(rich_help_panel=CRITIC, min=16, max=32768, help="Longest critique the critic may write, in tokens.")]
Judge = Annotated[Optional[str], typer.Option(rich_help_panel="Judge", help="An independent judge that gcr reports but never optimizes: clipscore, pickscore, a CLIP directory or hub id (CLIPScore), or pickscore:DIR.", show_default=False)]

DEFAULT_CRITIC_TIMEOUT = DEFAULT_CRITIC_TIMEOUT_S
DEFAULT_MAX_NEW_TOKENS = 2048


def check_critic_choices(*, critic_url, critic_engine, vllm_bin, critic_decode, critic_quant, judge=None,
                         **others) -> None:
    """The critic and judge options' values, checked against the table batch files use too
    (gcr.batchfile.OPTION_SPECS), before anything loads. `others`: further options to check the same way."""
    from gcr.batchfile import check_option, cli_flag

    values = {"critic_decode": critic_decode, "critic_engine": critic_engine, "critic_quant": critic_quant,
              **others}
    for name, value in values.items():
        if value is not None:
            try:
                check_option(name, value)
            except ValueError as e:
                raise UsageError(f"{cli_flag(name)}{str(e)[len(name):]}.") from None
    if critic_url and critic_engine:
        raise UsageError("--critic-url and --critic-engine both say where the critic runs: pass one.")
    if critic_engine == "vllm":
        from gcr.critics.engine import find_vllm

        find_vllm(vllm_bin)  # before minutes of loading models
    if judge is not None:
        from gcr.judge import resolve_judge

        resolve_judge(judge)  # a typo'd preset or a missing directory: before anything loads


def judge_spec(judge: str | None) -> str | None:
    """The --judge value as runs record it (a directory made absolute, so a resume finds it)."""
    if judge is None:
        return None
    from gcr.judge import absolute_spec

    return absolute_spec(judge)


def critic_fields(*, critic, critic_url, critic_model, api_key_env, critic_timeout, critic_engine, vllm_bin,
                  max_new_tokens, critic_decode, critic_speculate, critic_quant, judge=None) -> dict:
    """The critic and judge options as gcr.runner.ModelOptions fields."""
    return {"critic": critic, "critic_url": critic_url, "critic_model": critic_model, "api_key_env": api_key_env,
            "critic_timeout": critic_timeout, "critic_engine": critic_engine, "vllm_bin": vllm_bin,
            "critic_max_new_tokens": max_new_tokens, "critic_decode": critic_decode,
            "critic_speculate": critic_speculate, "critic_quant": critic_quant, "judge": judge_spec(judge)}


CLUSTER = "Many GPUs and machines"
Workers = Annotated[Optional[int], typer.Option(min=1, max=4096, rich_help_panel=CLUSTER, help="Run on this many Ray workers: one per GPU (or share of the CPUs) of a local Ray cluster, or of the cluster given by --ray-address. Needs Ray (the ray extra of gcr).", show_default=False)]
RayAddress = Annotated[Optional[str], typer.Option(rich_help_panel=CLUSTER, help="Join a running Ray cluster (auto, or host:port) instead of starting a local one; one worker per GPU unless --workers.", show_default=False)]


def cluster_options(workers: int | None, ray_address: str | None):
    """gcr.distributed's ClusterOptions when --workers or --ray-address ask for Ray (which must then be
    installed: one sentence if not), else None."""
    if workers is None and ray_address is None:
        return None
    from gcr.distributed.cluster import ClusterOptions, require_ray

    cluster = ClusterOptions(workers=workers, address=ray_address)
    require_ray(cluster)
    return cluster
