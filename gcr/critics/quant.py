"""FP8 weights for the in-process critic (`--critic-quant fp8`, opt-in).

At batch 1 every decode step reads all of the critic's weights, so its speed is bounded by memory
bandwidth: 17.5 GB of bf16 weights allow ~170 tokens/s on an H100, 8.8 GB of fp8 weights about twice
that. torchao's float8 dynamic quantization stores the decoder's linear weights as float8 (e4m3, one
scale per output row) and quantizes each activation row on the fly, so the matmuls run on the fp8 tensor
cores (`torch._scaled_mm`), which exist on compute capability 8.9 and newer (Ada, Hopper, Blackwell).
The vision tower, the embeddings, the norms and the output head stay in bf16: the vision tower runs once
per critique, and the head decides every greedy token.

FP8 CHANGES THE CRITIQUES: the scores and the refined request are a different model's. How much cannot
be measured with the random weights of `gcr bench` (they only show speed); compare a few real critiques
with and without it before trusting it.
"""
from __future__ import annotations

from gcr.errors import UsageError

QUANTS = ("none", "fp8")
MIN_CAPABILITY = (8, 9)


def check_quant(quant: str | None, device: str) -> None:
    """Refuse, with one sentence, a quantization this machine cannot run (before anything loads)."""
    if quant in (None, "none"):
        return
    if quant not in QUANTS:
        raise UsageError(f"--critic-quant must be one of {', '.join(QUANTS)}, not {quant!r}.")
    need = f"--critic-quant fp8 needs an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} " \
           "or newer (Ada, Hopper, Blackwell)"
    if not str(device).startswith("cuda"):
        raise UsageError(f"{need}, and this critic runs on the {device}: drop --critic-quant.")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"{need}, and no CUDA GPU is visible: drop --critic-quant.")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UsageError(f"{need}; {name} has {capability[0]}.{capability[1]}: drop --critic-quant.")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UsageError("--critic-quant fp8 needs torchao: pip install torchao (or pip install 'gcr[fp8]').") from None


def quantize_critic(model, quant: str) -> dict:
    """Quantize the critic's decoder weights in place; returns what was done (for describe())."""
    if quant in (None, "none"):
        return {"scheme": "none"}
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    layers, params = quantize_language_model(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return {"scheme": "fp8", "weights": "float8_e4m3fn, per output row", "activations": "float8, per row, dynamic",
            "linear_layers": layers, "params": params}


def quantize_language_model(model, config) -> tuple[int, int]:
    """Apply a torchao config to the linear layers of the language model's decoder layers only (not the
    vision tower, embeddings or lm_head). Returns (layers, parameters) quantized."""
    import torch
    from torchao.quantization import quantize_

    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None:
        raise UsageError(f"{type(model).__name__} has no language_model to quantize: --critic-quant fp8 "
                         "supports Qwen-VL-style critics.")
    prefix = next(name for name, module in model.named_modules() if module is language_model) + ".layers."
    chosen = {name: module for name, module in model.named_modules()
              if name.startswith(prefix) and isinstance(module, torch.nn.Linear)}
    params = sum(m.weight.numel() for m in chosen.values())
    quantize_(model, config, filter_fn=lambda module, name: name in chosen)
    return len(chosen), params
