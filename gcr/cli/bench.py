"""`gcr bench`: time a round at the published model sizes with random weights."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gcr.cli.common import handled
from gcr.cli.options import number
from gcr.errors import UsageError
from gcr.strictjson import dumps


def _decoder_names(text: str) -> tuple:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    allowed = ("plain", "hf_static", "graph", "compile", "eager")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise UsageError(f"--compare-decoders takes {', '.join(allowed)}; not {', '.join(bad)}.")
    return names


def parse_speculate(text: str) -> tuple:
    """--speculate 2,4,8: draft counts to time (empty: none)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = (0,)
    if any(not 1 <= v <= 16 for v in values):
        raise UsageError(f"--speculate takes draft counts from 1 to 16 separated by commas, e.g. 2,4,8; not {text!r}.")
    return values


def parse_batches(text: str) -> tuple:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--batch takes positive whole numbers separated by commas, e.g. 1,8; not {text!r}.")
    return values


def bench(
    generator: Annotated[str, typer.Option("--generator", "-g", help="Generator preset to build (see `gcr generators`).")] = "flux-kontext",
    critic: Annotated[Optional[str], typer.Option(help="Critic preset. Default: the RationalRewards critic for the generator's task.", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(min=16, max=4096, help="Image width. Default: the preset's (64 on tiny configs).", show_default=False)] = None,
    height: Annotated[Optional[int], typer.Option(min=16, max=4096, help="Image height. Default: the preset's (64 on tiny configs).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, max=1000, help="Denoising steps. Default: the preset's (2 on tiny configs).", show_default=False)] = None,
    critique_tokens: Annotated[Optional[int], typer.Option(min=2, max=8192, help="Tokens per critique. Default: 600 (32 on tiny configs).", show_default=False)] = None,
    batch: Annotated[str, typer.Option(help="Critic batch sizes to time, comma-separated.")] = "1,8",
    reps: Annotated[int, typer.Option(min=1, max=100, help="Timed repetitions (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option(min=0, max=100, help="Untimed repetitions first.")] = 1,
    scale: Annotated[str, typer.Option(help="full (published sizes, needs a GPU), tiny (CI), or auto: full on CUDA.")] = "auto",
    static: Annotated[bool, typer.Option("--static/--no-static", help="Critic decoding with the static KV cache, compiled step and CUDA graph (default), or plain generate.")] = True,
    decode_mode: Annotated[str, typer.Option(help="With --static: auto, compile, graph or eager.")] = "auto",
    compare_decoders: Annotated[str, typer.Option(help="Also time these decoders at batch 1, comma-separated: plain, hf_static (transformers' static cache; compiles on its first call), graph, compile, eager.")] = "",
    memory: Annotated[str, typer.Option(help="Memory plan for --cap-gb: auto, resident, offload-model, swap, offload-group or critic-cpu.")] = "auto",
    cap_gb: Annotated[Optional[float], number(1.0, help="Also time a round capped at this much GPU memory (GiB), e.g. 24.", show_default=False)] = None,
    critic_speculate: Annotated[Optional[int], typer.Option(min=0, max=16, help="Drafts per step for the bench's critic. Default: 0 for the timings (random weights make acceptance meaningless; use --speculate) and gcr's default for --first-call.", show_default=False)] = None,
    critic_quant: Annotated[str, typer.Option(help="The critic's decoder weights: none, or fp8 (GPUs of compute capability 8.9+). fp8 changes real critiques; random weights show only its speed.")] = "none",
    speculate: Annotated[str, typer.Option(help="Also time decoding with these draft counts K (and K=0) at each --batch size, e.g. 2,4,8: ms per verify pass against K=0 (with --decode-mode compile, each K compiles anew).")] = "",
    speculate_replay: Annotated[Optional[Path], typer.Option(help="Replay the critiques (*.txt) in this folder through the drafter: the acceptance to expect, e.g. tests/data/critiques.", show_default=False)] = None,
    replay_only: Annotated[bool, typer.Option("--replay-only", help="With --speculate-replay: only the replay (no models, seconds).")] = False,
    first_call: Annotated[bool, typer.Option("--first-call", help="Time the compiled decoder's first call in two fresh processes: cold, then warm from the first one's compile cache.")] = False,
    workers: Annotated[str, typer.Option(help="Instead: time a tiny-model batch in this process and on local Ray clusters of these worker counts, e.g. 1,2 (wall time, overhead per round, same results?).")] = "",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON result to this file.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
):
    """Time a round at real model sizes with RANDOM weights: no download; only timings and memory mean anything.

    \b
    Examples:
      gcr bench                                   # flux-kontext + rationalrewards-edit (tiny on a CPU)
      gcr bench -g flux-dev --batch 1,8,16 --json
      gcr bench --cap-gb 24                       # also the round a 24 GB card would run
      gcr bench --speculate-replay tests/data/critiques --replay-only
      gcr bench --batch 1,16 --speculate 2,4,8 --speculate-replay tests/data/critiques --first-call
      gcr bench --workers 1,2                     # a batch on Ray against one in this process
    """
    from gcr.bench import RANDOM_WEIGHTS_NOTE, BenchSettings, result_tables, run_bench
    from gcr.critics.fastdecode import MODES
    from gcr.critics.quant import QUANTS
    from gcr.view import err, out as console, text

    with handled():
        if decode_mode not in MODES or decode_mode == "off":
            raise UsageError(f"--decode-mode must be auto, compile, graph or eager, not {decode_mode!r}.")
        if critic_quant not in QUANTS:
            raise UsageError(f"--critic-quant must be one of {', '.join(QUANTS)}, not {critic_quant!r}.")
        if workers:
            return _bench_workers(workers, device, width, steps, critique_tokens, out, json_out)
        settings = BenchSettings(generator=generator, critic=critic, width=width, height=height, steps=steps,
                                 critique_tokens=critique_tokens, batches=parse_batches(batch), reps=reps,
                                 warmup=warmup, scale=scale, decode=decode_mode if static else "off",
                                 compare_decoders=_decoder_names(compare_decoders), memory=memory, cap_gb=cap_gb,
                                 device=device, critic_speculate=critic_speculate, critic_quant=critic_quant,
                                 speculate=parse_speculate(speculate),
                                 speculate_replay=str(speculate_replay) if speculate_replay else None,
                                 replay_only=replay_only, first_call=first_call)
        if not replay_only:
            err.print(text(RANDOM_WEIGHTS_NOTE, style="yellow"))

        def save(partial: dict) -> None:
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(dumps(partial, default=str))

        result = run_bench(settings, log=lambda msg: err.print(text(msg, style="dim")), checkpoint=save)
        save(result)
        if json_out:
            print(dumps(result))
        else:
            for table in result_tables(result):
                console.print(table)


def _bench_workers(workers: str, device: str, size, steps, critique_tokens, out, json_out) -> None:
    from gcr.distributed.bench import ClusterBenchSettings, cluster_table, run_cluster_bench
    from gcr.view import err, out as console, text

    try:
        counts = tuple(int(part) for part in workers.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(not 1 <= c <= 4096 for c in counts):
        raise UsageError(f"--workers takes worker counts separated by commas, e.g. 1,2; not {workers!r}.")
    settings = ClusterBenchSettings(workers=counts, device=device, **{k: v for k, v in (
        ("size", size), ("steps", steps), ("critique_tokens", critique_tokens)) if v is not None})
    result = run_cluster_bench(settings, log=lambda msg: err.print(text(msg, style="dim")))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(result))
    if json_out:
        print(dumps(result))
    else:
        console.print(cluster_table(result))
