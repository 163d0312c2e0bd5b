"""`gcr bench`: what a Generate-Critique-Refine round costs on this machine, before downloading anything.

The generator and the critic are built with RANDOM weights at the published architectures
(`gcr.archs`) and run through the product's own classes (`DiffusersGenerator`, `TransformersCritic`
with its fast decoder, `RunStore`, `parse_critique`, the round table), so every stage of a round is
timed as a real run would spend it. Images are noise and critiques are gibberish: only timings and
memory mean anything. On a machine without CUDA the same code runs the tiny configs (CI).

Every figure is the median of `--reps` timed repetitions after `--warmup` untimed ones.
"""
from __future__ import annotations

import io
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gcr.benchdecoder import project, speculation_replay, time_first_calls, time_speculation
from gcr.errors import UsageError

RANDOM_WEIGHTS_NOTE = ("Weights are RANDOM (published architectures, no download): timings and memory are "
                       "meaningful, images and critiques are noise.")
TINY_DEFAULTS = {"width": 64, "height": 64, "steps": 2, "critique_tokens": 32}
FULL_CRITIQUE_TOKENS = 600
CAPPED_REPS = 1          # rounds under --cap-gb are slow (weights stream over PCIe): one timed round
PROMPT = "a red fox reading a newspaper on a park bench, morning light"
EDIT_PROMPT = "make the sky stormy and add rain, keep the house unchanged"


@dataclass(frozen=True)
class BenchSettings:
    generator: str = "flux-kontext"
    critic: str | None = None            # None: the RationalRewards critic for the generator's task
    width: int | None = None             # None: the preset's (full) or 64 px (tiny)
    height: int | None = None
    steps: int | None = None
    critique_tokens: int | None = None   # tokens per critique (600 full, 32 tiny)
    batches: tuple = (1, 8)
    reps: int = 3
    warmup: int = 1
    scale: str = "auto"                  # auto: full on CUDA, tiny elsewhere
    decode: str = "auto"                 # the critic's fast decoder mode (gcr.critics.fastdecode.MODES)
    compare_decoders: tuple = ()         # also time at batch 1: "plain", "hf_static" (transformers' static
                                         # cache, compiles on its first call), "graph"/"compile"/"eager"
    compare_tokens: int = 128            # tokens for those comparisons (their rates do not depend on length)
    memory: str = "auto"
    cap_gb: float | None = None          # also time a round capped at this much GPU memory (GiB)
    device: str = "auto"
    seed: int = 0
    critic_speculate: int | None = None  # the bench critic's drafts per step; None: 0 for the timings
                                         # (random weights make acceptance meaningless) and the product's
                                         # default for the first-call probe
    critic_quant: str = "none"           # "fp8": the critic's decoder weights in FP8 (gcr.critics.quant)
    speculate: tuple = ()                # also time decoding with each of these K (and K = 0), per batch
    speculate_replay: str | None = None  # a folder of critiques to replay through the drafter
    replay_ks: tuple = (2, 3, 4, 5, 6, 7, 8)
    replay_only: bool = False            # only the replay: no models, no timings
    first_call: bool = False             # time the compiled decoder's first call, cold and warm cache


@dataclass
class _StageClock:
    """Seconds per pipeline stage, read from hooks on the pipeline's own components."""

    sync: Callable[[], None]
    totals: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# The command


