"""The generator: a frozen diffusers pipeline that turns (prompt, seed[, source image]) into images.

`load_generator` takes a preset name, a local diffusers directory or a hub id, loads it with the real
`from_pretrained` (safetensors only, remote code only when allowed), checks every setting against
the pipeline's own `__call__` signature up front, and returns a `DiffusersGenerator`. Its `generate`
makes ONE batched pipeline call per round with one seeded torch.Generator per image, so an image
depends only on its own prompt and seed, never on what else was in the batch.

torch and diffusers are imported inside functions only: importing this module is free.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from gcr.devices import quiet_diffusers, resolve_device, resolve_dtype
from gcr.errors import GcrError, ModelLoadError, OutOfMemory, UsageError
from gcr.presets import GeneratorPreset, resolve_generator
from gcr.records import EDIT, T2I, GenerationRequest

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

# diffusers' CPU-offload vocabulary, plus "group": layers stream from pinned CPU memory on a side CUDA
# stream, overlapping the copies with compute (far faster than "sequential", nearly as frugal).
OFFLOAD_MODES = ("none", "model", "sequential", "group")

# __call__ parameters that carry the image to edit (Kontext, Qwen-Image-Edit, img2img pipelines...).
SOURCE_IMAGE_ARGS = ("image", "images", "image_reference", "input_image", "reference_image", "ref_image")

# Pipelines whose CFG strength is `true_cfg_scale` (their `guidance_scale` is for guidance-distilled
# variants and does nothing on the released checkpoints).
TRUE_CFG_PIPELINES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")

# Arguments gcr itself sets on every call; a --gen-arg may not override them.
CONTROLLED_ARGS = ("prompt", "generator", "output_type", "return_dict", "num_images_per_prompt",
                   "callback_on_step_end", "latents")


@dataclass(frozen=True)
class GenerationSettings:
    """What the user asked for; None means "the preset's value, else the pipeline's default"."""

    steps: int | None = None          # num_inference_steps
    guidance: float | None = None     # guidance_scale (true_cfg_scale for Qwen-Image)
    width: int | None = None          # output size in pixels
    height: int | None = None
    negative_prompt: str | None = None
    extra: dict = field(default_factory=dict)  # more pipeline __call__ kwargs (--gen-arg key=value)
    # Images per pipeline call. 1 by default: batched float math is not bit-identical to single
    # calls, so a job's images would depend on its neighbours; large DiTs gain little anyway.
    batch: int = 1


# ---------------------------------------------------------------------------------------------
# Loading


def infer_task(pipeline) -> str:
    """EDIT when the pipeline's __call__ takes a source image, else T2I (a class or an instance)."""
    params = _call_params(pipeline)
    return EDIT if any(name in params for name in SOURCE_IMAGE_ARGS) else T2I


def load_generator(
    spec: str,
    *,
    task: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    device: str = "auto",
    dtype: str = "auto",
    allow_remote_code: bool = False,
    offload: str = "none",
    local_files_only: bool | None = None,
) -> "DiffusersGenerator":
    """Load `spec` (preset, local directory or hub id) as a ready-to-call generator."""
    # 1. Check the cheap things before touching any weights (or importing torch).
    preset, source, is_local = resolve_generator(spec)
    if is_local and not (Path(source) / "model_index.json").is_file():
        from gcr.modelspec import generator_task

        raise UsageError(_sentence(generator_task(spec)[1]))  # like a missing directory: exit 2
    if offload not in OFFLOAD_MODES:
        raise UsageError(f"Unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}.")
    if task is not None and task not in (T2I, EDIT):
        raise UsageError(f"Unknown task {task!r}; expected {T2I!r} or {EDIT!r}.")
    resolved_device = resolve_device(device)
    if offload != "none" and not resolved_device.startswith("cuda"):
        raise UsageError(f"--offload {offload} moves weights between CPU and GPU, so it needs a CUDA device.")
    torch_dtype = resolve_dtype(dtype, resolved_device)

    # 2. Load on CPU.
    pipe = _from_pretrained(preset, source, torch_dtype, allow_remote_code, local_files_only)

    # 3. Check the task and every setting against the pipeline, still before any GPU work.
    found_task = infer_task(pipe)
    if task is not None and task != found_task:
        kind = "an edit" if found_task == EDIT else "a text-to-image"
        raise UsageError(f"{spec} is {kind} model but the run needs {task}; pick a generator for {task}.")
    generator = DiffusersGenerator(
        pipe, source=source, preset=preset, task=found_task, settings=settings,
        device=resolved_device, dtype=torch_dtype, offload=offload,
    )

    # 4. Place the weights.
    _place(pipe, resolved_device, offload, generator.id)
    pipe.set_progress_bar_config(disable=True)
    return generator


