"""A tiny random-weight CLIP (the judge's architecture), built in code for `gcr selftest` and the tests.

The real `CLIPModel` with a two-layer text tower and a two-layer vision tower, the byte-level CLIP
tokenizer of the tiny pipelines and a `CLIPImageProcessor` at 32 px, saved with safetensors into a
directory that `gcr.judge.load_judge` (and `--judge DIR`) reads like any CLIP checkpoint.
"""
from __future__ import annotations

from pathlib import Path

SEED = 0
IMAGE_SIZE = 32   # the vision tower's input: small, so a judge call costs milliseconds on a CPU


def build_tiny_clip(out_dir) -> Path:
    """Build the tiny CLIP into `out_dir` and return the dir. The weights come from a fixed seed,
    drawn without touching the caller's global RNG state, so the same call gives the same files."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from gcr.devices import quiet_transformers
    from gcr.tiny.pipelines import CLIP_MAX_LENGTH, clip_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"  # CLIP checkpoints pad with their end token
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIPModel(config).eval()
        # Random towers point image and text embeddings anywhere, so cos would be negative about half
        # the time and CLIPScore (which clamps at 0) would read 0 for most pairs. A shared projection
        # and a shared final bias put both in one half-space, as a trained CLIP's are: cos then varies
        # around 0.5 with the image and the text, and every score is informative.
        with torch.no_grad():
            model.text_projection.weight.copy_(model.visual_projection.weight)
            shared = torch.randn(model.vision_model.post_layernorm.bias.shape)
            model.vision_model.post_layernorm.bias.copy_(shared)
            model.text_model.final_layer_norm.bias.copy_(shared)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer)
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
    return out
