"""The published architectures of every preset's models, as data, and builders for random-weight copies.

`gcr bench` times a round at real model sizes without downloading 40 GB of weights: compute and memory
depend on the architecture, not on the weight values, so a model built from the published config
numbers with random weights costs what the real checkpoint costs. The numbers below are copied from
each checkpoint's `config.json` on the Hugging Face hub (the file is named in `source`); `params` is
what the builder makes at full size, pinned by a test so a typo in a config shows up as a changed count.

Every component also has a TINY config (a few layers, a few dozen channels) so the same builders and
the same bench code run on a CPU in CI. Tokenizers are the code-built ones from `gcr.tiny`: prompts
are padded to the model's fixed text length (T5: 512, CLIP: 77), so the token count, and with it the
compute, matches the real tokenizer's.

Nothing here imports torch at module level: `gcr --help` stays instant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

from gcr.errors import UsageError

FULL = "full"
TINY = "tiny"
SCALES = (FULL, TINY)


@dataclass(frozen=True)
class Component:
    """One model of a pipeline (or the critic), at both scales."""

    name: str          # the pipeline's component name ("transformer", "text_encoder_2", ...) or "critic"
    cls: str           # diffusers or transformers class name
    full: dict         # constructor arguments (diffusers) or config arguments (transformers), published size
    tiny: dict         # the same, a few thousand weights
    params: int        # parameters at full size (what the builder makes; checked by a test)
    source: str        # where the full numbers come from
    tokenizer: str | None = None  # "clip", "t5", "qwen": token ids the config must take from the tokenizer


@dataclass(frozen=True)
class Architecture:
    """What a preset is made of."""

    preset: str
    pipeline_class: str
    family: str                    # which assembly function builds the pipeline
    components: tuple = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)


# ---------------------------------------------------------------------------------------------
# Shared components

T5_XXL = Component(
    name="text_encoder_2", cls="T5EncoderModel", tokenizer="t5",
    full=dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False),
    tiny=dict(vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
              relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    params=4_762_310_656, source="google/t5-v1_1-xxl config.json (FLUX.1 text_encoder_2)",
)

CLIP_L = Component(
    name="text_encoder", cls="CLIPTextModel", tokenizer="clip",
    full=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    tiny=dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
    params=123_060_480, source="openai/clip-vit-large-patch14 text config (FLUX.1 text_encoder)",
)

# FLUX.1 and SD3 share the 16-channel, 8x-downsampling VAE; only the latent scaling differs.
_VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
_VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=16,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                 use_quant_conv=False, use_post_quant_conv=False, sample_size=64)

FLUX_VAE = Component(
    name="vae", cls="AutoencoderKL",
    full=dict(_VAE16, scaling_factor=0.3611, shift_factor=0.1159),
    tiny=dict(_VAE_TINY, scaling_factor=0.3611, shift_factor=0.1159),
    params=83_819_683, source="black-forest-labs/FLUX.1-dev vae/config.json",
)


def _flux_dit(guidance: bool, source: str) -> Component:
    return Component(
        name="transformer", cls="FluxTransformer2DModel",
        full=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=guidance, axes_dims_rope=(16, 56, 56)),
        tiny=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                  guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)),
        params=11_901_408_320 if guidance else 11_891_178_560,
        source=source,
    )


def _clip_projected(name: str, hidden: int, inter: int, layers: int, heads: int, act: str, params: int,
                    source: str) -> Component:
    return Component(
        name=name, cls="CLIPTextModelWithProjection", tokenizer="clip",
        full=dict(vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden, hidden_act=act),
        tiny=dict(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=77, projection_dim=16, hidden_act=act),
        params=params, source=source,
    )


CLIP_L_PROJ = _clip_projected("text_encoder", 768, 3072, 12, 12, "quick_gelu", 123_650_304,
                              "stabilityai/stable-diffusion-3.5-large text_encoder/config.json")
CLIP_G_PROJ = _clip_projected("text_encoder_2", 1280, 5120, 32, 20, "gelu", 694_659_840,
                              "stabilityai/stable-diffusion-3.5-large text_encoder_2/config.json")

SD3_VAE = Component(
    name="vae", cls="AutoencoderKL",
    full=dict(_VAE16, scaling_factor=1.5305, shift_factor=0.0609),
    tiny=dict(_VAE_TINY, scaling_factor=1.5305, shift_factor=0.0609),
    params=83_819_683, source="stabilityai/stable-diffusion-3.5-large vae/config.json",
)


def _sd3_mmdit(full: dict, params: int, source: str) -> Component:
    return Component(
        name="transformer", cls="SD3Transformer2DModel", full=full, params=params, source=source,
        tiny=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                  caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=64,
                  qk_norm=full.get("qk_norm"), dual_attention_layers=(0,) if full.get("dual_attention_layers") else ()),
    )


QWEN25_VL_7B = Component(
    name="text_encoder", cls="Qwen2_5_VLForConditionalGeneration", tokenizer="qwen",
    full=dict(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        tie_word_embeddings=False),
    tiny=dict(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        tie_word_embeddings=False),
    params=8_292_166_656, source="Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct)",
)

QWEN_IMAGE_DIT = Component(
    name="transformer", cls="QwenImageTransformer2DModel",
    full=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    tiny=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
    params=20_430_401_088, source="Qwen/Qwen-Image transformer/config.json",
)

QWEN_IMAGE_VAE = Component(
    name="vae", cls="AutoencoderKLQwenImage",
    full=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    tiny=dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    params=126_892_531, source="Qwen/Qwen-Image vae/config.json",
)

SDXL_UNET = Component(
    name="unet", cls="UNet2DConditionModel",
    full=dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),
    tiny=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
              attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True,
              addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=4),
    params=2_567_463_684, source="stabilityai/stable-diffusion-xl-base-1.0 unet/config.json",
)

SDXL_VAE = Component(
    name="vae", cls="AutoencoderKL",
    full=dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025),
    tiny=dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
              norm_num_groups=4, sample_size=64, scaling_factor=0.13025),
    params=83_653_863, source="stabilityai/stable-diffusion-xl-base-1.0 vae/config.json",
)

SDXL_CLIP_L = Component(
    name="text_encoder", cls="CLIPTextModel", tokenizer="clip",
    full=dict(CLIP_L.full, hidden_act="quick_gelu"), tiny=dict(CLIP_L.tiny, hidden_size=16, intermediate_size=32),
    params=123_060_480, source="stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json",
)
SDXL_CLIP_G = _clip_projected("text_encoder_2", 1280, 5120, 32, 20, "gelu", 694_659_840,
                              "stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json")

# The critic: Qwen3-VL-8B-Instruct, the backbone both RationalRewards checkpoints fine-tune.
QWEN3_VL_8B = Component(
    name="critic", cls="Qwen3VLForConditionalGeneration", tokenizer="critic",
    full=dict(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False),
    tiny=dict(
        text_config=dict(vocab_size=1100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32768,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=False),
    params=8_767_123_696, source="Qwen/Qwen3-VL-8B-Instruct config.json (TIGER-Lab/RationalRewards-8B-*)",
)

# What the Qwen3-VL image processor does at full size (Qwen3-VL-8B-Instruct preprocessor_config.json);
# gcr.prompts caps images at 802,816 px before that, so an image costs at most 784 tokens.
CRITIC_IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}


# ---------------------------------------------------------------------------------------------
# Presets

def _flux(preset: str, pipeline_class: str, guidance: bool, source: str) -> Architecture:
    return Architecture(preset, pipeline_class, "flux",
                        (_flux_dit(guidance, source), T5_XXL, CLIP_L, FLUX_VAE))


ARCHITECTURES: dict[str, Architecture] = {a.preset: a for a in (
    _flux("flux-dev", "FluxPipeline", True, "black-forest-labs/FLUX.1-dev transformer/config.json"),
    _flux("flux-schnell", "FluxPipeline", False, "black-forest-labs/FLUX.1-schnell transformer/config.json"),
    _flux("flux-kontext", "FluxKontextPipeline", True, "black-forest-labs/FLUX.1-Kontext-dev transformer/config.json"),
    Architecture("sd3.5-medium", "StableDiffusion3Pipeline", "sd3", (
        _sd3_mmdit(dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
                   2_243_171_520, "stabilityai/stable-diffusion-3.5-medium transformer/config.json"),
        CLIP_L_PROJ, CLIP_G_PROJ, replace(T5_XXL, name="text_encoder_3"), SD3_VAE)),
    Architecture("sd3.5-large", "StableDiffusion3Pipeline", "sd3", (
        _sd3_mmdit(dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm", dual_attention_layers=()),
                   8_056_627_520, "stabilityai/stable-diffusion-3.5-large transformer/config.json"),
        CLIP_L_PROJ, CLIP_G_PROJ, replace(T5_XXL, name="text_encoder_3"), SD3_VAE)),
    Architecture("qwen-image", "QwenImagePipeline", "qwen-image", (QWEN_IMAGE_DIT, QWEN25_VL_7B, QWEN_IMAGE_VAE)),
    Architecture("qwen-image-edit", "QwenImageEditPipeline", "qwen-image-edit",
                 (QWEN_IMAGE_DIT, QWEN25_VL_7B, QWEN_IMAGE_VAE)),
    Architecture("sdxl", "StableDiffusionXLPipeline", "sdxl", (SDXL_UNET, SDXL_CLIP_L, SDXL_CLIP_G, SDXL_VAE)),
)}

CRITIC_ARCHITECTURES: dict[str, Component] = {
    "rationalrewards-t2i": QWEN3_VL_8B,
    "rationalrewards-edit": QWEN3_VL_8B,
}


def architecture(preset: str) -> Architecture:
    """The architecture of a generator preset; a clear error for anything else."""
    if preset not in ARCHITECTURES:
        raise UsageError(f"No published architecture for generator {preset!r}; gcr bench knows "
                         f"{', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[preset]


def critic_architecture(preset: str) -> Component:
    if preset not in CRITIC_ARCHITECTURES:
        raise UsageError(f"No published architecture for critic {preset!r}; gcr bench knows "
                         f"{', '.join(CRITIC_ARCHITECTURES)}.")
    return CRITIC_ARCHITECTURES[preset]


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise UsageError(f"Unknown scale {scale!r}; expected {FULL!r} or {TINY!r}.")


# ---------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def building(device, dtype, seed: int = 0):
    """Create tensors directly on `device` in `dtype` (a 12B model built in float32 first would need
    48 GB), from a fixed seed, without touching the caller's RNG state or default dtype."""
    import torch

    previous = torch.get_default_dtype()
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def build_component(component: Component, scale: str, tokenizer=None):
    """One random-weight model at `scale`, on the current default device and dtype (see `building`)."""
    _check_scale(scale)
    args = dict(component.full if scale == FULL else component.tiny)
    if component.tokenizer is None:  # denoisers and VAEs: diffusers classes built from keyword arguments
        import diffusers

        return getattr(diffusers, component.cls)(**args).eval()
    import transformers

    config = _transformers_config(component, args, tokenizer)
    return getattr(transformers, component.cls)(config).eval()


