"""Fast greedy decoding for the in-process critic: static KV cache, one compiled decode step, CUDA graphs.

Why: a critique is ~600 tokens, and at batch 1 every token reads all 17.5 GB of the critic's weights.
Plain `generate` spends most of each step in Python and kernel launches (29 tokens/s on an H100, where
the memory bandwidth allows ~170). This module keeps the GPU busy instead:

1. Prefill is `model.generate(max_new_tokens=1)`: the model's own code computes the vision features,
   the multimodal rope positions and the first token exactly as plain greedy `generate` does.
2. The prompt's keys and values are copied into a fixed-size (static) cache, bucketed by length so one
   set of buffers serves many calls.
3. One decode step (embed -> decoder -> last-token logits -> min-new-tokens EOS ban -> argmax -> EOS
   bookkeeping -> write the token) reads and writes only fixed buffers, so it can be compiled with
   `torch.compile` and recorded once as a CUDA graph; each later token is a single graph replay, and
   the CPU checks for end-of-turn only every `check_every` tokens.

With `speculate=K` (prompt-lookup speculative decoding, `gcr.critics.speculate`), each step instead
drafts K tokens from n-gram matches in the prompt and the text so far, feeds the last token and the K
drafts through the model in one pass, and commits the drafts the model agrees with plus its own next
token. Rows of a batch advance by different amounts, so this path keeps one write position per row
(`_row_cache`) and a mask per row and query. The draft, the verify pass and the bookkeeping are all
fixed-shape device ops with no host sync, so the speculative step is recorded as a CUDA graph exactly
like the one-token step ("graph"), compiled once per K ("compile": a different K is a different
function), or run eagerly ("eager", and the CPU, where identity is tested). If the speculative path
fails, the decoder falls back to the one-token fast path, not to plain generate.

The result is token-for-token what plain greedy `generate` returns on the same inputs (tested on CPU
with the tiny critic, with and without speculation; on a GPU, bf16 kernels that differ from generate's
can flip a near-tie, as `cache_implementation="static"` can, and a verify pass of K + 1 tokens uses
other matmul shapes than one token). Anything this path does not reproduce (sampling, repetition
penalties, other logits processors, flash-attention masks) falls back to plain `generate`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

# Generation-config fields that add logits processors plain greedy decoding would apply; the fast path
# reproduces none of them, so any of these set means "use plain generate".
_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_model": (None,),
}
# generate() keyword arguments the fast path understands (others mean: plain generate).
_UNDERSTOOD_KWARGS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                      "pad_token_id", "eos_token_id", "cache_implementation"}
MODES = ("auto", "compile", "graph", "eager", "off")
DECODE_ATTENTION = "gcr_decode"
_MAX_EOS = 8  # size of the end-of-sequence id buffer


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of the new tokens (one, or 1 + K drafts when speculating) against the static cache,
    grouped-query style: the query heads sharing a key/value head become that head's rows (transformers'
    `pack_gqa`, which it skips while compiling), so the cache is read once instead of copied `n_rep` times
    by `repeat_kv`.

    query (batch, heads, q, dim); key/value (batch, kv_heads, max_len, dim); mask (batch, 1, q, max_len),
    True where attended. Returns (batch, q, heads, dim), as transformers' sdpa does.
    """
    import torch

    batch, heads, q, dim = query.shape
    groups = key.shape[1]
    rep = heads // groups
    packed = query.reshape(batch, groups, rep * q, dim)    # rows ordered (head within group, query)
    if q > 1 and attention_mask is not None:              # each packed row takes its query's mask row
        attention_mask = attention_mask[:, :, None].expand(batch, 1, rep, q, attention_mask.shape[-1])
        attention_mask = attention_mask.reshape(batch, 1, rep * q, -1)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous(), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def _row_cache(text_config, max_len: int, row_start, offsets):
    """A static KV cache whose every row writes at its own position: row r's new keys and values for
    queries 0..q-1 go to slots row_start[r] + offsets[:q] (speculative rows advance by different amounts)."""
    from transformers import Cache

    layer = _row_layer_class()
    layers = []
    for _ in range(text_config.num_hidden_layers):
        one = layer(max_cache_len=max_len)
        one.row_start, one.offsets = row_start, offsets
        layers.append(one)
    return Cache(layers=layers)


