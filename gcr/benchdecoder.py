"""`gcr bench`'s measurements of the critic decoder's options: speculative decoding and the compile cache.

- `speculation_replay`: the acceptance to expect on realistic critiques (gcr.critics.replay; no model).
- `time_speculation`: the decode rate and the cost of a verify pass for each K at each batch size, on the
  bench's random-weight critic. Random weights make the acceptance meaningless, so what this measures is
  the COST of a verify pass (ms per pass against K = 0); `project` combines it with the replay's tokens
  per pass into the decode rate to expect, and the K to run.
- `time_first_calls`: the compiled decoder's first call in two fresh processes sharing one compile cache
  directory: cold (empty) and warm (what the first left), as a later `gcr refine` on the same runs home.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

FIRST_CALL_TOKENS = 16
FIRST_CALL_TIMEOUT_S = 1800     # a cold compile of the 8B decoder takes minutes


def speculation_replay(directory, ks) -> dict:
    from gcr.critics.replay import load_corpus, replay_corpus

    return replay_corpus(load_corpus(directory), ks=ks)


def time_speculation(critic, requests_for, settings, tokens: int, sync, log) -> dict:
    """ms per decode pass and tok/s per sequence for K = 0 and each K of settings.speculate, at each
    batch size, over the smaller of `tokens` and settings.compare_tokens new tokens (the cost of a pass
    barely depends on how long the critique is); tokens compared with K = 0's (the same on CPU; bf16 on
    a GPU may flip near-ties)."""
    import torch

    from gcr.critics.fastdecode import FastGreedyDecoder
    from gcr.errors import OutOfMemory
    from gcr.prompts import build_messages

    # The same static-cache loop for every K, K = 0 included (on a CPU "auto" would mean plain generate).
    mode = "eager" if settings.decode == "auto" and critic.model.device.type != "cuda" else settings.decode
    n = min(settings.compare_tokens, tokens)
    kwargs = dict(critic._generate_kwargs(False), max_new_tokens=n, min_new_tokens=n)
    kwargs.pop("cache_implementation", None)
    reps = max(1, min(settings.reps, 2))
    out: dict = {}
    for batch in settings.batches:
        requests = requests_for(batch)
        inputs = critic._render([build_messages(critic.task, r.request, r.image, r.source_image) for r in requests])
        inputs = inputs.to(critic.model.device)
        reference = None
        for k in (0, *settings.speculate):
            log(f"speculation: K={k} at batch {batch} ({n} tokens, 1 warm-up + {reps} timed)")
            decoder = FastGreedyDecoder(critic.model, mode, speculate=k)
            entry: dict = {}
            try:
                sync()
                t0 = time.perf_counter()
                tokens = decoder.generate(inputs, **kwargs)
                sync()
                entry["first_call_s"] = time.perf_counter() - t0
                stats = []
                for _ in range(reps):
                    decoder.generate(inputs, **kwargs)
                    stats.append(decoder.last)
                step_s = _median([s.step_s for s in stats])
                rate = _median([s.tokens_per_s for s in stats])
                entry.update(step_ms=1000 * step_s if step_s else None, tokens_per_s_per_sequence=rate,
                             tokens_per_s_total=rate * batch if rate else None, path=stats[-1].path,
                             steps=stats[-1].steps, new_tokens=stats[-1].new_tokens,
                             acceptance_random_weights=stats[-1].acceptance)
                if k == 0:
                    reference = tokens
                elif reference is not None:
                    entry["same_tokens_as_k0"] = bool(torch.equal(reference, tokens))
            except (torch.cuda.OutOfMemoryError, OutOfMemory) as exc:
                entry = {"error": f"out of GPU memory: {str(exc)[:200]}"}
            finally:
                decoder.reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            out.setdefault(str(k), {})[str(batch)] = entry
    for k, by_batch in out.items():
        for batch, entry in by_batch.items():
            base = out["0"].get(batch, {}).get("step_ms")
            if entry.get("step_ms") and base:
                entry["cost_vs_k0"] = entry["step_ms"] / base
    return out


def project(replay: dict | None, verify: dict | None) -> dict:
    """Combine the replay's tokens per pass with the measured (or, without measurements, the assumed)
    cost of a pass: the decode speed-up to expect for each K and batch, and the K to run."""
    from gcr.critics.speculate import COST_PER_DRAFT, DEFAULT_SPECULATE, recommend_k, verify_cost

    if not replay:
        return {}
    tokens_per_step = {int(k): r["tokens_per_step"] for k, r in replay["by_k"].items()}
    assumed = {b: {k: verify_cost(k, b) for k in tokens_per_step} for b in COST_PER_DRAFT}
    result = {"default_k": DEFAULT_SPECULATE, "recommended_k_assumed_cost": recommend_k(tokens_per_step, assumed)}
    if not verify:
        return result
    measured: dict = {}
    for k, by_batch in verify.items():
        for batch, entry in by_batch.items():
            if int(k) in tokens_per_step and entry.get("cost_vs_k0"):
                measured.setdefault(int(batch), {})[int(k)] = entry["cost_vs_k0"]
    base = {b: verify.get("0", {}).get(str(b), {}).get("tokens_per_s_per_sequence") for b in measured}
    result["expected"] = {str(b): {str(k): {"speedup": tokens_per_step[k] / cost,
                                           "tokens_per_s_per_sequence": (base[b] * tokens_per_step[k] / cost
                                                                         if base[b] else None)}
                                   for k, cost in costs.items()}
                          for b, costs in measured.items()}
    result["recommended_k_measured_cost"] = recommend_k(tokens_per_step, measured) if measured else None
    return result


def _median(values):
    import statistics

    values = [v for v in values if v]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# The compiled decoder's first call, cold and warm, in fresh processes


def time_first_calls(*, scale: str, device: str, critic: str, speculate: int, quant: str, log) -> dict:
    """Run the probe twice in fresh processes sharing one new compile cache directory."""
    with tempfile.TemporaryDirectory(prefix="gcr-compile-cache-") as cache:
        out = {"speculate": speculate, "tokens": FIRST_CALL_TOKENS,
               "cache": "a fresh directory shared by both runs (the runs home's cache is not touched)"}
        args = {"scale": scale, "device": device, "critic": critic, "speculate": speculate, "quant": quant,
                "tokens": FIRST_CALL_TOKENS}
        for label in ("cold", "warm"):
            log(f"compiled decoder, first call, {label} cache: a fresh process")
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            try:
                proc = subprocess.run([sys.executable, "-m", "gcr.benchdecoder", "probe", json.dumps(args)],
                                      env=env, capture_output=True, text=True, timeout=FIRST_CALL_TIMEOUT_S)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    out[label] = {"error": f"probe exited {proc.returncode}: {tail[:300]}"}
                else:
                    out[label] = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                out[label] = {"error": f"probe took longer than {FIRST_CALL_TIMEOUT_S} s"}
        cold, warm = out.get("cold", {}), out.get("warm", {})
        if cold.get("first_call_s") and warm.get("first_call_s"):
            out["warm_over_cold"] = warm["first_call_s"] / cold["first_call_s"]
        return out


def first_call_probe(args: dict) -> dict:
    """In a fresh process: build the random-weight critic with the compiled decoder, time its first
    critique, then check its tokens against plain greedy generate."""
    import warnings

    import torch

    from PIL import Image

    from gcr import archs
    from gcr.compilecache import cache_counters
    from gcr.devices import quiet_transformers
    from gcr.presets import CRITIC_PRESETS
    from gcr.prompts import build_messages
    from gcr.records import CritiqueRequest

    device = args["device"]
    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    tokens = int(args["tokens"])
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        critic = archs.build_critic(args["critic"], args["scale"], device, torch.bfloat16 if cuda else torch.float32,
                                    max_new_tokens=tokens, min_new_tokens=tokens, fast="compile",
                                    speculate=args["speculate"], quant=args["quant"])
        sync()
        build_s = time.perf_counter() - t0
        image = Image.effect_noise((64, 64), 60).convert("RGB")
        source = Image.new("RGB", (64, 64), (90, 120, 200)) if CRITIC_PRESETS[args["critic"]].task == "edit" else None
        requests = [CritiqueRequest("a red fox reading a newspaper on a park bench", image, source)]
        t0 = time.perf_counter()
        critic.critique(requests)
        sync()
        first = time.perf_counter() - t0
        stats = critic.fast.last
        inputs = critic._render([build_messages(critic.task, r.request, r.image, r.source_image) for r in requests])
        inputs = inputs.to(critic.model.device)
        kwargs = critic._generate_kwargs(False)
        t0 = time.perf_counter()
        fast = critic.fast.generate(inputs, **kwargs)
        sync()
        second = time.perf_counter() - t0
        with torch.inference_mode():
            plain = critic.model.generate(**inputs, **kwargs)
    return {"first_call_s": first, "setup_s": stats.setup_s, "second_call_s": second, "build_s": build_s,
            "path": stats.path, "speculate": critic.fast.speculate, "compile_failed": critic.fast._compile_failed,
            "same_tokens_as_plain": bool(torch.equal(plain, fast)), "cache": cache_counters(),
            "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def _probe_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "probe":
        print("usage: python -m gcr.benchdecoder probe JSON", file=sys.stderr)
        return 2
    print(json.dumps(first_call_probe(json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
