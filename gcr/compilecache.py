"""Compiled critic decoders that outlive the process: torch's compile caches under the runs home.

`--critic-decode compile` spends ~2 minutes compiling the decode step on its first call (H100,
Qwen3-VL-8B), in every new process. torch keeps what it compiled (Inductor's FX graph cache, the
AOTAutograd cache, Triton kernels and autotuning results) under one directory, `TORCHINDUCTOR_CACHE_DIR`,
normally in /tmp, where it may not survive and is not tied to the runs. gcr points it at
`<runs-dir>/cache/torch-compile`, so a later `gcr refine` or `gcr batch` on the same runs home finds the
compiled kernels instead of building them again (Dynamo still traces the model; the costly code
generation and kernel compilation are skipped). A cache directory the user set themselves is respected.
`gcr bench --first-call` times the compiled decoder's first call cold and warm.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"
SUBDIR = Path("cache") / "torch-compile"


def compile_cache_dir(runs_home) -> Path:
    """Where compiled artifacts for this runs home live."""
    return Path(runs_home) / SUBDIR


def use_compile_cache(runs_home) -> Path:
    """Make torch.compile in this process read and write its caches under the runs home (unless the
    environment already names a cache directory); return the directory in effect. Nothing is created
    until something is compiled."""
    if not os.environ.get(ENV):
        os.environ[ENV] = str(compile_cache_dir(runs_home).resolve())
    return Path(os.environ[ENV])


def cache_counters() -> dict:
    """This process's compile-cache hits and misses so far (Inductor FX graphs, AOTAutograd graphs)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - very old torch
        return {}
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_graph_hits": int(inductor.get("fxgraph_cache_hit", 0)),
            "fx_graph_misses": int(inductor.get("fxgraph_cache_miss", 0)),
            "aot_autograd_hits": int(aot.get("autograd_cache_hit", 0)),
            "aot_autograd_misses": int(aot.get("autograd_cache_miss", 0))}