def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda msg: None,
              checkpoint: Callable[[dict], None] = lambda result: None) -> dict:
    """Build, warm up, time; return the result record (what `--json` prints). `checkpoint` gets the
    partial record after each phase (so a long GPU run that dies keeps what it measured)."""
    import torch

    from gcr import archs
    from gcr.devices import resolve_device
    from gcr.generate import GenerationSettings
    from gcr.presets import CRITIC_PRESETS, GENERATOR_PRESETS, default_critic_for

    # 1. Check the settings before building anything.
    if settings.replay_only:
        return _replay_only(settings)
    if settings.generator not in GENERATOR_PRESETS:
        raise UsageError(f"gcr bench builds presets only; {settings.generator!r} is not one of "
                         f"{', '.join(GENERATOR_PRESETS)}.")
    preset = GENERATOR_PRESETS[settings.generator]
    critic_name = settings.critic or default_critic_for(preset.task).name
    if critic_name not in CRITIC_PRESETS:
        raise UsageError(f"--critic must be one of {', '.join(CRITIC_PRESETS)}, not {critic_name!r}.")
    if CRITIC_PRESETS[critic_name].task != preset.task:
        raise UsageError(f"{critic_name} judges {CRITIC_PRESETS[critic_name].task} results but {settings.generator} "
                         f"is a {preset.task} model; use {default_critic_for(preset.task).name}.")
    device = resolve_device(settings.device)
    cuda = device.startswith("cuda")
    scale = settings.scale if settings.scale != "auto" else (archs.FULL if cuda else archs.TINY)
    if scale not in archs.SCALES:
        raise UsageError(f"--scale must be auto, full or tiny, not {settings.scale!r}.")
    if scale == archs.FULL and not cuda:
        raise UsageError("--scale full needs a CUDA GPU (tens of GB of weights); use --scale tiny on a CPU.")
    if any(b < 1 for b in settings.batches) or settings.reps < 1 or settings.warmup < 0:
        raise UsageError("--batch sizes and --reps must be at least 1, --warmup at least 0.")
    _check_decoder_options(settings, device)
    tiny = scale == archs.TINY
    width = settings.width or (TINY_DEFAULTS["width"] if tiny else preset.width or 1024)
    height = settings.height or (TINY_DEFAULTS["height"] if tiny else preset.height or 1024)
    steps = settings.steps or (TINY_DEFAULTS["steps"] if tiny else preset.steps)
    tokens = settings.critique_tokens or (TINY_DEFAULTS["critique_tokens"] if tiny else FULL_CRITIQUE_TOKENS)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    result: dict = {
        "random_weights": True,
        "note": RANDOM_WEIGHTS_NOTE,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "scale": scale,
        "generator": settings.generator,
        "critic": critic_name,
        "settings": {"width": width, "height": height, "steps": steps, "critique_tokens": tokens,
                     "batches": list(settings.batches), "reps": settings.reps, "warmup": settings.warmup,
                     "dtype": str(dtype).removeprefix("torch."), "decode": settings.decode,
                     "critic_speculate": settings.critic_speculate or 0, "critic_quant": settings.critic_quant,
                     "speculate": list(settings.speculate), "first_call": settings.first_call},
        "versions": _versions(),
    }
    arch = archs.architecture(settings.generator)
    result["params"] = {"generator": arch.params, "critic": archs.critic_architecture(critic_name).params,
                        "generator_components": {c.name: c.params for c in arch.components}}

    # 2. The memory plan this GPU would get in a real run.
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        result["bandwidth_bytes_per_s"] = _copy_bandwidth(device)
    try:
        plan = _plan_for(settings, critic_name, width, height, device if cuda else None)
        result["memory_plan"] = plan.to_dict() if plan else None
        if plan:
            log(plan.describe())
    except UsageError as exc:  # too small a GPU for any plan: still time what can be timed
        result["memory_plan"] = {"error": str(exc)}
        log(str(exc))

    # 2b. Optional, before any model holds the GPU: speculation replay, the compiled first call.
    if settings.speculate_replay:
        log(f"replaying the critiques in {settings.speculate_replay} through the drafter")
        result["speculation"] = {"replay": speculation_replay(settings.speculate_replay, settings.replay_ks)}
        checkpoint(result)
    if settings.first_call:
        from gcr.critics.speculate import DEFAULT_SPECULATE

        k = DEFAULT_SPECULATE if settings.critic_speculate is None else settings.critic_speculate
        result["compile_first_call"] = time_first_calls(scale=scale, device=device, critic=critic_name,
                                                        speculate=k, quant=settings.critic_quant, log=log)
        checkpoint(result)

    # 3. Build the models (random weights, the product's classes).
    log(f"building {settings.generator} and {critic_name} at {scale} size with random weights on {device}")
    t0 = time.perf_counter()
    gen_settings = GenerationSettings(steps=steps, width=width, height=height)
    with _quiet():
        generator = archs.build_generator(settings.generator, scale, device, dtype, gen_settings)
        critic = archs.build_critic(critic_name, scale, device, dtype, max_new_tokens=tokens,
                                    min_new_tokens=tokens, fast=settings.decode,
                                    speculate=settings.critic_speculate or 0, quant=settings.critic_quant)
    sync()
    result["build_s"] = time.perf_counter() - t0
    result["critic_quant"] = critic.quant

    # 4. Generation, stage by stage.
    source = _noise_image(width, height, settings.seed) if preset.task == "edit" else None
    clock = _StageClock(sync)
    with _stage_hooks(generator.pipe, clock):
        gen = _time_generation(generator, source, settings, clock, sync, device if cuda else None, log)
    result.update(gen["summary"])
    image = gen["image"]
    checkpoint(result)

    # 5. Critique, at each batch size.
    crit = _time_critiques(critic, image, source, settings, sync, device if cuda else None, log,
                           lambda partial: checkpoint({**result, **partial}))
    result.update(crit)
    checkpoint(result)

    # 6. Optional: plain generate and transformers' static cache, for comparison.
    if settings.compare_decoders:
        result["decoders"] = _compare_decoders(critic, image, source, settings, sync, log)
        checkpoint(result)

    # 6b. Optional: the decode rate and verify-pass cost with each K of speculation.
    if settings.speculate:
        critic.fast.reset()   # the timed critic's static caches go: each K gets its own decoder
        verify = time_speculation(critic, lambda batch: _requests(image, source, batch), settings, tokens,
                                  sync, log)
        result.setdefault("speculation", {})["verify"] = verify
        checkpoint(result)
    if result.get("speculation"):
        result["speculation"]["projection"] = project(result["speculation"].get("replay"),
                                                      result["speculation"].get("verify"))

    # 7. What the loop itself adds: store, PNG, parse, rewrite, table.
    result["overhead_s"] = _time_overhead(image, critic.task, settings.reps)
    overhead = result["overhead_s"]["total"]
    result["round_s"] = result["generate_s"] + result["critique_s"] + overhead
    result["round_over_generate"] = result["round_s"] / result["generate_s"]
    result["overhead_fraction"] = overhead / result["round_s"]
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        weights = archs.critic_weight_bytes(critic_name) - critic.quant.get("params", 0)  # fp8: 1 byte each
        result["critic_bandwidth_limit_tokens_per_s"] = result["bandwidth_bytes_per_s"] / weights
        result["critic_fraction_of_bandwidth_limit"] = (
            result["critic_tokens_per_s"] / result["critic_bandwidth_limit_tokens_per_s"])
    else:
        result["peak_memory_bytes"] = None

    # 8. Optional: the same round under a GPU memory cap (the plan a smaller card would get).
    if settings.cap_gb and cuda:
        checkpoint(result)
        result["capped"] = _time_capped(generator, critic, source, settings, critic_name, width, height,
                                        sync, device, log, result["round_s"])
    checkpoint(result)
    return result


