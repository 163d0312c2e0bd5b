"""Tiny random-weight diffusers checkpoints, built in code, for `gcr selftest`, `gcr bench` and the tests.

Each family is the REAL diffusers pipeline class with the real component classes (DiT/UNet, VAE, CLIP,
T5, Qwen2.5-VL, schedulers, tokenizers), only shrunk to a few layers and a few dozen channels. The
checkpoint is written with `save_pretrained(safe_serialization=True)` and read back by the product's
own loader (`gcr.generate.load_generator`), so the whole load -> generate path runs with no download.

Why the shapes are what they are:
- Tokenizers are built from a vocabulary in code (no files, no training): every character is a token.
- VAEs get several down blocks (scale factor 4 or 16) so a 32-64 px image is a few dozen transformer
  tokens; a one-block Flux VAE would make 256 px cost 16k tokens.
- Qwen-Image-Edit always conditions on the source image at ~1024x1024 (the pipeline ignores the
  requested size for it), so its VAE downsamples 16x and its processor caps the vision tokens: a call
  stays well under a second on CPU.
- Weights come from a fixed torch seed, so a family builds to the same checkpoint every time.
"""
from __future__ import annotations

import string
from pathlib import Path

from gcr.errors import UsageError

# family -> the pipeline class its model_index.json names
FAMILIES = {
    "flux": "FluxPipeline",
    "flux-kontext": "FluxKontextPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "qwen-image": "QwenImagePipeline",
    "qwen-image-edit": "QwenImageEditPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}

SEED = 0
CLIP_MAX_LENGTH = 77  # the CLIP text models' position table; diffusers pads CLIP prompts to this

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def build_tiny_pipeline(family: str, out_dir) -> Path:
    """Build the tiny `family` pipeline with fixed random weights, save it to `out_dir`, return the path."""
    if family not in FAMILIES:
        raise UsageError(f"Unknown tiny pipeline family {family!r}; expected one of {', '.join(FAMILIES)}.")
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builder = _BUILDERS[family]
    # fork_rng: building must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        pipe = builder()
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers from a vocabulary in code


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    order = sorted(zip(printable, codes))
    return [chr(c) for _, c in order]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = [c for c in string.printable if c not in string.whitespace]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars]
    vocab += [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def qwen_tokenizer():
    from transformers import AddedToken, Qwen2Tokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for tok in QWEN_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    # Registered as special so the pre-tokenizer keeps them whole (they keep their vocab ids).
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Text encoders


def _clip_text_encoder(tokenizer, hidden: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_heads=d_model // 8,
        num_layers=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _qwen_vl_encoder(tokenizer, hidden: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 8 -> 4 rotary frequencies, split over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # 56x56 pixels at most: 4x4 patches of 14 px, merged 2x2 -> 4 vision tokens per image.
    budget = {"min_pixels": 28 * 28, "max_pixels": 56 * 56, "patch_size": 14, "merge_size": 2,
              "temporal_patch_size": 2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**budget),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**budget),
    )


# ---------------------------------------------------------------------------------------------
# VAEs


def _kl_vae(latent_channels: int, *, flow: bool, blocks: int = 3, channels: int = 8):
    """AutoencoderKL (the Flux / SD3 / SDXL VAE) with `blocks` levels: scale factor 2**(blocks-1).

    `flow`: the Flux/SD3 flavour (shifted latents, no quant convs); else the SDXL one.
    """
    from diffusers import AutoencoderKL

    flavour = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        **(flavour if flow else {}),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(channels,) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=channels // 2,
        sample_size=32,
    ).eval()


def _qwen_vae(z_dim: int = 4):
    """Qwen-Image's causal-conv VAE with 4 spatial downsamples: scale factor 16."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=0,  # the encoder's full-resolution convs are what costs at 1024 px
        temperal_downsample=[False, False, False, False],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()


# ---------------------------------------------------------------------------------------------
# Families


def _flux_components() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = _clip_text_encoder(clip_tok, hidden=32, with_projection=False)
    t5 = _t5_encoder(t5_tok, d_model=32)
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latents are packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # like FLUX.1-dev / Kontext: the guidance value is an input
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                     max_image_seq_len=1024, base_shift=0.5, max_shift=1.15),
        "vae": _kl_vae(latent_channels, flow=True),
        "text_encoder": clip,
        "tokenizer": clip_tok,
        "text_encoder_2": t5,
        "tokenizer_2": t5_tok,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _build_flux():
    from diffusers import FluxPipeline

    return FluxPipeline(**_flux_components())


def _build_flux_kontext():
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**_flux_components())


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, clip_tok_2, t5_tok = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # SD3 concatenates the two CLIP hidden states (16 + 16) and pads them to the T5 width (32).
    clip = _clip_text_encoder(clip_tok, hidden=16, with_projection=True)
    clip_2 = _clip_text_encoder(clip_tok_2, hidden=16, with_projection=True)
    t5 = _t5_encoder(t5_tok, d_model=32)
    latent_channels = 4
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,  # the two CLIP projections, concatenated
        pos_embed_max_size=64,     # up to 64 * 2 * 4 = 512 px
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(latent_channels, flow=True),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=clip_2,
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
        transformer=transformer,
    )


def _qwen_components() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    z_dim = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,  # latents are packed 2x2
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                     max_image_seq_len=1024, base_shift=0.5, max_shift=0.9,
                                                     shift_terminal=0.02, time_shift_type="exponential"),
        "vae": _qwen_vae(z_dim),
        "text_encoder": _qwen_vl_encoder(tokenizer, hidden=32),
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def _build_qwen_image():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**_qwen_components())


def _build_qwen_image_edit():
    from diffusers import QwenImageEditPipeline

    components = _qwen_components()
    return QwenImageEditPipeline(processor=qwen_processor(components["tokenizer"]), **components)


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    clip_tok, clip_tok_2 = clip_tokenizer(), clip_tokenizer()
    clip = _clip_text_encoder(clip_tok, hidden=16, with_projection=False)
    clip_2 = _clip_text_encoder(clip_tok_2, hidden=16, with_projection=True)
    time_embed = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=32,  # both CLIP hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + 16,  # 6 size/crop ids + pooled CLIP 2
        norm_num_groups=4,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=_kl_vae(4, flow=False),
        text_encoder=clip,
        text_encoder_2=clip_2,
        tokenizer=clip_tok,
        tokenizer_2=clip_tok_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )


_BUILDERS = {
    "flux": _build_flux,
    "flux-kontext": _build_flux_kontext,
    "sd3": _build_sd3,
    "qwen-image": _build_qwen_image,
    "qwen-image-edit": _build_qwen_image_edit,
    "sdxl": _build_sdxl,
}