def _from_pretrained(preset: GeneratorPreset | None, source: str, torch_dtype, allow_remote_code: bool,
                     local_files_only: bool | None):
    import diffusers

    # A preset names its class: a checkpoint's model_index.json may name a sibling pipeline.
    cls = getattr(diffusers, preset.pipeline_class) if preset else diffusers.DiffusionPipeline
    # diffusers 0.42 renamed torch_dtype to dtype (torch_dtype still works there, with a warning).
    major_minor = tuple(int(part) for part in re.findall(r"\d+", diffusers.__version__)[:2])
    dtype_kw = "dtype" if major_minor >= (0, 42) else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_kw: torch_dtype, "use_safetensors": True,
                              "trust_remote_code": allow_remote_code}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        with quiet_diffusers():
            return cls.from_pretrained(source, **kwargs)
    except Exception as exc:  # any failure here means "this checkpoint could not be loaded"
        raise ModelLoadError(_load_failure(source, exc)) from exc


def _load_failure(source: str, exc: Exception) -> str:
    from gcr.modelspec import hub_access_problem

    text = str(exc)
    lowered = text.lower()
    access = hub_access_problem("generator", source, exc)
    if access:
        return access
    if "cached" in lowered and ("offline" in lowered or "outgoing traffic" in lowered or "connect" in lowered):
        return (f"{source} is not in the local Hugging Face cache and the hub cannot be reached; "
                "go online once to download it, or pass a local directory.")
    if "safetensors" in lowered:
        return (f"{source} has no safetensors weights for every component, and gcr loads only safetensors "
                "(pickle .bin files can run code); use a checkpoint that ships .safetensors.")
    if "trust_remote_code" in lowered or "custom code" in lowered:
        return f"{source} needs its own Python code to load; pass --allow-remote-code if you trust it."
    reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"Could not load the generator {source}: {reason.rstrip('.')}."


def _place(pipe, device: str, offload: str, name: str) -> None:
    try:
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        elif offload == "group":
            import torch

            pipe.enable_group_offload(onload_device=torch.device(device), offload_type="leaf_level",
                                      use_stream=True)
        else:
            pipe.to(device)
    except RuntimeError as exc:
        if _is_oom(exc):
            raise OutOfMemory(_oom_message(name, "loading", offload)) from exc
        raise


