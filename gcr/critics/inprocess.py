"""The critic in this process: a RationalRewards checkpoint run with transformers.

`TransformersCritic` renders each (request, image) conversation with the checkpoint's own chat template
and writes every critique of a call in one batched greedy decode (`gcr.critics.fastdecode`). It returns
the raw text; `gcr.parse` turns it into scores.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gcr.critics.base import RETRY_SAMPLING, RETRY_SEED
from gcr.devices import quiet_transformers, resolve_device, resolve_dtype
from gcr.errors import OutOfMemory, UsageError
from gcr.prompts import build_messages
from gcr.records import TASKS, CritiqueRequest

@dataclass(frozen=True)
class CriticSource:
    """Where a critic spec points: a hub id or a local directory, and the task it is meant for."""

    id: str                 # the spec as the user named it (or the task's default preset)
    location: str           # hub id or absolute directory passed to from_pretrained
    task: str | None = None  # a preset's task; None when unknown (directories, hub ids)


def resolve_critic(spec: str | None, *, task: str) -> CriticSource:
    """Turn a critic spec (None, preset name, local directory or hub id) into where to load it from."""
    from gcr.presets import default_critic_for
    from gcr.presets import resolve_critic as resolve_spec

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}.")
    default = default_critic_for(task).name
    name = default if spec is None else spec.strip()
    preset, location, is_local = resolve_spec(name)
    if preset is not None and preset.task != task:
        raise UsageError(f"critic {name!r} judges {preset.task} results, not {task}: use {default!r} "
                         "or leave --critic out.")
    if is_local:
        path = Path(location)
        if not (path / "config.json").is_file():
            raise UsageError(f"critic directory {name} has no config.json: point at a folder saved "
                             "with save_pretrained.")
        location = str(path.resolve())
    return CriticSource(id=name, location=location, task=preset.task if preset else None)


def load_critic(
    spec: str | None,
    *,
    task: str,
    device: str = "auto",
    dtype: str = "auto",
    allow_remote_code: bool = False,
    max_new_tokens: int = 2048,
    min_new_tokens: int | None = None,
    static_cache: bool = False,
    fast: str = "auto",
    speculate: int | None = None,
    quant: str = "none",
) -> TransformersCritic:
    """Load a critic into this process. Weights load as safetensors only; remote code runs only when
    `allow_remote_code` is set. `speculate`: drafts per decode step (gcr.critics.speculate; None: the
    default where the fast decoder runs on a GPU, off elsewhere). `quant`: "fp8" for FP8 decoder weights
    on compute capability 8.9+ GPUs (gcr.critics.quant; changes the critiques)."""
    from gcr.critics.quant import check_quant
    from gcr.critics.speculate import check_speculate

    source = resolve_critic(spec, task=task)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if max_new_tokens < 1 or (min_new_tokens is not None and not 0 <= min_new_tokens <= max_new_tokens):
        raise UsageError(f"critic token limits must satisfy 0 <= min_new_tokens <= max_new_tokens and "
                         f"max_new_tokens >= 1 (got {min_new_tokens} and {max_new_tokens}).")
    check_speculate_with_decoder(check_speculate(speculate), fast)
    check_quant(quant, resolved_device)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(source.location, trust_remote_code=allow_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                source.location,
                dtype=resolved_dtype,
                device_map=resolved_device,
                use_safetensors=True,
                trust_remote_code=allow_remote_code,
            )
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(f"the critic {source.id} does not fit in GPU memory: free the GPU, load it on "
                          "another device, or serve it with vLLM and use the served critic.") from exc
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        from gcr.modelspec import load_failure

        raise load_failure("critic", source.id, source.location, exc, "check the name, your network or Hugging "
                           "Face cache, or pass a local directory saved with safetensors.") from exc
    model.eval()
    from gcr.critics.quant import quantize_critic

    quantized = quantize_critic(model, quant)
    return TransformersCritic(
        id=source.id,
        source=source.location,
        task=task,
        model=model,
        processor=processor,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        static_cache=static_cache,
        fast=fast,
        speculate=speculate,
        quant=quantized,
    )


def check_speculate_with_decoder(speculate: int | None, fast: str) -> None:
    """Speculation runs on the fast decoder: asking for both it and plain generate is a contradiction."""
    if speculate and fast == "off":
        raise UsageError(f"--critic-speculate {speculate} needs the fast decoder, and --critic-decode off "
                         "turns it off: drop one of the two.")


class TransformersCritic:
    """A critic checkpoint run in this process with transformers."""

    def __init__(self, *, id: str, task: str, model, processor, source: str | None = None,
                 max_new_tokens: int = 2048, min_new_tokens: int | None = None, static_cache: bool = False,
                 fast: str = "auto", speculate: int | None = None, quant: dict | None = None):
        self.id = id
        self.source = source or id
        self.task = task
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        # A fixed-shape KV cache: what torch.compile needs to reuse one graph across decode steps. Seen
        # on an H100 (transformers 5.17): generate then compiles the decode step itself (first call
        # ~20 s); fp32 output matched the dynamic cache token for token, bf16 output did not.
        self.static_cache = static_cache
        # Let transformers encode control tokens in user text as plain text where it can (>= 5.24);
        # False forces gcr's own fallback (older versions; tests of that path).
        self.sanitize_natively = True
        # Greedy critiques go through gcr.critics.fastdecode: a static KV cache and the decode step recorded as a
        # CUDA graph on a GPU ("auto"; "compile" also compiles it: faster, ~2 min first call), the same
        # tokens as plain generate. "off" keeps plain generate; CPUs keep it too. See fastdecode.MODES.
        # speculate: prompt-lookup drafts per step (gcr.critics.speculate), the same tokens again.
        from gcr.critics.fastdecode import FastGreedyDecoder

        self.fast = FastGreedyDecoder(model, fast, speculate=speculate)
        self.quant = quant or {"scheme": "none"}   # what gcr.critics.quant did to the weights

    @property
    def device(self) -> str:
        return str(self.model.device)

    def describe(self) -> dict:
        """What a run records about its critic (JSON-ready)."""
        return {
            "id": self.id,
            "source": self.source,
            "task": self.task,
            "backend": "transformers",
            "device": self.device,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "decoding": "greedy",
            "retry_sampling": {**RETRY_SAMPLING, "seed": RETRY_SEED},
            "static_cache": self.static_cache,
            "speculate": self.fast.speculate,
            "quant": self.quant,
            "fast_decode": self.fast.describe(),
        }

    def critique(self, requests: Sequence[CritiqueRequest], retry: bool = False) -> list[str]:
        if not requests:
            return []
        if retry and len(requests) > 1:
            # Sampling draws from one RNG stream for the whole batch, so a row's sample would depend
            # on its neighbours. Retries are rare: run them one by one, each seeded alike, so a job's
            # result is the same in a batch as alone.
            return [text for r in requests for text in self.critique([r], retry=True)]
        import torch

        # 1. Render every conversation with the checkpoint's own chat template, padded on the LEFT so
        #    each prompt ends where generation starts (right padding would put pads between the prompt
        #    and the new tokens and change what a request gets compared with running it alone).
        conversations = [build_messages(self.task, r.request, r.image, r.source_image) for r in requests]
        inputs = self._render(conversations).to(self.model.device)

        # 2. One batched generate: one pass over the weights per token for the whole batch. Greedy, so
        #    deterministic; a retry samples with a fixed seed.
        try:
            with torch.inference_mode(), quiet_transformers(), _seeded(RETRY_SEED, self.model.device, retry):
                if retry:
                    output = self.model.generate(**inputs, **self._generate_kwargs(retry))
                else:  # falls back to plain generate for anything it does not reproduce exactly
                    output = self.fast.generate(inputs, **self._generate_kwargs(retry))
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"the critic ran out of GPU memory critiquing {len(requests)} images at "
                              "once: critique fewer at a time or lower the critic's max new tokens.") from exc

        # 3. Decode only the new tokens.
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _render(self, conversations: list[list[dict]]):
        apply = self.processor.apply_chat_template
        options = {"padding": True, "padding_side": "left"}
        params = inspect.signature(apply).parameters
        extra = {}
        # A request that contains "<|image_pad|>" or "<|im_end|>" is text, not a control token: it must
        # not add an image slot (the processor would then refuse the batch) or end the turn.
        if self.sanitize_natively and "sanitize_control_tokens" in params:
            extra["sanitize_control_tokens"] = True   # transformers >= 5.24 encodes them as plain text
        else:
            conversations = _defuse_control_tokens(conversations, self._control_tokens())
        if "processor_kwargs" in params:
            extra["processor_kwargs"] = options
        else:
            extra.update(options)
        return apply(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **extra,
        )

    def _control_tokens(self) -> list[str]:
        tokenizer = self.processor.tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        tokens = {t.content for t in added if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)
        return sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)

    def _generate_kwargs(self, retry: bool = False) -> dict:
        tokenizer = self.processor.tokenizer
        kwargs = {"max_new_tokens": self.max_new_tokens}
        if retry:
            kwargs.update(do_sample=True, **RETRY_SAMPLING)
        else:
            # Checkpoints ship sampling defaults (temperature, top_p ...); greedy ignores them, and
            # clearing them avoids a warning per call.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        if self.min_new_tokens is not None:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        return kwargs


def _defuse_control_tokens(conversations: list[list[dict]], tokens: list[str]) -> list[list[dict]]:
    """Copies of the conversations whose text parts cannot spell a control token: a zero-width space
    after its first character keeps the text as the user wrote it, visually, but tokenizes it as text.
    Only user text can contain them: the prompt files have none."""
    if not tokens:
        return conversations

    def defuse(text: str) -> str:
        for token in tokens:
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    out = []
    for conversation in conversations:
        messages = []
        for message in conversation:
            content = message["content"]
            if isinstance(content, str):
                content = defuse(content)
            else:
                content = [{**part, "text": defuse(part["text"])} if part.get("type") == "text" else part
                           for part in content]
            messages.append({**message, "content": content})
        out.append(messages)
    return out


@contextlib.contextmanager
def _seeded(seed: int, device, active: bool):
    """Run with a fixed torch seed (only when sampling), leaving the caller's RNG state as it was."""
    if not active:
        yield
        return
    import torch

    devices = [device] if getattr(device, "type", str(device)).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
