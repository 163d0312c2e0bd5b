"""A tiny random-weight RationalRewards stand-in: the real Qwen3-VL architecture, a few thousand weights.

`gcr selftest`, `gcr bench` on CPU and the tests load it through the product's own `load_critic`, so the
whole critic path (processor, chat template, image tokens, batched generate, decoding) runs for real
without a model download. It writes gibberish; only shapes, types and determinism mean anything.
"""
from __future__ import annotations

from pathlib import Path

# Qwen's special tokens, in Qwen's own order. The ids differ from the real checkpoint's (the vocabulary
# here is a small byte-level BPE, then these), which is fine: the config takes its ids from this tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Vision geometry shared by the model config and the image/video processors: they must agree, or the
# number of image tokens in the prompt differs from the number of image features the model makes.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# A small pixel budget keeps prompts short: any image becomes at most 64x64 px, i.e. 4 image tokens.
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64

SEED = 0
BPE_VOCAB_SIZE = 1024
# Ten times the usual init scale: with 0.02 a model this small writes nearly the same text whatever it
# is shown; with 0.2 the image and the request change the output, so tests of batching and image order
# can tell inputs apart.
INIT_STD = 0.2

# The Qwen3-VL chat template, trimmed to what the critic uses (system + user turns with text and image
# parts, the assistant header). The real checkpoints ship their own template; this one renders the same
# token layout for these messages.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def build_tiny_critic(out_dir) -> Path:
    """Build the tiny critic into `out_dir` (safetensors + processor files) and return the dir.

    Same inputs, same files: the weights come from a fixed seed, drawn without touching the caller's
    global RNG state.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from gcr.devices import quiet_transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Tokenizer and processor: everything in code, no files to download.
    processor = build_critic_processor()
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}

    # 2. Model: the documented tiny Qwen3-VL geometry, token ids taken from the tokenizer.
    config = _build_config(len(tokenizer), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3VLForConditionalGeneration(config).eval()
        # Random weights would emit an end-of-turn token at an unpredictable step. Zeroing the output rows
        # of every special token gives them logit 0 while some ordinary token is almost surely above 0, so
        # greedy decoding always runs exactly `max_new_tokens` steps and decodes to non-empty text.
        with torch.no_grad():
            model.lm_head.weight[list(ids.values())] = 0.0

    # 3. Generation defaults as a real Qwen chat model has them.
    gen = model.generation_config
    gen.eos_token_id = ids["<|im_end|>"]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = None
    gen.do_sample = False
    for knob in ("temperature", "top_p", "top_k"):
        setattr(gen, knob, None)

    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
    return out


def build_critic_processor():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vocab, merges = _byte_level_bpe()
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    # Register every Qwen special (not only eos/pad) so text containing them maps to their single ids.
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE

    geometry = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size, **geometry)
    video_processor = Qwen3VLVideoProcessor(size=size, cap_pixels_per_frame=True, **geometry)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _byte_level_bpe() -> tuple[dict, list]:
    """A byte-level BPE vocabulary (all 256 byte symbols, so any text encodes) with merges learned from the
    critic prompts themselves. Byte-per-token prompts would be ~4,400 tokens; these are ~1,000, which
    keeps CPU attention cheap. Training on the same texts with the same settings gives the same merges."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from gcr.prompts import PROMPT_NAMES, load_prompt

    trainer_tokenizer = Tokenizer(models.BPE())
    # Qwen2Tokenizer's own pre-tokenization, so the merges fit the words it will see.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainer_tokenizer.train_from_iterator([load_prompt(name) for name in PROMPT_NAMES], trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _build_config(vocab_size: int, ids: dict):
    from transformers import Qwen3VLConfig

    hidden = 32
    return Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
            "initializer_range": INIT_STD,
        },
        vision_config={
            "depth": 2,
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_heads": 4,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "out_hidden_size": hidden,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0, 1],
            "initializer_range": INIT_STD,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )
