"""Where the two models live: a memory plan chosen from the free GPU memory and the models' sizes.

FLUX.1-Kontext (~34 GB in bf16 with T5) and the critic (~17.5 GB) fit together on an 80 GB card, not
on smaller ones. The plans, fastest first; `choose_plan` takes the first whose estimated peak fits:

    resident       both models on the GPU all the time
    offload-model  generator components move to the GPU one at a time (diffusers model offload);
                   the critic stays resident
    swap           one model on the GPU at a time: the generator while it generates, the critic while
                   it critiques (each moved whole between CPU and GPU around its calls)
    offload-group  generator weights stream layer by layer from pinned CPU memory on a side CUDA
                   stream (diffusers group offload); the critic stays resident
    critic-cpu     the critic does not fit at all: it runs on the CPU (slow; a served critic,
                   --critic-url, is the better answer), the generator streams as in offload-group

Sizes are parameter counts x bytes per parameter (published counts for presets, `gcr.archs`) plus
activation headroom per model; the headroom constants were read off `gcr bench` peaks on an H100.
When a round still runs out of memory, `more_conservative` names the next plan down for one retry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from gcr.errors import UsageError

GiB = 1024**3

RESIDENT = "resident"
OFFLOAD_MODEL = "offload-model"
SWAP = "swap"
OFFLOAD_GROUP = "offload-group"
CRITIC_CPU = "critic-cpu"
# Fastest and most GPU memory first; `more_conservative` walks down this list.
LADDER = (RESIDENT, OFFLOAD_MODEL, SWAP, OFFLOAD_GROUP, CRITIC_CPU)
MEMORY_CHOICES = ("auto",) + LADDER

# Headroom on top of the weights (bytes). Generator: denoiser activations plus the VAE decode at 1 MP
# per image; it grows with pixels x images. Critic: vision encoder + prefill activations, plus the KV
# cache per sequence (147 kB per token for Qwen3-VL-8B: 36 layers x 2 x 8 heads x 128 x 2 bytes).
RESERVE = int(1.5 * GiB)              # CUDA context of the libraries, allocator slack, cuBLAS workspaces
GENERATOR_BASE = 1 * GiB
GENERATOR_PER_MEGAPIXEL = 2 * GiB
GROUP_OFFLOAD_WORKING_SET = 2 * GiB   # the layers in flight (current + prefetched) under group offload
CRITIC_BASE = int(1.5 * GiB)
KV_BYTES_PER_TOKEN = 36 * 2 * 8 * 128 * 2


@dataclass(frozen=True)
class Footprint:
    """What one model needs on the GPU, in bytes."""

    weights: int        # every weight
    largest: int        # the largest single component (what model offload holds at once)
    activations: int    # peak working memory on top of the resident weights


@dataclass(frozen=True)
class MemoryPlan:
    """Where each model lives. The runner loads with these settings, then calls `apply_plan`."""

    name: str                    # one of LADDER
    generator_offload: str       # load_generator(offload=...): none | model | group
    critic_device: str           # "gpu" or "cpu": where the critic lives between calls
    swap: bool                   # models move whole between CPU and GPU around their calls
    free_bytes: int              # the GPU memory the plan was chosen for
    need_bytes: int              # the plan's estimated peak
    reason: str                  # one sentence, printed before the run
    critic_in_process: bool = True

    @property
    def critic_load_device(self) -> str | None:
        """Where load_critic should put the critic: None = the run's device."""
        return "cpu" if self.critic_device == "cpu" or self.swap else None

    @property
    def critic_load_dtype(self) -> str | None:
        """bf16 also on the CPU: it moves to the GPU (swap) or would need 35 GB of RAM in fp32."""
        return "bf16" if self.critic_load_device == "cpu" else None

    def describe(self) -> str:
        return (f"memory plan {self.name}: {self.reason} (needs ~{self.need_bytes / GiB:.1f} GB of "
                f"{self.free_bytes / GiB:.1f} GB free)")

    def to_dict(self) -> dict:
        return {**asdict(self), "critic_load_device": self.critic_load_device}


# ---------------------------------------------------------------------------------------------
# Footprints


def generator_footprint(preset: str, width: int = 1024, height: int = 1024, images: int = 1,
                        bytes_per_param: int = 2) -> Footprint:
    """A generator preset's footprint from its published architecture (`gcr.archs`)."""
    from gcr.archs import weight_bytes

    parts = weight_bytes(preset, bytes_per_param)
    return Footprint(weights=sum(parts.values()), largest=max(parts.values()),
                     activations=generator_activations(width, height, images))


def generator_activations(width: int, height: int, images: int = 1) -> int:
    megapixels = (width or 1024) * (height or 1024) / 1e6
    return int(GENERATOR_BASE + GENERATOR_PER_MEGAPIXEL * megapixels * max(1, images))


def critic_footprint(preset: str = "rationalrewards-edit", batch: int = 1, prompt_tokens: int = 2800,
                     max_new_tokens: int = 2048, bytes_per_param: int = 2) -> Footprint:
    """The critic's footprint: weights plus prefill activations and the KV cache of `batch` critiques."""
    from gcr.archs import critic_weight_bytes

    weights = critic_weight_bytes(preset, bytes_per_param)
    kv = KV_BYTES_PER_TOKEN * (prompt_tokens + max_new_tokens) * max(1, batch)
    return Footprint(weights=weights, largest=weights, activations=int(CRITIC_BASE + kv))


def pipeline_footprint(pipe, width: int = 1024, height: int = 1024, images: int = 1) -> Footprint:
    """The footprint of a loaded pipeline (any checkpoint, not only presets), from its parameters."""
    sizes = [sum(p.numel() * p.element_size() for p in module.parameters())
             for module in pipe.components.values() if hasattr(module, "parameters")]
    return Footprint(weights=sum(sizes), largest=max(sizes, default=0),
                     activations=generator_activations(width, height, images))


def model_footprint(model, batch: int = 1, prompt_tokens: int = 2800, max_new_tokens: int = 2048) -> Footprint:
    """The footprint of a loaded critic model."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = KV_BYTES_PER_TOKEN * (prompt_tokens + max_new_tokens) * max(1, batch)
    return Footprint(weights=weights, largest=weights, activations=int(CRITIC_BASE + kv))


# ---------------------------------------------------------------------------------------------
# Choosing


def plan_needs(name: str, generator: Footprint, critic: Footprint | None) -> int:
    """Estimated peak GPU bytes of plan `name` (the larger of the generate and the critique phase)."""
    c_w = critic.weights if critic else 0
    c_act = critic.activations if critic else 0
    g = generator
    if name == RESIDENT:
        phases = (g.weights + c_w + g.activations, g.weights + c_w + c_act)
    elif name == OFFLOAD_MODEL:
        phases = (g.largest + c_w + g.activations, c_w + c_act)
    elif name == SWAP:
        phases = (g.weights + g.activations, c_w + c_act)
    elif name == OFFLOAD_GROUP:
        phases = (GROUP_OFFLOAD_WORKING_SET + c_w + g.activations, c_w + c_act)
    elif name == CRITIC_CPU:
        phases = (GROUP_OFFLOAD_WORKING_SET + g.activations,)
    else:
        raise UsageError(f"Unknown memory plan {name!r}; expected one of {', '.join(MEMORY_CHOICES)}.")
    return RESERVE + max(phases)


_REASONS = {
    RESIDENT: "both models stay on the GPU",
    OFFLOAD_MODEL: "the generator's components move to the GPU one at a time; the critic stays resident",
    SWAP: "one model on the GPU at a time, moved between CPU and GPU around its calls",
    OFFLOAD_GROUP: "the generator streams layer by layer from pinned CPU memory; the critic stays resident",
    CRITIC_CPU: ("the critic does not fit on this GPU and runs on the CPU (slow: serve it elsewhere with "
                 "--critic-url); the generator streams layer by layer"),
}
_OFFLOAD = {RESIDENT: "none", OFFLOAD_MODEL: "model", SWAP: "none", OFFLOAD_GROUP: "group", CRITIC_CPU: "group"}


def make_plan(name: str, free_bytes: int, generator: Footprint, critic: Footprint | None) -> MemoryPlan:
    """Plan `name`, whether or not it is estimated to fit."""
    need = plan_needs(name, generator, critic)
    in_process = critic is not None
    if not in_process and name in (SWAP, CRITIC_CPU):
        name = OFFLOAD_GROUP if name == CRITIC_CPU else OFFLOAD_MODEL
        need = plan_needs(name, generator, None)
    reason = _REASONS[name] if in_process else _REASONS[name].split(";")[0] + " (the critic is served)"
    return MemoryPlan(name=name, generator_offload=_OFFLOAD[name],
                      critic_device="cpu" if name == CRITIC_CPU else "gpu", swap=name == SWAP,
                      free_bytes=int(free_bytes), need_bytes=need, reason=reason, critic_in_process=in_process)


def choose_plan(free_bytes: int, generator: Footprint, critic: Footprint | None,
                requested: str = "auto") -> MemoryPlan:
    """The fastest plan whose estimated peak fits in `free_bytes` (or the one `requested`).

    `critic=None` means the critic runs elsewhere (a server): only the generator is placed.
    """
    if requested not in MEMORY_CHOICES:
        raise UsageError(f"--memory must be one of {', '.join(MEMORY_CHOICES)}, not {requested!r}.")
    if requested != "auto":
        return make_plan(requested, free_bytes, generator, critic)
    ladder = LADDER if critic is not None else (RESIDENT, OFFLOAD_MODEL, OFFLOAD_GROUP)
    for name in ladder:
        plan = make_plan(name, free_bytes, generator, critic)
        if plan.need_bytes <= free_bytes:
            return plan
    smallest = make_plan(ladder[-1], free_bytes, generator, critic)
    raise UsageError(f"The GPU has {free_bytes / GiB:.1f} GB free but gcr needs about "
                     f"{smallest.need_bytes / GiB:.1f} GB even when streaming the generator: free the GPU, "
                     "or run on the CPU with --device cpu.")


def more_conservative(plan: MemoryPlan) -> MemoryPlan | None:
    """The next plan down the ladder (less GPU memory, slower) for one retry after running out of
    memory; None when there is nothing left to give up."""
    from dataclasses import replace

    names = LADDER if plan.critic_in_process else (RESIDENT, OFFLOAD_MODEL, OFFLOAD_GROUP)
    if plan.name not in names or plan.name == names[-1]:
        return None
    nothing = Footprint(0, 0, 0)
    following = make_plan(names[names.index(plan.name) + 1], plan.free_bytes, nothing,
                          nothing if plan.critic_in_process else None)
    # The estimate was wrong once already: the retry plan states no size of its own.
    return replace(following, need_bytes=0,
                   reason=f"{following.reason} (retry after running out of memory under {plan.name})")


def free_gpu_bytes(device: str = "cuda") -> int:
    """Free memory on `device` as the driver reports it, capped by this process's memory fraction."""
    import torch

    index = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    cap = int(total * fraction(index)) if fraction else total
    used = torch.cuda.memory_reserved(index)
    return max(0, min(free, cap - used))