def _transformers_config(component: Component, args: dict, tokenizer):
    import transformers

    kind = component.tokenizer
    if tokenizer is not None and "vocab_size" in args:  # tiny vocabularies must hold the tokenizer's ids
        args = dict(args, vocab_size=max(args["vocab_size"], len(tokenizer)))
    if component.cls.startswith("CLIP"):
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id) if tokenizer is not None else {}
        return transformers.CLIPTextConfig(**args, **ids)
    if component.cls == "T5EncoderModel":
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   decoder_start_token_id=tokenizer.pad_token_id) if tokenizer is not None else {}
        return transformers.T5Config(**args, **ids)
    if kind in ("qwen", "critic"):
        ids = _vision_token_ids(tokenizer) if tokenizer is not None else {}
        text = dict(args["text_config"])
        if tokenizer is not None:
            text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
            text["pad_token_id"] = text["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            text["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
        rest = {k: v for k, v in args.items() if k != "text_config"}
        cls = transformers.Qwen3VLConfig if kind == "critic" else transformers.Qwen2_5_VLConfig
        return cls(text_config=text, **rest, **ids)
    raise UsageError(f"gcr.archs cannot build {component.cls}.")  # pragma: no cover - data error


def _vision_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def count_params(component: Component, scale: str = FULL) -> int:
    """Parameters the builder makes, counted on the meta device (no memory, no compute)."""
    import torch

    with building("meta", torch.float32):
        model = build_component(component, scale, _tokenizer_for(component.tokenizer))
    return sum(p.numel() for p in model.parameters())


def _tokenizer_for(kind: str | None):
    from gcr.tiny import pipelines as tiny

    if kind == "clip":
        return tiny.clip_tokenizer()
    if kind == "t5":
        return tiny.t5_tokenizer()
    if kind == "qwen":
        return tiny.qwen_tokenizer()
    if kind == "critic":
        return critic_processor(TINY).tokenizer
    return None


def build_pipeline(preset: str, scale: str, device="cpu", dtype=None):
    """A diffusers pipeline of `preset` with random weights at `scale`, built on `device`."""
    import torch

    arch = architecture(preset)
    _check_scale(scale)
    dtype = dtype or torch.float32
    with building(device, dtype):
        models = {}
        tokenizers = {}
        for component in arch.components:
            tok = _tokenizer_for(component.tokenizer)
            models[component.name] = build_component(component, scale, tok)
            tokenizers[component.name] = tok
    return _ASSEMBLE[arch.family](arch, models, tokenizers)


def _tokenizer_name(encoder_name: str) -> str:
    return encoder_name.replace("text_encoder", "tokenizer")


def _assemble_flux(arch, models, tokenizers):
    import diffusers

    # The published scheduler config of FLUX.1 (scheduler/scheduler_config.json).
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    pipe_cls = getattr(diffusers, arch.pipeline_class)
    return pipe_cls(scheduler=scheduler, vae=models["vae"], text_encoder=models["text_encoder"],
                    tokenizer=tokenizers["text_encoder"], text_encoder_2=models["text_encoder_2"],
                    tokenizer_2=tokenizers["text_encoder_2"], transformer=models["transformer"],
                    image_encoder=None, feature_extractor=None)


def _assemble_sd3(arch, models, tokenizers):
    import diffusers

    return diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=models["vae"],
        text_encoder=models["text_encoder"], tokenizer=tokenizers["text_encoder"],
        text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizers["text_encoder_2"],
        text_encoder_3=models["text_encoder_3"], tokenizer_3=tokenizers["text_encoder_3"],
        transformer=models["transformer"])


