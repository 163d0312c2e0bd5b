"""The critic's prompts and message layout, exactly as the RationalRewards checkpoints were trained with.

The four texts are read byte-for-byte from the prompt files (a different wording measurably changes what
a fine-tuned critic writes). The user text has `<image>` slots: the template is split on them BEFORE the
user's request goes in, and the request is inserted with plain `str.replace`, so a request containing
`<image>`, `{request}` or braces cannot move a slot or break formatting.
"""
from __future__ import annotations

import base64
import functools
import io
import math
from pathlib import Path

from gcr.errors import GcrError, UsageError
from gcr.records import EDIT, T2I, TASKS

# Training used images of at most this many pixels (about 896x896); larger ones are downscaled to it.
MAX_PIXELS = 802_816

IMAGE_SLOT = "<image>"
REQUEST_FIELD = "{request}"
PROMPT_NAMES = ("t2i_system", "t2i_user", "edit_system", "edit_user")
# How many `<image>` slots each task's user text has, in order: T2I the generated image; edit the
# source image, then the edited image.
IMAGE_SLOTS = {T2I: 1, EDIT: 2}


def prompt_dir() -> Path:
    """Where the prompt files are: inside the package in a wheel, at the repo root in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "prompts", package.parent / "prompts"):
        if (candidate / "t2i_user.txt").is_file():
            return candidate
    raise GcrError(f"the critic prompt files are missing (looked in {package / 'prompts'} and "
                   f"{package.parent / 'prompts'}): reinstall gcr.")


@functools.lru_cache(maxsize=None)
def load_prompt(name: str) -> str:
    """One prompt text, exactly as stored: no strip (the files end without a newline on purpose)."""
    if name not in PROMPT_NAMES:
        raise UsageError(f"unknown prompt {name!r}: expected one of {', '.join(PROMPT_NAMES)}.")
    return (prompt_dir() / f"{name}.txt").read_bytes().decode("utf-8")


def system_prompt(task: str) -> str:
    return load_prompt(f"{_check_task(task)}_system")


def user_template(task: str) -> str:
    return load_prompt(f"{_check_task(task)}_user")


def fit_pixel_budget(img, max_pixels: int = MAX_PIXELS):
    """Return `img` scaled down (aspect ratio kept) to at most `max_pixels` pixels; smaller images as is."""
    width, height = img.size
    if width * height <= max_pixels:
        return img
    scale = math.sqrt(max_pixels / (width * height))
    # Floors keep the product within budget; max(1, ...) keeps extreme aspect ratios valid.
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    from PIL import Image

    return img.resize(size, Image.Resampling.BICUBIC)


def build_messages(task: str, request: str, image, source_image=None) -> list[dict]:
    """The critic conversation in the Qwen chat format: a system message, then one user message whose
    content is text parts with `{"type": "image", "image": PIL.Image}` parts at the template's slots."""
    images = _slot_images(task, image, source_image)
    chunks = user_template(task).split(IMAGE_SLOT)
    if len(chunks) - 1 != len(images):
        raise GcrError(f"the {task} critic prompt has {len(chunks) - 1} image slots instead of "
                       f"{len(images)}: restore the prompt files from the gcr distribution.")
    content: list[dict] = []
    for i, chunk in enumerate(chunks):
        # Replace inside the template chunk only: the inserted request is never scanned again.
        text = chunk.replace(REQUEST_FIELD, request)
        if text:
            content.append({"type": "text", "text": text})
        if i < len(images):
            content.append({"type": "image", "image": images[i]})
    return [
        {"role": "system", "content": system_prompt(task)},
        {"role": "user", "content": content},
    ]


def build_openai_messages(task: str, request: str, image, source_image=None) -> list[dict]:
    """The same conversation for an OpenAI-compatible server: images as `data:image/png;base64,` URLs."""
    messages = build_messages(task, request, image, source_image)
    for message in messages:
        if isinstance(message["content"], list):
            message["content"] = [
                {"type": "image_url", "image_url": {"url": png_data_url(part["image"])}}
                if part["type"] == "image" else part
                for part in message["content"]
            ]
    return messages


def png_data_url(img) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _slot_images(task: str, image, source_image) -> list:
    task = _check_task(task)
    if image is None:
        raise UsageError("the critic needs the generated image: pass an image to critique.")
    if task == EDIT and source_image is None:
        raise UsageError("the edit critic compares against the source image: pass source_image.")
    if task == T2I and source_image is not None:
        raise UsageError("the t2i critic takes no source image: use task 'edit' to critique an edit.")
    ordered = [source_image, image] if task == EDIT else [image]
    return [_critic_ready(img) for img in ordered]


def _critic_ready(img):
    """RGB within the pixel budget. Alpha is composited onto white, as the Qwen processor does, so the
    local and the served critic see the same pixels (and PNG encoding never meets an odd mode)."""
    if img.mode != "RGB":
        from PIL import Image

        if "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    return fit_pixel_budget(img)


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}.")
    return task