_ROW_LAYER: list = []


def _row_layer_class():
    """One class for every session: torch.compile guards on the layer's class, so a class made per
    session would recompile the step for every new batch shape."""
    if not _ROW_LAYER:
        from transformers import StaticLayer

        class RowLayer(StaticLayer):
            row_start: Any
            offsets: Any

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                q = key_states.shape[-2]
                slots = (self.row_start[:, None] + self.offsets[:q])[:, None, :, None]
                self.keys.scatter_(2, slots.expand(*key_states.shape), key_states)
                self.values.scatter_(2, slots.expand(*value_states.shape), value_states)
                return self.keys, self.values

        _ROW_LAYER.append(RowLayer)
    return _ROW_LAYER[0]


@dataclass
class _Session:
    """Buffers (and the recorded graph) for one (batch size, cache length, drafts): reused across calls."""

    batch: int
    max_len: int
    cache: Any
    buffers: dict
    speculate: int = 0
    graph: Any = None
    calls: int = 0

    def mutable(self) -> tuple[str, ...]:
        """The buffers a step writes (restored after warming up a graph capture)."""
        if self.speculate:
            return ("seq", "n", "row_start", "finished", "finish_at", "counters")
        return ("k", "tok", "out", "finished", "finish_at")


@dataclass
class DecodeStats:
    """What the last call cost (for `gcr bench` and the run record)."""

    path: str = ""                  # "fast-compile", "fast-graph", "fast-eager" or "generate: <why>"
    prefill_s: float = 0.0          # vision + prompt + first token
    decode_s: float = 0.0           # every later token
    setup_s: float = 0.0            # buffers, compile and graph capture, when this call had to do them
    new_tokens: int = 0
    batch: int = 0
    speculate: int = 0              # drafts per verify step (0: one token per step)
    steps: int = 0                  # decode forward passes (verify passes when speculating)
    row_steps: int = 0              # verify passes summed over the rows still writing
    accepted: int = 0               # drafted tokens committed
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate of one sequence (tokens after the first, per second of decode)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    @property
    def drafted(self) -> int:
        return self.row_steps * self.speculate

    @property
    def acceptance(self) -> float | None:
        """Fraction of drafted tokens committed (None without speculation)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens a row commits per verify pass: 1 + accepted drafts per pass (None without speculation)."""
        return 1 + self.accepted / self.row_steps if self.speculate and self.row_steps else None

    @property
    def step_s(self) -> float | None:
        """Seconds per decode forward pass (a verify pass when speculating)."""
        return self.decode_s / self.steps if self.steps else None