def _qwen_scheduler():
    import diffusers

    return diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
        shift_terminal=0.02, time_shift_type="exponential", shift=1.0)


def _assemble_qwen_image(arch, models, tokenizers):
    import diffusers

    return diffusers.QwenImagePipeline(scheduler=_qwen_scheduler(), vae=models["vae"],
                                       text_encoder=models["text_encoder"], tokenizer=tokenizers["text_encoder"],
                                       transformer=models["transformer"])


def _assemble_qwen_image_edit(arch, models, tokenizers):
    import diffusers

    from gcr.tiny import pipelines as tiny

    processor = tiny.qwen_processor(tokenizers["text_encoder"])
    # The published processor budget (Qwen2.5-VL preprocessor_config.json): up to 12.8 MP per image.
    processor.image_processor.min_pixels, processor.image_processor.max_pixels = 3136, 12845056
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}
    return diffusers.QwenImageEditPipeline(scheduler=_qwen_scheduler(), vae=models["vae"],
                                           text_encoder=models["text_encoder"], tokenizer=tokenizers["text_encoder"],
                                           processor=processor, transformer=models["transformer"])


def _assemble_sdxl(arch, models, tokenizers):
    import diffusers

    return diffusers.StableDiffusionXLPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
        tokenizer=tokenizers["text_encoder"], tokenizer_2=tokenizers["text_encoder_2"], unet=models["unet"],
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False)