def _check_decoder_options(settings: BenchSettings, device: str) -> None:
    from gcr.critics.inprocess import check_speculate_with_decoder
    from gcr.critics.quant import check_quant
    from gcr.critics.speculate import MAX_SPECULATE, check_speculate

    check_speculate_with_decoder(check_speculate(settings.critic_speculate), settings.decode)
    if any(not 1 <= k <= MAX_SPECULATE for k in settings.speculate):
        raise UsageError(f"--speculate takes draft counts from 1 to {MAX_SPECULATE}, e.g. 2,4,8.")
    if settings.speculate and settings.decode == "off":
        raise UsageError("--speculate times the fast decoder, which --no-static turns off: drop one of the two.")
    if settings.first_call and settings.decode == "off":
        raise UsageError("--first-call times the compiled decoder, which --no-static turns off: drop one of the two.")
    check_quant(settings.critic_quant, device)


def _replay_only(settings: BenchSettings) -> dict:
    """`--replay-only`: the speculation replay and nothing else (no models, seconds on any machine)."""
    if not settings.speculate_replay:
        raise UsageError("--replay-only needs --speculate-replay DIR (a folder of critique texts).")
    speculation = {"replay": speculation_replay(settings.speculate_replay, settings.replay_ks)}
    speculation["projection"] = project(speculation["replay"], None)
    return {"replay_only": True, "speculation": speculation, "versions": _versions()}


def _versions() -> dict:
    from gcr.runner import package_versions

    return package_versions()


def _plan_for(settings: BenchSettings, critic_name: str, width: int, height: int, device):
    if device is None:
        return None
    from gcr.memory import choose_plan, critic_footprint, free_gpu_bytes, generator_footprint

    return choose_plan(free_gpu_bytes(device), generator_footprint(settings.generator, width, height),
                       critic_footprint(critic_name, batch=max(settings.batches)), settings.memory)


@contextmanager
def _quiet():
    from gcr.devices import quiet_transformers

    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")  # random weights make NaN pixels: numpy warns on the cast
        yield