# ---------------------------------------------------------------------------------------------
# Applying


def apply_plan(plan: MemoryPlan, generator, critic, device: str = "cuda"):
    """Put the generator and an in-process critic where `plan` says; returns (generator, critic), wrapped
    for swapping when the plan swaps. Works from any current placement, so the same call applies the
    first plan and a more conservative one after running out of memory."""
    generator = getattr(generator, "_swap_inner", generator)
    critic = getattr(critic, "_swap_inner", critic)
    pipe = getattr(generator, "pipe", None)
    critic_model = getattr(critic, "model", None) if plan.critic_in_process else None

    # 1. The critic first: moving it off the GPU makes room for the generator.
    if critic_model is not None:
        target = "cpu" if plan.critic_device == "cpu" or plan.swap else device
        _move_critic(critic, target)
    # 2. The generator: change its offload mode only when it differs.
    if pipe is not None and getattr(generator, "offload", "none") != plan.generator_offload:
        _replace_offload(generator, plan.generator_offload, device)
    elif pipe is not None and plan.swap:
        pipe.to(device)
    free_gpu_cache()
    if plan.swap and critic_model is not None and pipe is not None:
        slot = _SwapSlot(generator, critic, device)
        return SwappingGenerator(generator, slot), SwappingCritic(critic, slot)
    return generator, critic


def _move_critic(critic, target: str) -> None:
    model = critic.model
    if str(model.device).split(":")[0] == target.split(":")[0]:
        return
    fast = getattr(critic, "fast", None)
    if fast is not None:
        fast.reset()  # its CUDA graphs hold the old weight addresses
    model.to(target)
    free_gpu_cache()


def _replace_offload(generator, offload: str, device: str) -> None:
    from gcr.generate import _place

    pipe = generator.pipe
    if getattr(generator, "offload", "none") in ("model", "sequential"):
        pipe.remove_all_hooks()
    pipe.to("cpu")
    free_gpu_cache()
    _place(pipe, device, offload, generator.id)
    generator.offload = offload


def free_gpu_cache() -> None:
    """Return freed tensors' memory to the driver (after dropping or moving a model)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


class _SwapSlot:
    """Which of the two models is on the GPU; moves them so the one about to run is."""

    def __init__(self, generator, critic, device: str):
        self.generator, self.critic, self.device = generator, critic, device
        self.on_gpu = "generator" if _on_gpu(generator.pipe) else "critic" if _on_gpu(critic.model) else None
        self.moves = 0

    def use(self, which: str) -> None:
        if self.on_gpu == which:
            return
        if which == "generator":
            _move_critic(self.critic, "cpu")
            self.generator.pipe.to(self.device)
        else:
            self.generator.pipe.to("cpu")
            free_gpu_cache()
            _move_critic(self.critic, self.device)
        self.on_gpu = which
        self.moves += 1


def _on_gpu(module) -> bool:
    try:
        return str(module.device).startswith("cuda")
    except AttributeError:
        return False


class SwappingGenerator:
    """The generator, moved onto the GPU (and the critic off it) before each call."""

    def __init__(self, inner, slot: _SwapSlot):
        self._swap_inner, self._slot = inner, slot

    def __getattr__(self, name):
        return getattr(self._swap_inner, name)

    def generate(self, requests):
        self._slot.use("generator")
        return self._swap_inner.generate(requests)

    def with_settings(self, settings):
        inner = self._swap_inner.with_settings(settings)
        if inner is self._swap_inner:
            return self
        self._slot.generator = inner
        return SwappingGenerator(inner, self._slot)


class SwappingCritic:
    """The critic, moved onto the GPU (and the generator off it) before each call."""

    def __init__(self, inner, slot: _SwapSlot):
        self._swap_inner, self._slot = inner, slot

    def __getattr__(self, name):
        return getattr(self._swap_inner, name)

    def critique(self, requests, retry: bool = False):
        self._slot.use("critic")
        return self._swap_inner.critique(requests, retry=retry)