_ASSEMBLE = {
    "flux": _assemble_flux,
    "sd3": _assemble_sd3,
    "qwen-image": _assemble_qwen_image,
    "qwen-image-edit": _assemble_qwen_image_edit,
    "sdxl": _assemble_sdxl,
}


def build_generator(preset: str, scale: str, device: str = "cpu", dtype=None, settings=None):
    """A ready-to-call `DiffusersGenerator` (the product's own class) around a random-weight pipeline."""
    import torch

    from gcr.generate import DiffusersGenerator, GenerationSettings
    from gcr.presets import GENERATOR_PRESETS

    dtype = dtype or torch.float32
    pipe = build_pipeline(preset, scale, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    p = GENERATOR_PRESETS[preset]
    return DiffusersGenerator(pipe, source=f"random-weights:{preset}", preset=p, task=p.task,
                              settings=settings or GenerationSettings(), device=str(device), dtype=dtype,
                              offload="none")


def critic_processor(scale: str):
    """The Qwen3-VL processor with gcr.tiny's code-built tokenizer; at full size, the published image budget."""
    from gcr.tiny.critic import build_critic_processor

    processor = build_critic_processor()
    if scale == FULL:
        image = processor.image_processor
        image.size = dict(CRITIC_IMAGE_SIZE)
        image.min_pixels, image.max_pixels = CRITIC_IMAGE_SIZE["shortest_edge"], CRITIC_IMAGE_SIZE["longest_edge"]
    return processor


def build_critic_model(preset: str, scale: str, device="cpu", dtype=None, processor=None):
    """The critic's Qwen3-VL with random weights. Output rows of tokens the code-built tokenizer cannot
    decode (and of its special tokens) are zeroed: the matrix product costs the same, and greedy decoding
    then picks ordinary text tokens, never end-of-turn, so every critique runs to its token limit."""
    import torch

    component = critic_architecture(preset)
    processor = processor or critic_processor(scale)
    tokenizer = processor.tokenizer
    dtype = dtype or torch.float32
    with building(device, dtype):
        model = build_component(component, scale, tokenizer)
        with torch.no_grad():
            special = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
            special += list(tokenizer.added_tokens_decoder)
            model.lm_head.weight[len(tokenizer):] = 0
            model.lm_head.weight[sorted(set(special))] = 0
    gen = model.generation_config
    gen.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gen.bos_token_id = None
    gen.do_sample = False
    for knob in ("temperature", "top_p", "top_k"):
        setattr(gen, knob, None)
    return model, processor


def build_critic(preset: str, scale: str, device="cpu", dtype=None, *, max_new_tokens: int = 600,
                 min_new_tokens: int | None = None, fast: str = "auto", speculate: int | None = 0,
                 quant: str = "none"):
    """A `TransformersCritic` (the product's own class) around a random-weight Qwen3-VL, its decoder
    weights quantized as `--critic-quant` would (gcr.critics.quant)."""
    from gcr.critics.inprocess import TransformersCritic
    from gcr.critics.quant import quantize_critic
    from gcr.presets import CRITIC_PRESETS

    model, processor = build_critic_model(preset, scale, device, dtype)
    quantized = quantize_critic(model, quant)
    return TransformersCritic(id=preset, source=f"random-weights:{preset}", task=CRITIC_PRESETS[preset].task,
                              model=model, processor=processor, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, fast=fast, speculate=speculate, quant=quantized)


def weight_bytes(preset: str, bytes_per_param: int = 2) -> dict:
    """Weights per component of a generator preset, in bytes (bf16: 2 bytes a parameter)."""
    return {c.name: c.params * bytes_per_param for c in architecture(preset).components}


def critic_weight_bytes(preset: str, bytes_per_param: int = 2) -> int:
    return critic_architecture(preset).params * bytes_per_param
