"""The critic, however it runs: one Protocol (`Critic`), one file per way of running it, loaded by name.

    inprocess   a checkpoint in this process with transformers (the default)
    served      any OpenAI-compatible server (vLLM, `transformers serve`, ...)
    engine      a server gcr starts itself (`vllm serve` or `transformers serve`) and stops on exit

`load(backend, **options)` imports only the backend asked for, so importing this package is free.
"""
from __future__ import annotations

from importlib import import_module

from gcr.critics.base import RETRY_SAMPLING, RETRY_SEED, Critic

# backend name -> "module:factory"; a factory takes keyword options and returns a ready Critic.
BACKENDS = {
    "inprocess": "gcr.critics.inprocess:load_critic",
    "served": "gcr.critics.served:connect",
    "engine": "gcr.critics.engine:launch",
}

__all__ = ["BACKENDS", "Critic", "RETRY_SAMPLING", "RETRY_SEED", "load"]


def load(backend: str, **options) -> Critic:
    """A ready critic from the named backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown critic backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    module, _, factory = BACKENDS[backend].partition(":")
    return getattr(import_module(module), factory)(**options)
