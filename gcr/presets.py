"""Named generators and critics, as plain data.

A preset is a hub id plus the sampling defaults its model card recommends, so `--generator flux-dev`
does the right thing without the user knowing that Qwen-Image calls its guidance `true_cfg_scale`.
Anything else the user types is a local diffusers directory or a hub id, loaded as-is with the
pipeline's own defaults. Nothing here imports torch: `gcr --help` and `gcr models` stay instant.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from gcr.errors import UsageError
from gcr.records import EDIT, T2I


@dataclass(frozen=True)
class GeneratorPreset:
    """A diffusers checkpoint and the defaults its model card recommends."""

    name: str                   # what users type: --generator flux-dev
    hub_id: str                 # where from_pretrained finds it
    task: str                   # T2I or EDIT (EDIT pipelines take a source image)
    steps: int                  # num_inference_steps
    guidance: float             # value for `guidance_arg`
    width: int | None           # None: follow the source image (edit) / the pipeline default
    height: int | None
    pipeline_class: str         # diffusers class to load with (model_index.json could name a sibling)
    description: str
    negative_prompt_supported: bool  # False: the model ignores negative prompts (guidance-distilled)
    guidance_arg: str = "guidance_scale"  # the __call__ argument `guidance` goes to
    extra: dict = field(default_factory=dict)  # further __call__ defaults, e.g. max_sequence_length
    # Width and height must be multiples of this (VAE scale factor x patch size); the pipeline would
    # otherwise round them down silently. Checked before loading (gcr.modelspec).
    size_multiple: int = 16
    gated: bool = False         # the hub wants its licence accepted and a login before downloading


@dataclass(frozen=True)
class CriticPreset:
    """A RationalRewards critic checkpoint (a Qwen3-VL-8B fine-tune) for one task."""

    name: str
    hub_id: str
    task: str
    description: str


GENERATOR_PRESETS: dict[str, GeneratorPreset] = {
    p.name: p
    for p in (
        GeneratorPreset(
            name="flux-dev",
            hub_id="black-forest-labs/FLUX.1-dev",
            task=T2I,
            steps=28,  # the card shows 50; 28 (the pipeline default) is near-identical at half the cost
            guidance=3.5,
            width=1024,
            height=1024,
            pipeline_class="FluxPipeline",
            description="FLUX.1 [dev], 12B guidance-distilled text-to-image",
            negative_prompt_supported=False,
            extra={"max_sequence_length": 512},
            gated=True,
        ),
        GeneratorPreset(
            name="flux-schnell",
            hub_id="black-forest-labs/FLUX.1-schnell",
            task=T2I,
            steps=4,
            guidance=0.0,
            width=1024,
            height=1024,
            pipeline_class="FluxPipeline",
            description="FLUX.1 [schnell], 12B timestep-distilled, 4 steps",
            negative_prompt_supported=False,
            extra={"max_sequence_length": 256},
            gated=True,  # since July 2025, like FLUX.1-dev
        ),
        GeneratorPreset(
            name="flux-kontext",
            hub_id="black-forest-labs/FLUX.1-Kontext-dev",
            task=EDIT,
            steps=28,
            guidance=2.5,
            width=None,
            height=None,
            pipeline_class="FluxKontextPipeline",
            description="FLUX.1 Kontext [dev], 12B instruction-based image editing",
            negative_prompt_supported=False,
            gated=True,
        ),
        GeneratorPreset(
            name="sd3.5-medium",
            hub_id="stabilityai/stable-diffusion-3.5-medium",
            task=T2I,
            steps=40,
            guidance=4.5,
            width=1024,
            height=1024,
            pipeline_class="StableDiffusion3Pipeline",
            description="Stable Diffusion 3.5 Medium, 2.5B MMDiT-X text-to-image",
            negative_prompt_supported=True,
            gated=True,
        ),
        GeneratorPreset(
            name="sd3.5-large",
            hub_id="stabilityai/stable-diffusion-3.5-large",
            task=T2I,
            steps=28,
            guidance=3.5,
            width=1024,
            height=1024,
            pipeline_class="StableDiffusion3Pipeline",
            description="Stable Diffusion 3.5 Large, 8B MMDiT text-to-image",
            negative_prompt_supported=True,
            gated=True,
        ),
        GeneratorPreset(
            name="qwen-image",
            hub_id="Qwen/Qwen-Image",
            task=T2I,
            steps=50,
            guidance=4.0,
            width=1328,
            height=1328,
            pipeline_class="QwenImagePipeline",
            description="Qwen-Image, 20B MMDiT text-to-image (strong at rendering text)",
            negative_prompt_supported=True,
            guidance_arg="true_cfg_scale",
        ),
        GeneratorPreset(
            name="qwen-image-edit",
            hub_id="Qwen/Qwen-Image-Edit",
            task=EDIT,
            steps=50,
            guidance=4.0,
            width=None,
            height=None,
            pipeline_class="QwenImageEditPipeline",
            description="Qwen-Image-Edit, 20B image editing",
            negative_prompt_supported=True,
            guidance_arg="true_cfg_scale",
        ),
        GeneratorPreset(
            name="sdxl",
            hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            task=T2I,
            steps=40,
            guidance=5.0,
            width=1024,
            height=1024,
            pipeline_class="StableDiffusionXLPipeline",
            description="Stable Diffusion XL base 1.0, 3.5B UNet text-to-image",
            negative_prompt_supported=True,
            size_multiple=8,  # a UNet: the VAE's factor alone
        ),
    )
}

CRITIC_PRESETS: dict[str, CriticPreset] = {
    p.name: p
    for p in (
        CriticPreset(
            name="rationalrewards-t2i",
            hub_id="TIGER-Lab/RationalRewards-8B-T2I",
            task=T2I,
            description="RationalRewards 8B critic for text-to-image",
        ),
        CriticPreset(
            name="rationalrewards-edit",
            hub_id="TIGER-Lab/RationalRewards-8B-Edit",
            task=EDIT,
            description="RationalRewards 8B critic for image editing",
        ),
    )
}

@dataclass(frozen=True)
class JudgePreset:
    """A CLIP-family checkpoint for the independent judge (gcr.judge) and the formula it scores with."""

    name: str
    hub_id: str                 # the model's weights
    metric: str                 # "clipscore" or "pickscore" (gcr.judge.METRICS)
    description: str
    processor: str | None = None  # where the processor comes from, when the weights' repo has none


JUDGE_PRESETS: dict[str, JudgePreset] = {
    p.name: p
    for p in (
        # The CLIP of Hessel et al. (2021), who defined CLIPScore with ViT-B/32.
        JudgePreset(name="clipscore", hub_id="openai/clip-vit-base-patch32", metric="clipscore",
                    description="CLIPScore (Hessel et al. 2021) with OpenAI CLIP ViT-B/32"),
        # The model card loads the processor of the CLIP-H it was fine-tuned from.
        JudgePreset(name="pickscore", hub_id="yuvalkirstain/PickScore_v1", metric="pickscore",
                    processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                    description="PickScore v1 (Kirstain et al. 2023), a CLIP-H fine-tuned on human preferences"),
    )
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_critic_for(task: str) -> CriticPreset:
    """The RationalRewards critic trained for `task`."""
    for preset in CRITIC_PRESETS.values():
        if preset.task == task:
            return preset
    raise UsageError(f"Unknown task {task!r}; expected {T2I!r} or {EDIT!r}.")


def resolve_generator(spec: str) -> tuple[GeneratorPreset | None, str, bool]:
    """`spec` -> (preset or None, what to pass to from_pretrained, whether it is a local directory)."""
    return _resolve(spec, GENERATOR_PRESETS, "generator")


def resolve_critic(spec: str) -> tuple[CriticPreset | None, str, bool]:
    """Same rules as resolve_generator, for critics."""
    return _resolve(spec, CRITIC_PRESETS, "critic")


def resolve_judge(spec: str) -> tuple[JudgePreset | None, str, bool]:
    """Same rules as resolve_generator, for judges (the `metric:` prefix is gcr.judge's to strip)."""
    return _resolve(spec, JUDGE_PRESETS, "judge")


def _resolve(spec: str, presets: dict, kind: str):
    # 1. A preset name.
    if spec in presets:
        return presets[spec], presets[spec].hub_id, False
    # 2. An existing local directory (checked before hub ids: "models/x" may be either).
    path = Path(spec).expanduser()
    if path.is_dir():
        return None, str(path), True
    if path.exists():
        raise UsageError(f"The {kind} path {spec} is a file; pass a diffusers model directory or a preset name.")
    # 3. A hub id "org/name", unless it is written like a path.
    if _HUB_ID.match(spec) and not _looks_like_path(spec):
        by_hub_id = next((p for p in presets.values() if p.hub_id == spec), None)
        return by_hub_id, spec, False
    if _looks_like_path(spec):
        raise UsageError(f"The {kind} directory {spec} does not exist; check the path or use a preset name.")
    close = difflib.get_close_matches(spec, list(presets), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(
        f"Unknown {kind} preset {spec!r}; {hint}valid presets are {', '.join(presets)} "
        "(or pass a local directory or a hub id like org/name)."
    )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~", "\\")) or "\\" in spec or spec.count("/") > 1
