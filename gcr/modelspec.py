"""What can be known about the models before loading anything, and the checks that follow from it.

A model spec is a preset name, a local directory or a hub id. Without importing torch (or reading a
weight) we can tell a typo'd preset, a missing directory, a directory that holds no model, a preset's
task (and so whether it needs or refuses --image), a local pipeline's task from its model_index.json,
a critic judging the other task, and a size a preset's pipeline would silently round. `gcr refine`
and batch files (`gcr batch --check`) run these same checks first, so a mistake costs no loading time.

`generator_task` / `critic_task` return (task or None when unknown, problem or None): the problem is
a sentence fragment (lower-case start, no full stop) that batch files list with line numbers;
`check_models` raises the first one as a UsageError sentence for the command line.
"""
from __future__ import annotations

import json
from pathlib import Path

from gcr.errors import UsageError
from gcr.records import EDIT, T2I

# Pipeline class names that mark an edit model (FluxKontextPipeline, QwenImageEditPipeline, ...),
# and names of pipelines that take an image but are not plain edits (ControlNet, upscalers ...): for
# those the task stays unknown here and the loader's signature check decides.
_EDIT_CLASS_MARKERS = ("Kontext", "Edit", "Img2Img", "Inpaint", "Pix2Pix")
_UNSURE_CLASS_MARKERS = ("Control", "Upscale", "Variation", "Depth2Img", "Fill", "Redux", "PaintByExample",
                         "Adapter", "Video", "Audio")


def classify_pipeline_class(class_name: str) -> str | None:
    """EDIT / T2I from a diffusers pipeline class name, None when the name alone cannot tell."""
    if any(m in class_name for m in _EDIT_CLASS_MARKERS):
        return EDIT
    if any(m in class_name for m in _UNSURE_CLASS_MARKERS) or not class_name.endswith("Pipeline"):
        return None
    return T2I


def generator_task(spec: str) -> tuple[str | None, str | None]:
    """(task or None when unknown before loading, problem or None) for a generator spec."""
    from gcr.presets import resolve_generator

    try:
        preset, source, is_local = resolve_generator(spec)
    except UsageError as e:
        return None, _fragment(str(e))
    if preset is not None:
        return preset.task, None
    if not is_local:
        return None, None  # a hub id: the loader learns its task from the pipeline
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return None, (f"the generator directory {source} has no model_index.json, so it is not a diffusers "
                      "pipeline: point at a folder saved with save_pretrained, or use a preset name")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"the generator's {index} cannot be read ({e.__class__.__name__}): re-save the pipeline"
    return classify_pipeline_class(str(class_name)), None


def critic_task(spec: str) -> tuple[str | None, str | None]:
    """(task or None when unknown before loading, problem or None) for a critic spec."""
    from gcr.presets import resolve_critic

    try:
        preset, source, is_local = resolve_critic(spec)
    except UsageError as e:
        return None, _fragment(str(e))
    if is_local and not (Path(source) / "config.json").is_file():
        return None, (f"the critic directory {source} has no config.json, so it is not a model: point at a "
                      "folder saved with save_pretrained, or use a preset name")
    return (preset.task if preset else None), None


def check_image_task(task: str | None, has_image: bool, generator: str) -> None:
    if task == EDIT and not has_image:
        raise UsageError(f"'{generator}' is an image-editing generator: pass the image to edit "
                         "with --image PATH.")
    if task == T2I and has_image:
        raise UsageError(f"'{generator}' is a text-to-image generator and takes no --image: drop "
                         "--image, or choose an edit generator such as flux-kontext.")


def size_problem(name: str, value: int | None, multiple: int, what: str) -> str | None:
    """Why `value` pixels cannot be a width/height for a pipeline that needs multiples of `multiple`,
    or None. The pipelines round such sizes down without a word (63 becomes 48 or 56)."""
    if value is None or multiple <= 1 or value % multiple == 0:
        return None
    below, above = value // multiple * multiple, (value // multiple + 1) * multiple
    options = f"{below} or {above}" if below else f"{above}"
    return f"{name} {value} is not a multiple of {multiple}, which {what} needs: use {options}"


def preset_size_problems(generator: str, width: int | None, height: int | None,
                         flag=lambda name: f"--{name}") -> list[tuple[str, str]]:
    """[(option, problem)] for sizes a preset's pipeline would round; [] when fine or not a preset."""
    from gcr.presets import GENERATOR_PRESETS

    preset = GENERATOR_PRESETS.get(generator)
    if preset is None:
        return []  # any other pipeline is checked as soon as it is loaded (gcr.generate)
    found = []
    for name, value in (("width", width), ("height", height)):
        problem = size_problem(flag(name), value, preset.size_multiple, generator)
        if problem:
            found.append((name, problem))
    return found


def check_models(*, generator: str, critic: str | None, critic_url: str | None, task: str | None,
                 has_image: bool, width: int | None = None, height: int | None = None) -> str | None:
    """Everything `gcr refine` can check before loading a model, in the order a user would fix it;
    raise the first problem as a UsageError. Returns the run's task when known."""
    found, problem = generator_task(generator)
    if problem:
        raise UsageError(_sentence(problem))
    if task is not None and found is not None and task != found:
        kind = "an edit" if found == EDIT else "a text-to-image"
        raise UsageError(f"--task is {task} but the generator '{generator}' is {kind} model: change --task "
                         "or the generator.")
    task = task or found
    check_image_task(task, has_image, generator)
    for _, problem in preset_size_problems(generator, width, height):
        raise UsageError(_sentence(problem))
    if critic is not None and not critic_url:  # a served critic ignores --critic
        judged, problem = critic_task(critic)
        if problem:
            raise UsageError(_sentence(problem))
        if judged is not None and task is not None and judged != task:
            kind = "an edit" if task == EDIT else "a text-to-image"
            raise UsageError(f"The critic '{critic}' judges {judged} results but this is {kind} run: use "
                             f"rationalrewards-{task} or leave --critic out.")
    return task


def hub_access_problem(kind: str, name: str, exc: BaseException) -> str | None:
    """A sentence naming the fix when loading failed because the hub refused access (a gated model
    whose licence was not accepted, or a private or missing repository); None otherwise. Loaders wrap
    the hub's errors (transformers raises OSError from GatedRepoError), so the chain is searched."""
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers and transformers
        GatedRepoError = RepositoryNotFoundError = ()  # noqa: N806
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, GatedRepoError) or "gated repo" in str(e).lower() for e in chain):
        return (f"The {kind} {name} is a gated model on the Hugging Face hub: open its page on huggingface.co "
                "while logged in, accept the licence, then log in here with `hf auth login`.")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (f"The {kind} {name} was not found on the Hugging Face hub: check the id, or if it is private, "
                "log in with `hf auth login`.")
    return None


def _fragment(text: str) -> str:
    text = text.rstrip(".")
    return text[:1].lower() + text[1:]


def _sentence(fragment: str) -> str:
    return fragment[:1].upper() + fragment[1:].rstrip(".") + "."


def load_failure(kind: str, name: str, location: str, exc: BaseException, fix: str):
    """The one sentence for a model that did not load (a ModelLoadError to raise): the hub's access fix
    when the hub refused it, else the error's first line and `fix`."""
    from gcr.devices import first_line
    from gcr.errors import ModelLoadError

    access = hub_access_problem(kind, name, exc)
    return ModelLoadError(access or f"cannot load the {kind} {name} from {location} ({first_line(exc)}): {fix}")