def _noise_image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _copy_bandwidth(device) -> float:
    """Device memory bandwidth, bytes read + written per second, from a 1 GiB device-to-device copy."""
    import torch

    src = torch.empty(2**29, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**30 / seconds


# ---------------------------------------------------------------------------------------------
# Generation


@contextmanager
def _stage_hooks(pipe, clock: _StageClock):
    """Time text encoders, the denoiser and the VAE through hooks on the pipeline's own modules."""
    handles, patched = [], []

    def timed_module(module, stage):
        def pre(*_):
            clock.sync()
            module._gcr_bench_t0 = time.perf_counter()

        def post(*_):
            clock.sync()
            clock.add(stage, time.perf_counter() - module._gcr_bench_t0)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def timed_method(obj, name, stage):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            clock.sync()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            clock.sync()
            clock.add(stage, time.perf_counter() - t0)
            return out

        setattr(obj, name, wrapper)
        patched.append((obj, name))

    for name, component in pipe.components.items():
        if component is None or not hasattr(component, "register_forward_hook"):
            continue
        if name.startswith("text_encoder"):
            timed_module(component, "text_encode")
        elif name in ("transformer", "unet"):
            timed_module(component, "denoise")
        elif name == "vae":
            timed_method(component, "encode", "vae_encode")
            timed_method(component, "decode", "vae_decode")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for obj, name in patched:
            delattr(obj, name)  # the instance attribute goes; the class method shows through again


def _time_generation(generator, source, settings: BenchSettings, clock: _StageClock, sync, device, log) -> dict:
    import torch

    from gcr.records import GenerationRequest

    prompt = EDIT_PROMPT if source is not None else PROMPT
    request = [GenerationRequest(prompt, settings.seed, source)]
    log(f"generate: {settings.warmup} warm-up + {settings.reps} timed")
    with _quiet():
        for _ in range(settings.warmup):
            generator.generate(request)
        if device:
            torch.cuda.reset_peak_memory_stats(device)
        totals, stages, image = [], [], None
        for _ in range(settings.reps):
            clock.reset()
            sync()
            t0 = time.perf_counter()
            image = generator.generate(request)[0]
            sync()
            totals.append(time.perf_counter() - t0)
            stages.append((dict(clock.totals), dict(clock.calls)))
    peak = torch.cuda.max_memory_allocated(device) if device else None
    keys = ("text_encode", "denoise", "vae_encode", "vae_decode")
    med = {k: _median(s.get(k, 0.0) for s, _ in stages) for k in keys}
    steps = _median(c.get("denoise", 0) for _, c in stages) or 1
    generate_s = _median(totals)
    summary = {
        "generate_s": generate_s,
        "generate_stages_s": {
            "text_encode": med["text_encode"],
            "denoise_total": med["denoise"],
            "denoise_step": med["denoise"] / steps,
            "denoise_calls": steps,
            "vae_encode": med["vae_encode"],
            "vae_decode": med["vae_decode"],
            "other": generate_s - sum(med.values()),
        },
        "generate_peak_memory_bytes": peak,
    }
    return {"summary": summary, "image": image}


# ---------------------------------------------------------------------------------------------
# Critique


def _requests(image, source, batch: int):
    from gcr.records import CritiqueRequest

    # Different request lengths, so a batch is padded as a real one is.
    base = EDIT_PROMPT if source is not None else PROMPT
    return [CritiqueRequest(base + " and more detail" * i, image, source) for i in range(batch)]


def _time_critiques(critic, image, source, settings: BenchSettings, sync, device, log,
                    checkpoint=lambda partial: None) -> dict:
    from gcr.errors import OutOfMemory
    from gcr.memory import free_gpu_cache

    per_batch = {}
    for batch in settings.batches:
        try:
            per_batch[str(batch)] = _time_batch(critic, image, source, batch, settings, sync, device, log)
        except OutOfMemory as exc:  # a batch too big for this GPU is a result, not a crash
            per_batch[str(batch)] = {"error": str(exc)}
            critic.fast.reset()
            free_gpu_cache()
        checkpoint({"critique_batches": per_batch})
    good = {k: v for k, v in per_batch.items() if "error" not in v}
    if not good:
        raise OutOfMemory(next(iter(per_batch.values()))["error"])
    key = "1" if "1" in good else next(iter(good))
    one = good[key]
    first = next(iter(good))  # the process's first critique: where compiling happens
    return {
        "critique_s": one["per_critique_s"],   # batch 1 when timed (the single-prompt round)
        "critic_prefill_s": one["prefill_s"],
        "critic_tokens_per_s": one["tokens_per_s_per_sequence"],
        "critic_path": one["path"],
        "critic_first_call": {"seconds": good[first]["first_call_s"], "setup_s": good[first]["setup_s"],
                              "batch": int(first)},
        "critic_prompt_tokens": _prompt_tokens(critic, image, source),
        "critique_batches": per_batch,
    }


def _time_batch(critic, image, source, batch: int, settings: BenchSettings, sync, device, log) -> dict:
    """Warm-up (the first one compiles / records the graph for this shape), then timed critiques."""
    import torch

    requests = _requests(image, source, batch)
    reps = settings.reps if batch == 1 else max(1, min(settings.reps, 2))  # big batches: fewer reps
    warmups = max(settings.warmup, 1)
    log(f"critique batch {batch}: {warmups} warm-up + {reps} timed")
    with _quiet():
        first = None
        for _ in range(warmups):
            sync()
            t0 = time.perf_counter()
            critic.critique(requests)
            sync()
            if first is None:
                first = {"seconds": time.perf_counter() - t0, "setup_s": critic.fast.last.setup_s}
        if device:
            torch.cuda.reset_peak_memory_stats(device)
        times, stats = [], []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            critic.critique(requests)
            sync()
            times.append(time.perf_counter() - t0)
            stats.append(critic.fast.last)
    seconds = _median(times)
    prefill = _median(s.prefill_s for s in stats)
    decode = _median(s.decode_s for s in stats)
    if not prefill:  # plain generate does not split its time: time the prefill on its own
        prefill = _time_prefill(critic, requests, sync)
        decode = seconds - prefill
    new_tokens = stats[-1].new_tokens
    rate = (new_tokens - 1) / decode if decode and decode > 0 else None
    return {
        "critique_s": seconds,
        "per_critique_s": seconds / batch,
        "critiques_per_min": 60 * batch / seconds,
        "prefill_s": prefill,
        "decode_s": decode,
        "new_tokens": new_tokens,
        "tokens_per_s_per_sequence": rate,
        "tokens_per_s_total": rate * batch if rate else None,
        "path": stats[-1].path,
        "first_call_s": first["seconds"],
        "setup_s": first["setup_s"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device else None,
    }


def _time_prefill(critic, requests, sync) -> float:
    """One forward over the prompts (vision encoder included), the last position's logits only."""
    import torch

    from gcr.prompts import build_messages

    inputs = critic._render([build_messages(critic.task, r.request, r.image, r.source_image) for r in requests])
    inputs = inputs.to(critic.model.device)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        critic.model(**inputs, logits_to_keep=1)
        sync()
    return time.perf_counter() - t0


def _prompt_tokens(critic, image, source) -> int:
    from gcr.prompts import build_messages

    request = _requests(image, source, 1)[0]
    inputs = critic._render([build_messages(critic.task, request.request, request.image, request.source_image)])
    return int(inputs["input_ids"].shape[1])


def _compare_decoders(critic, image, source, settings: BenchSettings, sync, log) -> dict:
    """Batch-1 decode rates of other decoders on the same inputs as the critic's own (`fast`), and how
    many of their tokens agree with plain generate's."""
    import torch

    from gcr.critics.fastdecode import FastGreedyDecoder
    from gcr.prompts import build_messages

    request = _requests(image, source, 1)[0]
    inputs = critic._render([build_messages(critic.task, request.request, request.image, request.source_image)])
    inputs = inputs.to(critic.model.device)
    n = settings.compare_tokens
    base = dict(critic._generate_kwargs(False), max_new_tokens=n, min_new_tokens=n)
    base.pop("cache_implementation", None)
    out, outputs = {}, {}

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        return result, time.perf_counter() - t0

    names = ["plain"] + [d for d in settings.compare_decoders if d != "plain"] + ["fast"]
    for name in names:
        log(f"decoder comparison: {name} ({n} tokens)")
        try:
            with _quiet(), torch.inference_mode():
                if name in ("plain", "hf_static"):
                    kwargs = dict(base, cache_implementation="static") if name == "hf_static" else base
                    call = lambda: critic.model.generate(**inputs, **kwargs)  # noqa: E731
                    decoder = None
                else:
                    decoder = critic.fast if name == "fast" else FastGreedyDecoder(critic.model, name)
                    call = lambda: decoder.generate(inputs, **base)  # noqa: E731
                outputs[name], first = timed(call)
                _, seconds = timed(call)
            out[name] = {"first_call_s": first, "seconds": seconds, "tokens": n, "tokens_per_s": n / seconds}
            if decoder is not None:
                out[name].update(path=decoder.last.path, decode_tokens_per_s=decoder.last.tokens_per_s,
                                 setup_s=decoder.first_setup_s)
                if decoder is not critic.fast:
                    decoder.reset()
        except Exception as exc:  # noqa: BLE001 - a comparison that fails is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    plain = outputs.get("plain")
    for name, other in outputs.items():
        if name != "plain" and plain is not None:
            out[name]["same_tokens_as_plain"] = bool(plain.shape == other.shape and bool((plain == other).all()))
            out[name]["tokens_matching_plain_prefix"] = _common_prefix(plain, other, inputs["input_ids"].shape[1])
    return out


def _common_prefix(a, b, start: int) -> int:
    a, b = a[0, start:].tolist(), b[0, start:].tolist()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Loop overhead


def sample_critique(tokens: int = 600) -> str:
    """A well-formed RationalRewards critique of about `tokens` tokens (~4 characters a token)."""
    from gcr.selftest import SAMPLE_CRITIQUE

    filler = (" The composition keeps the subject centred while the background recedes softly, and the"
              " lighting stays consistent with the requested time of day.")
    missing = max(0, tokens * 4 - len(SAMPLE_CRITIQUE))
    padding = filler * (missing // len(filler) + 1)
    return SAMPLE_CRITIQUE.replace("\n## Score: 2.75", padding + "\n## Score: 2.75", 1)


def _time_overhead(image, task: str, reps: int) -> dict:
    """Median seconds of what the loop does around the models in one round."""
    from rich.console import Console

    from gcr.parse import parse_critique
    from gcr.records import Candidate, LoopSettings, Round, Run
    from gcr.rewrite import RefinedRequestRewriter
    from gcr.store import RunStore, new_run_id
    from gcr.view import rounds_table

    text = sample_critique(FULL_CRITIQUE_TOKENS)
    timings = {"parse": [], "rewrite": [], "store": [], "table": []}
    with tempfile.TemporaryDirectory(prefix="gcr-bench-") as tmp:
        store = RunStore(Path(tmp))
        run = store.create_run(Run(id=new_run_id("bench"), request=PROMPT, task=task, generator="bench",
                                   critic="bench", settings={"loop": LoopSettings().to_dict()}))
        rounds = []
        for i in range(max(reps, 3)):
            t0 = time.perf_counter()
            parsed = parse_critique(text, "t2i")  # the sample is a t2i critique: time the parser, not a mismatch
            timings["parse"].append(time.perf_counter() - t0)
            candidate = Candidate(seed=i, raw_critique=text, scores=dict(parsed.scores), overall=parsed.overall,
                                  refined_request=parsed.refined_request, summary=parsed.summary,
                                  justifications=dict(parsed.justifications), problems=tuple(parsed.problems))
            round_ = Round(i + 1, PROMPT, (candidate,), 0, {"generate_s": 1.0, "critique_s": 1.0})
            t0 = time.perf_counter()
            rewrite = RefinedRequestRewriter().rewrite(PROMPT, [*rounds, round_])
            timings["rewrite"].append(time.perf_counter() - t0)
            round_ = Round(i + 1, PROMPT, (candidate,), 0, round_.timings, rewrite.prompt, rewrite.note)
            t0 = time.perf_counter()
            rounds.append(store.record_round(run, round_, [image], {"gcr:generator": "bench"}))
            timings["store"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Console(file=io.StringIO(), width=120).print(rounds_table(run.with_(rounds=tuple(rounds))))
            timings["table"].append(time.perf_counter() - t0)
        store.close()
    out = {k: _median(v) for k, v in timings.items()}
    out["total"] = sum(out.values())
    out["critique_chars"] = len(text)
    return out


# ---------------------------------------------------------------------------------------------
# Under a memory cap


def _time_capped(generator, critic, source, settings: BenchSettings, critic_name: str, width: int, height: int,
                 sync, device, log, uncapped_round_s: float) -> dict:
    """Cap this process at `cap_gb` of GPU memory, let the memory plan place the models, time rounds."""
    import torch

    from gcr.records import GenerationRequest
    from gcr.memory import GiB, apply_plan, choose_plan, critic_footprint, generator_footprint

    cap = int(settings.cap_gb * GiB)
    total = torch.cuda.get_device_properties(device).total_memory
    # Free what the uncapped phase held beyond the models: compiled-graph pools, static caches.
    critic.fast.reset()
    generator.pipe.to("cpu")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    plan = choose_plan(cap, generator_footprint(settings.generator, width, height),
                       critic_footprint(critic_name, batch=1), settings.memory)
    log(f"capped at {settings.cap_gb:g} GB: {plan.describe()}")
    try:
        generator, critic = apply_plan(plan, generator, critic, device)
        prompt = EDIT_PROMPT if source is not None else PROMPT
        request = [GenerationRequest(prompt, settings.seed, source)]
        times, gens, crits = [], [], []
        with _quiet():
            for i in range(1 + CAPPED_REPS):  # one warm-up: the first round pins and streams cold
                torch.cuda.reset_peak_memory_stats(device)
                sync()
                t0 = time.perf_counter()
                image = generator.generate(request)[0]
                sync()
                t1 = time.perf_counter()
                critic.critique(_requests(image, source, 1))
                sync()
                t2 = time.perf_counter()
                if i >= 1:
                    gens.append(t1 - t0)
                    crits.append(t2 - t1)
                    times.append(t2 - t0)
        round_s = _median(times)
        return {"cap_bytes": cap, "plan": plan.to_dict(), "generate_s": _median(gens), "critique_s": _median(crits),
                "round_s": round_s, "round_vs_uncapped": round_s / uncapped_round_s,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device), "critic_path": critic.fast.last.path}
    except Exception as exc:  # noqa: BLE001 - report what failed under the cap, keep the uncapped figures
        return {"cap_bytes": cap, "plan": plan.to_dict(), "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ---------------------------------------------------------------------------------------------
# Presentation


def result_tables(result: dict):
    """Rich renderables for a bench result: the stage table, the batch table, the round summary.
    Names, paths and error texts go in as Text (gcr.view.text): literal, never markup."""
    from rich.table import Table

    from gcr.view import text

    def s(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    if result.get("replay_only"):
        return speculation_tables(result)
    quant = result["settings"].get("critic_quant", "none")
    title = (f"gcr bench · {result['generator']} + {result['critic']}{' (fp8)' if quant == 'fp8' else ''} · "
             f"{result['device']} · {result['scale']} · "
             f"{result['settings']['width']}x{result['settings']['height']}, {result['settings']['steps']} steps, "
             f"{result['settings']['critique_tokens']} tokens")
    stages = Table(title=text(title), caption=RANDOM_WEIGHTS_NOTE, title_justify="left")
    stages.add_column("stage")
    stages.add_column("seconds (median)", justify="right")
    stages.add_column("detail")
    g = result["generate_stages_s"]
    stages.add_row("text encode", s(g["text_encode"], 3), "all text encoders")
    stages.add_row("denoise, per step", s(g["denoise_step"], 3), f"{g['denoise_calls']:g} denoiser calls")
    stages.add_row("denoise, total", s(g["denoise_total"]), "")
    if g["vae_encode"]:
        stages.add_row("VAE encode", s(g["vae_encode"], 3), "source image")
    stages.add_row("VAE decode", s(g["vae_decode"], 3), "")
    stages.add_row("other", s(g["other"], 3), "scheduler, latents, PIL")
    stages.add_row("[bold]generate[/]", f"[bold]{s(result['generate_s'])}[/]", "one image")
    stages.add_row("critic prefill", s(result["critic_prefill_s"], 3),
                   f"{result['critic_prompt_tokens']} prompt tokens, vision encoder included")
    rate = result["critic_tokens_per_s"]
    limit = result.get("critic_bandwidth_limit_tokens_per_s")
    detail = f"{result['critic_path']}"  # plain: the detail column is a Text below
    if rate and limit:
        detail += f", {100 * rate / limit:.0f}% of the {limit:.0f} tok/s bandwidth limit"
    stages.add_row("critic decode", f"{s(rate, 1)} tok/s", text(detail))
    stages.add_row("[bold]critique[/]", f"[bold]{s(result['critique_s'])}[/]", "batch 1")
    o = result["overhead_s"]
    stages.add_row("loop overhead", s(o["total"], 4),
                   f"store+PNG {s(o['store'], 4)}, parse {s(o['parse'], 4)}, rewrite {s(o['rewrite'], 5)}, "
                   f"table {s(o['table'], 4)}: {100 * result['overhead_fraction']:.2f}% of a round")
    stages.add_row("[bold]round[/]", f"[bold]{s(result['round_s'])}[/]",
                   f"{result['round_over_generate']:.2f}x the generator's own time")
    first = result.get("critic_first_call")
    if first:
        stages.add_row("critic first call", s(first["seconds"], 1),
                       f"once per process and batch shape: compile/capture {s(first['setup_s'], 1)} s")
    peak = result.get("peak_memory_bytes")
    if peak:
        stages.add_row("peak GPU memory", f"{peak / 2**30:.1f} GiB", "max allocated, whole bench")

    batches = Table(title="Critiques by batch size", title_justify="left")
    for col in ("batch", "seconds", "s / critique", "critiques / min", "tok/s per sequence", "tok/s total", "path"):
        batches.add_column(col, justify="right" if col != "path" else "left")
    for batch, b in result["critique_batches"].items():
        if "error" in b:
            batches.add_row(text(batch), "-", "-", "-", "-", "-", text(str(b["error"])[:60], style="red"))
            continue
        batches.add_row(batch, s(b["critique_s"]), s(b["per_critique_s"]), s(b["critiques_per_min"], 1),
                        s(b["tokens_per_s_per_sequence"], 1), s(b["tokens_per_s_total"], 0), text(b["path"]))
    tables = [stages, batches]
    if result.get("decoders"):
        dec = Table(title="Decoders, batch 1", title_justify="left")
        for col in ("decoder", "tok/s", "first call s", "same tokens as plain", "matching prefix"):
            dec.add_column(col)
        for name, d in result["decoders"].items():
            dec.add_row(text(name), s(d["tokens_per_s"], 1), s(d.get("first_call_s"), 1),
                        str(d.get("same_tokens_as_plain", "-")), str(d.get("tokens_matching_plain_prefix", "-")))
        tables.append(dec)
    capped = result.get("capped")
    if capped:
        cap = Table(title=text(f"Capped at {capped['cap_bytes'] / 2**30:.0f} GiB: plan {capped['plan']['name']}"),
                    title_justify="left")
        for col in ("generate s", "critique s", "round s", "vs uncapped", "peak GiB"):
            cap.add_column(col, justify="right")
        if "error" in capped:
            cap.add_row("-", "-", "-", "-", text(str(capped["error"])[:80], style="red"))
        else:
            cap.add_row(s(capped["generate_s"]), s(capped["critique_s"]), s(capped["round_s"]),
                        f"{capped['round_vs_uncapped']:.2f}x", f"{capped['peak_memory_bytes'] / 2**30:.1f}")
        tables.append(cap)
    return tables + speculation_tables(result) + first_call_tables(result)


def speculation_tables(result: dict) -> list:
    """The replay (expected acceptance), the verify cost per K, and what they project."""
    from rich.table import Table

    from gcr.critics.replay import TOKENIZER_NOTE

    def s(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    spec = result.get("speculation") or {}
    tables = []
    replay = spec.get("replay")
    projection = spec.get("projection") or {}
    if replay:
        names = ", ".join(x["name"] for x in replay["samples"])
        t = Table(title=f"Speculation replay: {len(replay['samples'])} critiques as if the critic wrote them",
                  caption=f"{names}. {TOKENIZER_NOTE} Speed-ups assume a verify pass costs 1 + c*K "
                          "one-token steps, c = " + ", ".join(
                              f"{c} at batch {b}" for b, c in replay["cost_model"]["verify_cost_per_draft"].items())
                          + " (ASSUMED, not measured).", title_justify="left")
        for col in ("K", "drafted", "accepted", "tokens / pass", "speed-up b1", "speed-up b16"):
            t.add_column(col, justify="right")
        for k, r in replay["by_k"].items():
            t.add_row(k, str(r["drafted"]), f"{100 * r['acceptance']:.1f}%", s(r["tokens_per_step"]),
                      s(r["expected_speedup"].get("1")), s(r["expected_speedup"].get("16")))
        tables.append(t)
    verify = spec.get("verify")
    if verify:
        t = Table(title="Speculation: decode with K drafts per pass (random weights: the cost is real, the "
                        "acceptance is not)", title_justify="left")
        for col in ("K", "batch", "ms / pass", "vs K=0", "tok/s (random)", "expected tok/s", "same tokens"):
            t.add_column(col, justify="right")
        expected = projection.get("expected", {})
        for k, by_batch in verify.items():
            for batch, e in by_batch.items():
                if "error" in e:
                    t.add_row(k, batch, "-", "-", "-", "-", e["error"][:40])
                    continue
                guess = expected.get(batch, {}).get(k, {}).get("tokens_per_s_per_sequence")
                t.add_row(k, batch, s(e.get("step_ms")), s(e.get("cost_vs_k0")), s(e.get("tokens_per_s_per_sequence"), 1),
                          s(guess, 1), str(e.get("same_tokens_as_k0", "-")))
        tables.append(t)
    if projection:
        t = Table(title="Speculation: the K to run", title_justify="left")
        t.add_column("from")
        t.add_column("K", justify="right")
        t.add_row("gcr's default (--critic-speculate)", str(projection.get("default_k")))
        t.add_row("replay + assumed verify cost", str(projection.get("recommended_k_assumed_cost")))
        if "recommended_k_measured_cost" in projection:
            t.add_row("replay + measured verify cost", str(projection.get("recommended_k_measured_cost")))
        tables.append(t)
    return tables


def first_call_tables(result: dict) -> list:
    from rich.table import Table

    first = result.get("compile_first_call")
    if not first:
        return []
    t = Table(title=f"Compiled decoder (K={first['speculate']}), first call in a fresh process",
              caption="warm = a later process finding the first one's compile cache (gcr keeps it under "
                      "<runs-dir>/cache/torch-compile)", title_justify="left")
    for col in ("cache", "first call s", "setup s", "FX graphs hit / missed", "same tokens as plain"):
        t.add_column(col, justify="right" if col != "cache" else "left")
    for label in ("cold", "warm"):
        e = first.get(label, {})
        if "error" in e:
            t.add_row(label, "-", "-", "-", e["error"][:50])
            continue
        c = e.get("cache", {})
        t.add_row(label, f"{e['first_call_s']:.1f}", f"{e['setup_s']:.1f}",
                  f"{c.get('fx_graph_hits', 0)} / {c.get('fx_graph_misses', 0)}", str(e.get("same_tokens_as_plain")))
    return [t]