def _is_oom(exc: BaseException) -> bool:
    """The caching allocator raises OutOfMemoryError; cuBLAS/cuDNN workspaces fail as "CUDA error: out of memory"."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _oom_message(name: str, doing: str, offload: str) -> str:
    if offload in ("sequential", "group"):
        fix = "use a smaller size or fewer seeds"
    elif offload == "model":
        fix = "try --offload group (or sequential), a smaller size or fewer seeds"
    else:
        fix = "try --offload model (or --offload sequential)"
    return f"CUDA ran out of memory while {doing} {name}; {fix}."


def size_multiple(pipe) -> int:
    """What width and height must be multiples of for this pipeline: its VAE's scale factor times the
    latent patch size (Flux and Qwen-Image pack 2x2 latent patches; SD3 names its patch size)."""
    vae_scale = getattr(pipe, "vae_scale_factor", None) or 1
    patch = getattr(pipe, "patch_size", None)
    if not isinstance(patch, int):
        patch = 2 if hasattr(type(pipe), "_pack_latents") else 1
    return int(vae_scale) * patch


def _sentence(fragment: str) -> str:
    return fragment[:1].upper() + fragment[1:].rstrip(".") + "."


def _call_params(pipeline) -> dict:
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    return dict(inspect.signature(cls.__call__).parameters)


# ---------------------------------------------------------------------------------------------
# The generator


class DiffusersGenerator:
    """A loaded diffusers pipeline plus the resolved, validated arguments for every call."""

    def __init__(self, pipe, *, source: str, preset: GeneratorPreset | None, task: str,
                 settings: GenerationSettings, device: str, dtype, offload: str):
        self.pipe = pipe
        self.source = source
        self.preset = preset
        self.task = task
        self.device = device
        self.dtype = dtype
        self.offload = offload
        self.id = preset.name if preset else source
        self._params = _call_params(pipe)
        self.requested = settings
        self._call_kwargs, self.settings = self._resolve(settings)

    def with_settings(self, settings: GenerationSettings) -> "DiffusersGenerator":
        """The same loaded pipeline under other settings (batch jobs): validated, never reloaded."""
        if settings == self.requested:
            return self
        return DiffusersGenerator(self.pipe, source=self.source, preset=self.preset, task=self.task,
                                  settings=settings, device=self.device, dtype=self.dtype, offload=self.offload)

    # -- settings -------------------------------------------------------------------------------

    def _default(self, name: str):
        param = self._params.get(name)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    def _resolve(self, s: GenerationSettings) -> tuple[dict, dict]:
        """Settings -> (kwargs for every pipeline call, resolved settings for provenance)."""
        p = self.preset
        params = self._params
        pipeline_name = type(self.pipe).__name__
        guidance_arg = p.guidance_arg if p else (
            "true_cfg_scale" if pipeline_name in TRUE_CFG_PIPELINES else "guidance_scale")
        managed = {"num_inference_steps": "steps", guidance_arg: "guidance", "width": "width",
                   "height": "height", "negative_prompt": "negative_prompt"}

        # 1. Extra kwargs: preset defaults, overridden by the user's; every key must be a real argument.
        extra = {**(p.extra if p else {}), **s.extra}
        # What a user can sensibly pass from the command line (no tensors, callbacks or private flags).
        valid = sorted(k for k in params if k not in ("self", "kwargs") and k not in CONTROLLED_ARGS
                       and k not in managed and k not in SOURCE_IMAGE_ARGS and not k.startswith(("_", "callback"))
                       and not k.endswith(("_embeds", "_embeds_mask")))
        for key in extra:
            if key in managed:
                raise UsageError(f"Set {key} with the {managed[key]} setting (--{managed[key].replace('_', '-')}), "
                                 "not as an extra generator argument.")
            if key in CONTROLLED_ARGS or key in SOURCE_IMAGE_ARGS:
                raise UsageError(f"gcr sets the {key} argument of {pipeline_name} itself; drop it.")
            if key not in params:
                raise UsageError(f"{pipeline_name} has no argument {key!r}; valid extra arguments are "
                                 f"{', '.join(valid)}.")

        # 2. The named settings: user value, else preset value, else the pipeline's own default.
        steps = _first(s.steps, p.steps if p else None, self._default("num_inference_steps"))
        guidance = _first(s.guidance, p.guidance if p else None, self._default(guidance_arg))
        width = _first(s.width, p.width if p else None)
        height = _first(s.height, p.height if p else None)
        for name, value in (("steps", steps), ("width", width), ("height", height)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive whole number, got {value!r}.")
        # A size the pipeline would round down without a word (--width 63 -> 48) is refused instead.
        from gcr.modelspec import size_problem

        multiple = size_multiple(self.pipe)
        for name, value in (("--width", s.width), ("--height", s.height)):
            problem = size_problem(name, value, multiple, pipeline_name)
            if problem:
                raise UsageError(f"{problem}.")
        if s.guidance is not None and guidance_arg not in params:
            raise UsageError(f"{pipeline_name} takes no guidance value; drop --guidance.")

        # 3. Negative prompt: only where the model would actually use it.
        negative = s.negative_prompt
        true_cfg = _number(guidance if guidance_arg == "true_cfg_scale" else extra.get(
            "true_cfg_scale", self._default("true_cfg_scale")))
        if negative is not None:
            if "negative_prompt" not in params:
                raise UsageError(f"{pipeline_name} does not take a negative prompt; drop --negative-prompt.")
            if "true_cfg_scale" in params and not (true_cfg is not None and true_cfg > 1):
                raise UsageError(f"{self.id} ignores negative prompts unless true_cfg_scale > 1; drop "
                                 "--negative-prompt or add --gen-arg true_cfg_scale=4.")
        elif guidance_arg == "true_cfg_scale" and true_cfg is not None and true_cfg > 1:
            # True CFG silently switches off without a negative prompt; the model cards use " ".
            negative = " "

        kwargs: dict[str, Any] = dict(extra)
        for name, value in (("num_inference_steps", steps), (guidance_arg, guidance), ("width", width),
                            ("height", height)):
            if value is not None and name in params:
                kwargs[name] = value
        if "num_images_per_prompt" in params:
            kwargs["num_images_per_prompt"] = 1
        if width is not None and height is not None and "_auto_resize" in params:
            # Flux Kontext would otherwise snap the size to its preferred ~1 MP resolutions.
            kwargs["_auto_resize"] = False
            if "max_area" in params:
                kwargs["max_area"] = width * height

        resolved = {"steps": steps, "guidance": guidance, "guidance_arg": guidance_arg, "width": width,
                    "height": height, "negative_prompt": negative, "extra": extra}
        self._negative = negative
        return kwargs, resolved

    # -- generation -----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list["PIL.Image.Image"]:
        """One batched pipeline call; image i depends only on requests[i] (its prompt, seed, source)."""
        import torch

        if not requests:
            return []
        per_call = max(1, self.requested.batch)
        if len(requests) > per_call:
            return [image for i in range(0, len(requests), per_call)
                    for image in self.generate(requests[i:i + per_call])]
        n = len(requests)
        kwargs = dict(self._call_kwargs)

        # 1. Source images: required for edit models, refused by text-to-image ones.
        sources = [r.source_image for r in requests]
        if self.task == EDIT:
            if any(img is None for img in sources):
                raise UsageError(f"{self.id} edits images, so every request needs a source image (--image).")
            kwargs.update(self._prepare_sources(sources))
        elif any(img is not None for img in sources):
            raise UsageError(f"{self.id} is a text-to-image model and cannot take a source image; "
                             "use an edit generator such as flux-kontext.")
        if self._negative is not None:
            kwargs["negative_prompt"] = [self._negative] * n

        # 2. One CPU generator per seed: the same seed gives the same starting noise on any device.
        generators = [torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in requests]

        # 3. The call.
        try:
            with torch.inference_mode(), quiet_diffusers():
                out = self.pipe(prompt=[r.prompt for r in requests], generator=generators,
                                output_type="pil", return_dict=True, **kwargs)
        except RuntimeError as exc:
            if _is_oom(exc):
                raise OutOfMemory(_oom_message(self.id, "generating with", self.offload)) from exc
            raise
        except ValueError as exc:  # diffusers checks its inputs with ValueError: a settings problem
            reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else "invalid input"
            raise UsageError(f"{type(self.pipe).__name__} rejected the settings: {reason}.") from exc
        images = list(out.images)
        if len(images) != n:  # a pipeline that ignores batching would silently misalign seeds
            raise GcrError(f"{self.id} returned {len(images)} images for {n} prompts; it does not batch.")
        return images

    def _prepare_sources(self, sources: list) -> dict:
        """Source images as the pipeline wants them: RGB, one common size; returns the call kwargs."""
        images = [img.convert("RGB") for img in sources]
        width, height = self.settings["width"], self.settings["height"]
        extra: dict[str, Any] = {}
        if width is not None and height is not None:
            # Edit at the requested size (pipelines read the size of the first image for the batch).
            size = (width, height)
        else:
            size = images[0].size
            kontext = _kontext_size(images[0].size) if "_auto_resize" in self._params else None
            if kontext is not None:
                # Kontext's output defaults to 1024x1024 whatever the source; follow the source's shape.
                extra.update(width=kontext[0], height=kontext[1], max_area=kontext[0] * kontext[1])
        images = [img if img.size == size else img.resize(size, _lanczos()) for img in images]
        arg = next(name for name in SOURCE_IMAGE_ARGS if name in self._params)
        return {arg: images, **extra}

    # -- provenance -----------------------------------------------------------------------------

    def describe(self) -> dict:
        """Where the generator came from and how it runs, for the run record."""
        return {
            "id": self.id,
            "source": self.source,
            "preset": self.preset.name if self.preset else None,
            "pipeline": type(self.pipe).__name__,
            "task": self.task,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "offload": self.offload,
            "settings": dict(self.settings),
        }


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first(*values):
    return next((v for v in values if v is not None), None)


def _lanczos():
    from PIL import Image

    return Image.Resampling.LANCZOS


def _kontext_size(size: tuple[int, int]) -> tuple[int, int] | None:
    """Kontext's trained resolution closest to the source's aspect ratio (what its auto-resize picks)."""
    try:
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
    except ImportError:  # pragma: no cover - older diffusers: let the pipeline decide
        return None
    aspect = size[0] / size[1]
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h
