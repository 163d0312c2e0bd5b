"""`gcr bench`: time a round at the published model sizes with random weights."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from gcr.cli.common import handled
from gcr.errors import UsageError
from gcr.strictjson import dumps


def _decoder_names(text: str) -> tuple:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    allowed = ("plain", "hf_static", "graph", "compile", "eager")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise UsageError(f"--compare-decoders takes {', '.join(allowed)}; not {', '.join(bad)}.")
    return names


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
    cap_gb: Annotated[Optional[float], typer.Option(min=1.0, help="Also time a round capped at this much GPU memory (GiB), e.g. 24.", show_default=False)] = None,
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
    """
    from gcr.bench import RANDOM_WEIGHTS_NOTE, BenchSettings, result_tables, run_bench
    from gcr.critics.fastdecode import MODES
    from rich.text import Text

    from gcr.view import err, out as console, text

    with handled():
        if cap_gb is not None and not math.isfinite(cap_gb):
            raise UsageError(f"--cap-gb must be a finite number of GiB, not {cap_gb}.")
        if decode_mode not in MODES or decode_mode == "off":
            raise UsageError(f"--decode-mode must be auto, compile, graph or eager, not {decode_mode!r}.")
        settings = BenchSettings(generator=generator, critic=critic, width=width, height=height, steps=steps,
                                 critique_tokens=critique_tokens, batches=parse_batches(batch), reps=reps,
                                 warmup=warmup, scale=scale, decode=decode_mode if static else "off",
                                 compare_decoders=_decoder_names(compare_decoders), memory=memory, cap_gb=cap_gb,
                                 device=device)
        err.print(Text(RANDOM_WEIGHTS_NOTE, style="yellow"))
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