class FastGreedyDecoder:
    """Drop-in for `model.generate(**inputs, **greedy_kwargs)` on Qwen3-VL-style models.

    mode: "compile" (torch.compile + CUDA graph; fastest, but the first call compiles for ~2 min, and
    again for the first batch larger than 1), "graph" (CUDA graph of the eager step; ~0.2 s of setup),
    "eager" (the same static-cache loop with no graph: CPU and tests), "auto" (graph on CUDA, plain
    generate elsewhere, eager when speculation is asked for), "off" (always plain generate).

    speculate: drafts per step (0: off); None = `speculate.DEFAULT_SPECULATE` on a CUDA fast path and 0
    elsewhere. drafter: `speculate.draft_tokens` unless another function of the same signature is given.
    """

    def __init__(self, model, mode: str = "auto", *, speculate: int | None = 0, drafter=None,
                 bucket: int = 256, check_every: int = 32, max_sessions: int = 2):
        from gcr.critics import speculate as spec

        if mode not in MODES:
            raise ValueError(f"unknown fast decode mode {mode!r}; expected one of {', '.join(MODES)}")
        if speculate is not None and not 0 <= speculate <= spec.MAX_SPECULATE:
            raise ValueError(f"speculate must be 0..{spec.MAX_SPECULATE} draft tokens, not {speculate}")
        if speculate and mode == "off":
            raise ValueError("speculative decoding runs on the fast decoder: it cannot be used with mode 'off'")
        self.model = model
        self.requested_mode = mode
        self.requested_speculate = speculate
        self.drafter = drafter or spec.draft_tokens
        self._speculate_failed: str | None = None  # set when the speculative path failed: one token a step
        self.bucket = bucket
        self.check_every = check_every
        self.max_sessions = max_sessions
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._compiled: dict[int, Any] = {}      # drafts per step -> the compiled step
        self._compile_failed: str | None = None
        self._broken: str | None = None          # set when the fast path failed: later calls go plain
        self.last = DecodeStats()
        self.first_setup_s: float | None = None   # what the very first fast call spent on setup

    # -- public ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        if self.requested_mode != "auto":
            return self.requested_mode
        # On a GPU the per-token launch overhead is the cost: a CUDA graph of the step removes it for
        # ~0.2 s of setup (H100, Qwen3-VL-8B: 81 tok/s vs 29 plain). Compiling as well reaches 100+ tok/s
        # but its first call costs ~2 min (and ~3 min more for the first batch > 1), which pays only
        # after ~70 critiques: opt in with "compile" for long batch runs. On a CPU the weights'
        # arithmetic is the cost, so plain generate is kept there, unless speculation was asked for: it
        # runs on the static-cache loop, eagerly.
        if self._device().type == "cuda":
            return "graph"
        return "eager" if self.requested_speculate else "off"

    @property
    def speculate(self) -> int:
        """Drafts per verify step this decoder uses (0: one token per step)."""
        from gcr.critics.speculate import DEFAULT_SPECULATE

        if self.mode == "off" or self._speculate_failed:
            return 0
        if self.requested_speculate is None:
            return DEFAULT_SPECULATE if self._device().type == "cuda" else 0
        return self.requested_speculate

    def reset(self) -> None:
        """Forget buffers and graphs (call after moving the model: graphs hold weight addresses)."""
        self._sessions.clear()

    def describe(self) -> dict:
        from gcr.critics.speculate import MAX_NGRAM, MIN_NGRAM, draft_tokens

        drafter = (f"prompt lookup, n-grams {MAX_NGRAM}..{MIN_NGRAM}" if self.drafter is draft_tokens
                   else getattr(self.drafter, "__name__", "custom"))
        return {"mode": self.mode, "requested": self.requested_mode, "bucket": self.bucket,
                "first_setup_s": self.first_setup_s, "compile_failed": self._compile_failed,
                "failed": self._broken, "speculate": self.speculate,
                "speculate_requested": self.requested_speculate, "drafter": drafter,
                "speculate_failed": self._speculate_failed}

    def unsupported(self, inputs: Mapping, kwargs: Mapping) -> str | None:
        """Why this call must use plain generate, or None when the fast path reproduces it."""
        if self.mode == "off":
            return "fast decoding is off"
        if self._broken:
            return f"fast path failed earlier ({self._broken})"
        extra = set(kwargs) - _UNDERSTOOD_KWARGS
        if extra:
            return f"generate arguments {sorted(extra)}"
        if kwargs.get("do_sample"):
            return "sampling"
        model = self.model
        config = model.generation_config
        if config.do_sample and kwargs.get("do_sample") is None:
            return "sampling"
        for name, neutral in _NEUTRAL.items():
            if getattr(config, name, None) not in neutral:
                return f"generation_config.{name}={getattr(config, name)!r}"
        lm = self._language_model()
        if lm is None or not hasattr(model, "lm_head"):
            return f"{type(model).__name__} has no separate language model and lm_head"
        if model.config.get_text_config()._attn_implementation not in ("sdpa", "eager"):
            return f"attention implementation {model.config.get_text_config()._attn_implementation}"
        if "input_ids" not in inputs:
            return "no input_ids"
        if len(self._special_ids(kwargs)[0]) > _MAX_EOS:
            return f"more than {_MAX_EOS} end-of-sequence tokens"
        return None

    def generate(self, inputs: Mapping, **kwargs):
        """Greedy generation; returns prompt + new tokens like `generate` (pads after end-of-turn)."""
        import torch

        reason = self.unsupported(inputs, kwargs)
        if reason is not None:
            return self._plain(inputs, kwargs, reason)
        if self.speculate:
            try:
                with torch.inference_mode():
                    return self._fast(dict(inputs), kwargs, self.speculate)
            except torch.cuda.OutOfMemoryError:
                self.reset()
                raise
            except Exception as exc:  # noqa: BLE001 - speculation failing costs its gain, not the fast path
                self.reset()
                self._speculate_failed = _describe_failure(exc)
        try:
            with torch.inference_mode():
                return self._fast(dict(inputs), kwargs, 0)
        except torch.cuda.OutOfMemoryError:
            self.reset()
            raise
        except Exception as exc:  # noqa: BLE001 - a fast-path failure must cost speed, never the critique
            self.reset()
            self._broken = _describe_failure(exc)
            return self._plain(inputs, kwargs, f"fast path failed ({self._broken})")

    # -- plain fallback ---------------------------------------------------------------------------

    def _plain(self, inputs, kwargs, reason):
        t0 = time.perf_counter()
        out = self.model.generate(**inputs, **kwargs)
        self._sync()
        n = out.shape[1] - inputs["input_ids"].shape[1]
        self.last = DecodeStats(path=f"generate: {reason}", decode_s=time.perf_counter() - t0, new_tokens=n,
                                batch=out.shape[0])
        return out

    # -- fast path --------------------------------------------------------------------------------

    def _fast(self, inputs: dict, kwargs: Mapping, speculate: int):
        import torch

        model = self.model
        batch = inputs["input_ids"].shape[0]
        max_new = int(kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens or 20)
        min_new = int(kwargs.get("min_new_tokens") or model.generation_config.min_new_tokens or 0)
        eos_ids, pad_id = self._special_ids(kwargs)
        stats = DecodeStats(batch=batch)

        # 1. Prefill and the first token through the model's own generate.
        t0 = time.perf_counter()
        first = model.generate(**inputs, max_new_tokens=1, min_new_tokens=min(min_new, 1) if min_new else None,
                               do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                               eos_token_id=eos_ids or None, return_dict_in_generate=True)
        prompt_cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
        tok0 = first.sequences[:, -1]
        positions = self._next_positions(inputs)           # (rows, batch, 1): where token 1 sits
        self._sync()
        stats.prefill_s = time.perf_counter() - t0
        if max_new <= 1 or (eos_ids and bool(torch.isin(tok0, torch.tensor(eos_ids, device=tok0.device)).all())):
            self.last = stats
            stats.new_tokens, stats.path = 1, f"fast-{self.mode}"
            return first.sequences

        # 2. Static buffers for this shape; the prompt's keys and values go in.
        held = [prompt_cache]  # handed over so the dynamic copy can be freed once it is loaded
        del first, prompt_cache
        with self._decode_attention():
            if speculate:
                return self._decode_speculative(inputs, tok0, held, positions, stats, max_new, min_new, eos_ids,
                                                pad_id, speculate)
            return self._decode(inputs, tok0, held, positions, stats, max_new, min_new, eos_ids, pad_id)

    def _fill_common(self, session, inputs, held, tok0, positions, min_new, max_new, eos_ids, pad):
        """Set the buffers both decode loops read: the prompt and its padding, positions, the end-of-turn
        ids (the rest of their slots -1, which no token matches) and the rows already finished by tok0."""
        import torch

        b = session.buffers
        prompt_len = inputs["input_ids"].shape[1]
        mask = inputs.get("attention_mask")
        b["pad_ok"].fill_(True)
        if mask is not None:
            b["pad_ok"][:, :prompt_len].copy_(mask.bool())
        self._load_prompt(session, held.pop(), prompt_len)  # then the dynamic copy (GBs at large batches) goes
        b["prompt_len"].fill_(prompt_len)
        b["min_new"].fill_(min_new)
        b["pos_base"].copy_(positions)
        b["eos_mask"].zero_()
        b["eos_ids"].fill_(-1)
        if eos_ids:
            b["eos_mask"][eos_ids] = True
            b["eos_ids"][: len(eos_ids)] = torch.tensor(eos_ids, device=b["eos_ids"].device)
        b["pad"].fill_(pad)
        b["finished"].copy_(torch.isin(tok0, b["eos_ids"]))
        b["finish_at"].fill_(max_new)
        b["finish_at"].masked_fill_(b["finished"], 0)

    def _ready(self, session, stats, t0, fresh):
        """The session's step runner, once the buffers are on the device; records the set-up time."""
        runner = self._runner(session)
        self._sync()
        stats.setup_s = time.perf_counter() - t0
        if fresh and self.first_setup_s is None:
            self.first_setup_s = stats.setup_s
        return runner

    def _decode(self, inputs, tok0, held, positions, stats, max_new, min_new, eos_ids, pad_id):
        import torch

        input_ids = inputs["input_ids"]
        batch, prompt_len = input_ids.shape
        t0 = time.perf_counter()
        max_len = -(-(prompt_len + max_new) // self.bucket) * self.bucket
        session, fresh = self._session(batch, max_len, rows=positions.shape[0], speculate=0)
        b = session.buffers
        pad = pad_id if pad_id is not None else 0
        self._fill_common(session, inputs, held, tok0, positions, min_new, max_new, eos_ids, pad)
        b["k"].fill_(1)
        b["tok"].copy_(tok0.view(batch, 1))
        b["out"].fill_(pad)
        b["out"][:, 0] = tok0
        runner = self._ready(session, stats, t0, fresh)

        # 3. Decode: one step (graph replay) per token, a look at the finished flags every few steps.
        t0 = time.perf_counter()
        done = 1
        while done < max_new:
            chunk = min(self.check_every, max_new - done)
            for _ in range(chunk):
                runner()
            done += chunk
            stats.steps += chunk
            if eos_ids and bool(b["finished"].all()):
                break
        self._sync()
        stats.decode_s = time.perf_counter() - t0
        session.calls += 1

        # 4. generate's length: up to the step where the last sequence finished.
        length = int(b["finish_at"].max().item()) + 1 if eos_ids else max_new
        length = min(max(length, 1), done, max_new)
        stats.new_tokens = length
        stats.path = f"fast-{self._effective_mode()}"
        self.last = stats
        new = b["out"][:, :length].clone()
        return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)

    def _decode_speculative(self, inputs, tok0, held, positions, stats, max_new, min_new, eos_ids, pad_id, k):
        """`_decode` with K drafts per step: rows commit different numbers of tokens, so each keeps its
        own count `n` and its tokens in `seq` (prompt, then the new tokens), which the drafter reads."""
        import torch

        input_ids = inputs["input_ids"]
        batch, prompt_len = input_ids.shape
        t0 = time.perf_counter()
        # The drafts of the last step may reach k slots past the token limit.
        max_len = -(-(prompt_len + max_new + k + 1) // self.bucket) * self.bucket
        session, fresh = self._session(batch, max_len, rows=positions.shape[0], speculate=k)
        b = session.buffers
        pad = pad_id if pad_id is not None else 0
        self._fill_common(session, inputs, held, tok0, positions, min_new, max_new, eos_ids, pad)
        b["max_new"].fill_(max_new)
        b["seq"].fill_(pad)
        b["seq"][:, :prompt_len].copy_(input_ids)
        b["seq"][:, prompt_len] = tok0
        b["n"].fill_(1)
        b["row_start"].fill_(prompt_len)
        b["counters"].zero_()
        runner = self._ready(session, stats, t0, fresh)

        # 3. Decode: one verify pass (graph replay) per step; every few steps, how far the slowest row has
        #    to go bounds the next chunk (each pass commits at least one token per unfinished row).
        t0 = time.perf_counter()
        check = max(1, self.check_every // 4)   # steps commit several tokens: look more often
        while True:
            left = int(torch.where(b["finished"], 0, max_new - b["n"]).max().item())
            if left <= 0:
                break
            for _ in range(min(check, left)):
                runner()
            stats.steps += min(check, left)
        self._sync()
        stats.decode_s = time.perf_counter() - t0
        session.calls += 1

        # 4. generate's length: up to the step where the last sequence finished (or the limit).
        ends = torch.where(b["finished"], b["finish_at"] + 1, b["n"])
        length = min(max(int(ends.max().item()), 1), max_new)
        stats.new_tokens, stats.speculate = length, k
        stats.row_steps, stats.accepted = (int(v) for v in b["counters"].tolist())
        stats.path = f"fast-{self._effective_mode()}"
        self.last = stats
        new = b["seq"][:, prompt_len:prompt_len + length].clone()
        return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)

    def _decode_attention(self):
        """Route the text model's attention to `decode_attention` while decode steps are traced, run or
        recorded (a recorded graph keeps it; the prefill keeps the model's own)."""
        import contextlib

        config = self.model.config.get_text_config(decoder=True)

        @contextlib.contextmanager
        def switched():
            _register_decode_attention()
            previous = config._attn_implementation_internal
            config._attn_implementation_internal = DECODE_ATTENTION
            try:
                yield
            finally:
                config._attn_implementation_internal = previous

        return switched()

    def _special_ids(self, kwargs) -> tuple[list[int], int | None]:
        config = self.model.generation_config
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        if pad is None and eos_ids:
            pad = eos_ids[0]  # what generate does (with a warning)
        return eos_ids, pad

    def _next_positions(self, inputs: dict):
        """Rope positions of the first decoded token's input (the token after the prompt), computed by
        the model's own `_prepare_position_ids_for_generation`, like generate's first step."""
        model = self.model
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        positions = model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)
        if positions.dim() == 2:  # text-only models: (batch, seq) -> (1, batch, seq)
            positions = positions[None]
        return positions[..., -1:] + 1

    def _session(self, batch: int, max_len: int, rows: int, speculate: int):
        import torch

        key = (batch, max_len, speculate)
        if key in self._sessions:
            return self._sessions[key], False
        if len(self._sessions) >= self.max_sessions or not self._room_for(batch, max_len):
            # Idle caches and graph pools of other shapes go first: GPU memory is the scarce thing.
            self._sessions.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        from transformers import StaticCache

        device = self._device()
        text_config = self.model.config.get_text_config(decoder=True)
        vocab = self.model.lm_head.out_features
        if speculate:
            b = self._speculative_buffers(batch, max_len, rows, vocab, speculate)
            cache = _row_cache(text_config, max_len, b["row_start"], b["offsets"])
            session = _Session(batch, max_len, cache, b, speculate)
            self._sessions[key] = session
            return session, True
        cache = StaticCache(config=text_config, max_cache_len=max_len)
        b = {
            "pad_ok": torch.ones(batch, max_len, dtype=torch.bool, device=device),
            "arange": torch.arange(max_len, device=device),
            "prompt_len": torch.zeros((), dtype=torch.long, device=device),
            "k": torch.zeros((), dtype=torch.long, device=device),
            "min_new": torch.zeros((), dtype=torch.long, device=device),
            "pos_base": torch.zeros(rows, batch, 1, dtype=torch.long, device=device),
            "eos_mask": torch.zeros(vocab, dtype=torch.bool, device=device),
            "eos_ids": torch.full((_MAX_EOS,), -1, dtype=torch.long, device=device),
            "pad": torch.zeros((), dtype=torch.long, device=device),
            "tok": torch.zeros(batch, 1, dtype=torch.long, device=device),
            "out": torch.zeros(batch, max_len, dtype=torch.long, device=device),
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
            "finish_at": torch.zeros(batch, dtype=torch.long, device=device),
        }
        session = _Session(batch, max_len, cache, b)
        self._sessions[key] = session
        return session, True

    def _speculative_buffers(self, batch: int, max_len: int, rows: int, vocab: int, k: int) -> dict:
        import torch

        device = self._device()
        long = {"dtype": torch.long, "device": device}
        return {
            "pad_ok": torch.ones(batch, max_len, dtype=torch.bool, device=device),
            "arange": torch.arange(max_len, device=device),
            "offsets": torch.arange(k + 1, device=device),
            "prompt_len": torch.zeros((), **long),
            "min_new": torch.zeros((), **long),
            "max_new": torch.zeros((), **long),
            "pos_base": torch.zeros(rows, batch, 1, **long),
            "eos_mask": torch.zeros(vocab, dtype=torch.bool, device=device),
            "eos_ids": torch.full((_MAX_EOS,), -1, **long),
            "pad": torch.zeros((), **long),
            "seq": torch.zeros(batch, max_len, **long),        # prompt, then the committed tokens
            "n": torch.zeros(batch, **long),                   # tokens committed per row
            "row_start": torch.zeros(batch, **long),           # cache slot of the row's last committed token
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
            "finish_at": torch.zeros(batch, **long),
            "counters": torch.zeros(2, **long),                # row verify passes, accepted drafts
        }

    def _room_for(self, batch: int, max_len: int) -> bool:
        """Whether a new cache for (batch, max_len) fits beside the sessions already held."""
        import torch

        if self._device().type != "cuda" or not self._sessions:
            return True
        config = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        need = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                * self.model.lm_head.weight.element_size() * batch * max_len)
        free, _ = torch.cuda.mem_get_info(self._device())
        cached = torch.cuda.memory_reserved(self._device()) - torch.cuda.memory_allocated(self._device())
        return free + cached > 2 * need + 2 * 1024**3

    def _load_prompt(self, session: _Session, prompt_cache, prompt_len: int) -> None:
        """Copy the prompt's keys/values into the static cache and point each layer at position L."""
        cache = session.cache
        for i, layer in enumerate(prompt_cache.layers):
            keys, values = layer.keys, layer.values
            static = cache.layers[i]
            if not getattr(static, "is_initialized", False):
                static.lazy_initialization(keys, values)
            static.keys[:, :, :prompt_len].copy_(keys)
            static.values[:, :, :prompt_len].copy_(values)
            static.cumulative_length.fill_(prompt_len)

    # -- the step -----------------------------------------------------------------------------------

    def _language_model(self):
        inner = getattr(self.model, "model", None)
        return getattr(inner, "language_model", None)

    def _step_fn(self):
        """The decode step as a function of its buffers (so one compiled artifact serves every session)."""
        import inspect

        import torch

        model = self.model
        lm = self._language_model()
        embed = lm.get_input_embeddings()
        lm_head = model.lm_head
        cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

        def step(cache, b):
            k = b["k"]
            index = b["prompt_len"] + k - 1                            # cache slot of the token fed in
            allowed = b["pad_ok"] & (b["arange"] <= index)             # (batch, max_len)
            mask = allowed[:, None, None, :]
            hidden = lm(inputs_embeds=embed(b["tok"]), attention_mask=mask, position_ids=b["pos_base"] + (k - 1),
                        use_cache=True, **{cache_kw: cache}).last_hidden_state
            logits = lm_head(hidden[:, -1, :]).float()
            logits = logits.masked_fill(b["eos_mask"] & (k < b["min_new"]), float("-inf"))
            token = logits.argmax(dim=-1)
            token = torch.where(b["finished"], b["pad"], token)
            now_done = torch.isin(token, b["eos_ids"]) & ~b["finished"]
            b["finish_at"].copy_(torch.where(now_done, k, b["finish_at"]))
            b["finished"].copy_(b["finished"] | now_done)
            b["out"].index_copy_(1, k.view(1), token.view(-1, 1))
            b["tok"].copy_(token.view(-1, 1))
            b["k"].add_(1)

        return step

    def _speculative_step_fn(self, k: int):
        """One speculative step: draft k tokens, verify them with the last token in one pass, commit."""
        import inspect

        import torch

        from gcr.critics.speculate import commit_lengths

        lm = self._language_model()
        embed = lm.get_input_embeddings()
        lm_head = self.model.lm_head
        cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        draft = self.drafter

        def step(cache, b):
            n, offsets, seq = b["n"], b["offsets"], b["seq"]
            end = b["prompt_len"] + n                                   # seq length per row
            drafts = draft(seq, end, b["pad_ok"], k)
            fed = torch.cat([seq.gather(1, (end - 1)[:, None]), drafts], dim=1)     # (batch, k + 1)
            b["row_start"].copy_(end - 1)                               # where the rows' cache writes go
            slots = (end - 1)[:, None] + offsets                        # (batch, k + 1)
            mask = b["pad_ok"][:, None, None, :] & (b["arange"][None, None, None, :] <= slots[:, None, :, None])
            positions = b["pos_base"] + (n - 1)[None, :, None] + offsets
            hidden = lm(inputs_embeds=embed(fed), attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_kw: cache}).last_hidden_state
            logits = lm_head(hidden).float()                            # (batch, k + 1, vocab)
            index = n[:, None] + offsets                                # the new token each position writes
            logits = logits.masked_fill(b["eos_mask"] & (index < b["min_new"])[..., None], float("-inf"))
            predicted = logits.argmax(dim=-1)
            m, first_eos = commit_lengths(drafts, predicted, n, b["finished"], b["eos_ids"], b["max_new"])
            write = end[:, None] + offsets
            seq.scatter_(1, write, torch.where(offsets < m[:, None], predicted, seq.gather(1, write)))
            now_done = first_eos < m
            b["finish_at"].copy_(torch.where(now_done, n + first_eos, b["finish_at"]))
            b["finished"].copy_(b["finished"] | now_done)
            b["counters"].add_(torch.stack([(m > 0).sum(), (m - 1).clamp(min=0).sum()]))
            n.add_(m)

        return step

    def _effective_mode(self) -> str:
        mode = self.mode
        if mode == "compile" and self._compile_failed:
            return "graph"
        return mode

    def _runner(self, session: _Session):
        """A zero-argument callable that runs one decode step for this session."""
        import torch

        k = session.speculate
        step = self._speculative_step_fn(k) if k else self._step_fn()
        mode = self._effective_mode()
        if mode == "eager":
            return lambda: step(session.cache, session.buffers)
        if mode == "compile":
            if k not in self._compiled:
                # dynamic: one compile serves every batch size and cache length (a second compile for
                # the second shape would cost as much as the first). K is fixed inside the step (the
                # verify pass's width): each K is its own compile.
                self._compiled[k] = torch.compile(step, fullgraph=True, dynamic=True)
            fn = self._compiled[k]
        else:
            fn = step
        if self._device().type != "cuda":  # no graphs off CUDA: the compiled step, called directly
            return lambda: fn(session.cache, session.buffers)
        if session.graph is None:
            try:
                session.graph = self._capture(fn, session)
            except Exception as exc:  # noqa: BLE001 - compile problems must not break a critique
                if mode != "compile":
                    raise
                self._compile_failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                torch.cuda.synchronize()
                session.graph = self._capture(step, session)
        return session.graph.replay

    def _capture(self, fn, session: _Session):
        """Warm `fn` up on a side stream (compiles it), restore the state it changed, record a graph."""
        import torch

        b = session.buffers
        saved = {name: b[name].clone() for name in session.mutable()}
        lengths = [layer.cumulative_length.clone() for layer in session.cache.layers]

        def restore():
            for name, value in saved.items():
                b[name].copy_(value)
            for layer, length in zip(session.cache.layers, lengths):
                layer.cumulative_length.copy_(length)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(session.cache, b)
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(session.cache, b)
        restore()  # capture records without running; this keeps the state exact either way
        return graph

    def _device(self):
        return self.model.lm_head.weight.device

    def _sync(self) -> None:
        import torch

        if self._device().type == "cuda":
            torch.cuda.synchronize(self._device())


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
