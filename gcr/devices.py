"""Where models run and how quietly they load: one policy shared by the generator and the critic.

torch, transformers and diffusers are imported inside the functions: importing this module is free.
"""
from __future__ import annotations

import contextlib

from gcr.errors import UsageError

_DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; an explicit device must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"Device {device!r} was requested but CUDA is not available; use --device cpu or auto.")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(
                f"Device {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("Device 'mps' was requested but is not available; use --device cpu or auto.")
        return device
    raise UsageError(f"Unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps.")


def resolve_dtype(dtype: str, device: str):
    """"auto" -> bfloat16 on CUDA, float32 elsewhere; also accepts bf16/fp16/fp32 and their long names."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    name = _DTYPES.get(dtype.lower())
    if name is None:
        raise UsageError(f"Unknown dtype {dtype!r}; expected auto, bf16, fp16 or fp32.")
    return getattr(torch, name)


@contextlib.contextmanager
def quiet_transformers():
    """Keep transformers' warnings and its weight-loading bar out of gcr's own display; restore after.
    Hub download bars are huggingface_hub's and stay as the user configured them (a first download of
    a critic is ~17 GB and deserves a bar)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not hub_bars_off:
        enable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            disable_progress_bars()
        else:
            enable_progress_bars()


@contextlib.contextmanager
def quiet_diffusers():
    """Hide diffusers' and transformers' bars and warnings (a pipeline's text encoders are transformers
    models; CLIP's 77-token truncation notice is one of these): the CLI shows its own."""
    from diffusers.utils import logging as dlogging

    was_enabled, verbosity = dlogging.is_progress_bar_enabled(), dlogging.get_verbosity()
    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    try:
        with quiet_transformers():
            yield
    finally:
        dlogging.set_verbosity(verbosity)
        if was_enabled:
            dlogging.enable_progress_bar()


def first_line(exc: BaseException) -> str:
    """An exception's first line, without a trailing period: for 'could not X (reason): fix' messages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")
