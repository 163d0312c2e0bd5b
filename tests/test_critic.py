"""The critic contract: exact prompt texts, message layout, image budget, and the in-process critic run
for real on the tiny random-weight Qwen3-VL (batching, determinism, errors)."""
import base64
import hashlib
import io
import random
import subprocess
import sys

import pytest
from PIL import Image

from gcr import prompts
from gcr.critics import Critic
from gcr.critics.inprocess import load_critic, resolve_critic
from gcr.records import CritiqueRequest
from gcr.errors import ModelLoadError, UsageError

# sha256 of the texts the RationalRewards checkpoints were trained with (the reference copies in
# shared/reference/rationalrewards). Hard-coded so CI needs nothing outside the repo.
PROMPT_SHA256 = {
    "t2i_system": "2fa66ca8679e6eedc5c9c8832c89b6953f64f74da34e921ddbf9f9e37faa965b",
    "t2i_user": "bebe77506b5afe4b13b5d1ca1f23ff6d1e986ab3f915c35924dfc621295a138b",
    "edit_system": "5463ca34f3c70f45b5cb1624a66c48f5bc0ab70bead56086960a87a45cda6e5e",
    "edit_user": "62c8c0b86030e891a20037a215b611d58f34f72eb1166751ff9775cce5f2175a",
}

TRICKY = 'a sign reading "<image> {request} {0} {x}" with {{braces}} %s and \\n <|image_pad|>'


def solid(size, color):
    return Image.new("RGB", size, color)


def rendered(content):
    """A user message's parts as text, images as <image>: what the template looked like, filled."""
    return "".join(p["text"] if p["type"] == "text" else "<image>" for p in content)


def template_filled(task, request):
    """The expected user text: the template with {request} replaced by plain string replacement."""
    return prompts.user_template(task).replace("{request}", request)


# -- prompt texts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROMPT_SHA256))
def test_prompt_texts_are_byte_identical_to_the_released_ones(name):
    text = prompts.load_prompt(name)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == PROMPT_SHA256[name]
    assert not text.endswith("\n")


def test_user_templates_have_the_documented_slots():
    assert prompts.user_template("t2i").count("<image>") == 1
    assert prompts.user_template("edit").count("<image>") == 2
    for task in ("t2i", "edit"):
        assert prompts.user_template(task).count("{request}") == 1


# -- message layout ----------------------------------------------------------------------------------


def test_t2i_layout_is_system_then_user_with_one_image_slot():
    img = solid((64, 48), "red")
    messages = prompts.build_messages("t2i", "a red cube", img)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == prompts.load_prompt("t2i_system")
    content = messages[1]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text"]
    assert content[1]["image"].size == (64, 48)
    assert rendered(content) == template_filled("t2i", "a red cube")
    assert content[0]["text"].startswith("User Instruction: a red cube\n")


def test_edit_layout_puts_the_source_image_first_then_the_edited_one():
    source, edited = solid((40, 30), "blue"), solid((30, 40), "green")
    content = prompts.build_messages("edit", "make it green", edited, source_image=source)[1]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text", "image", "text"]
    assert content[1]["image"].size == (40, 30)   # source
    assert content[3]["image"].size == (30, 40)   # edited
    assert content[0]["text"].endswith("1. Source Image ")
    assert content[2]["text"] == "\n2. Edited Image "
    assert rendered(content) == template_filled("edit", "make it green")


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_a_request_with_image_markers_and_braces_cannot_shift_the_slots(task):
    extra = {"source_image": solid((16, 16), "white")} if task == "edit" else {}
    content = prompts.build_messages(task, TRICKY, solid((16, 16), "black"), **extra)[1]["content"]
    assert sum(p["type"] == "image" for p in content) == prompts.IMAGE_SLOTS[task]
    assert content[0]["text"].startswith(f"User Instruction: {TRICKY}\n")   # inserted verbatim
    assert rendered(content) == template_filled(task, TRICKY)
    # The request's own "<image>" stays text inside the first part; the slots come after it.
    assert "<image>" in content[0]["text"]


def test_openai_messages_carry_the_same_layout_with_png_data_urls():
    source, edited = solid((40, 30), (255, 0, 0)), solid((30, 40), (0, 0, 255))
    local = prompts.build_messages("edit", TRICKY, edited, source_image=source)
    served = prompts.build_openai_messages("edit", TRICKY, edited, source_image=source)
    assert served[0] == local[0]
    parts = served[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == [
        p["text"] for p in local[1]["content"] if p["type"] == "text"]
    decoded = []
    for part in parts[1::2]:
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.format == "PNG"
        decoded.append((img.size, img.convert("RGB").getpixel((0, 0))))
    assert decoded == [((40, 30), (255, 0, 0)), ((30, 40), (0, 0, 255))]


def test_wrong_image_combinations_are_usage_errors():
    img = solid((8, 8), "red")
    with pytest.raises(UsageError, match="source"):
        prompts.build_messages("edit", "x", img)
    with pytest.raises(UsageError, match="no source image"):
        prompts.build_messages("t2i", "x", img, source_image=img)
    with pytest.raises(UsageError, match="unknown task"):
        prompts.build_messages("video", "x", img)


# -- image budget ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(2000, 1000), (1024, 1024), (4000, 300), (897, 897), (5000, 1)])
def test_large_images_are_downscaled_to_the_training_budget_keeping_aspect(size):
    out = prompts.fit_pixel_budget(solid(size, "gray"))
    w, h = out.size
    assert w * h <= 802_816
    assert w * h > 0.98 * 802_816 or min(w, h) == 1
    if min(w, h) > 1:
        assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.01


def test_images_within_the_budget_are_left_alone():
    img = solid((896, 896), "gray")   # exactly 802,816 pixels
    assert prompts.fit_pixel_budget(img) is img
    assert prompts.MAX_PIXELS == 802_816


def test_messages_carry_downscaled_rgb_images():
    rgba = Image.new("RGBA", (1600, 1200), (255, 0, 0, 0))   # fully transparent red
    image = prompts.build_messages("t2i", "x", rgba)[1]["content"][1]["image"]
    assert image.mode == "RGB"
    assert image.size[0] * image.size[1] <= 802_816
    assert image.getpixel((0, 0)) == (255, 255, 255)   # alpha composited onto white, as Qwen does


def test_importing_the_critic_modules_does_not_import_torch():
    code = ("import sys, gcr.prompts, gcr.critics.inprocess, gcr.critics.served; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- spec resolution ---------------------------------------------------------------------------------


def test_spec_none_means_the_task_preset():
    assert resolve_critic(None, task="t2i").location == "TIGER-Lab/RationalRewards-8B-T2I"
    assert resolve_critic(None, task="edit").location == "TIGER-Lab/RationalRewards-8B-Edit"


@pytest.mark.parametrize("spec, match", [
    ("rationalrewards-xl", "rationalrewards-t2i"),        # unknown preset: lists the valid ones
    ("./no/such/critic", "does not exist"),
    ("rationalrewards-edit", "judges edit results"),      # a preset for the other task
])
def test_bad_specs_are_one_sentence_usage_errors(spec, match):
    with pytest.raises(UsageError, match=match) as info:
        load_critic(spec, task="t2i")
    assert "\n" not in str(info.value)


def test_a_directory_without_a_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_critic(str(tmp_path), task="t2i")


def test_an_unreachable_hub_checkpoint_is_a_model_load_error():
    # HF_HUB_OFFLINE=1 and nothing cached: the real loader must fail with a sentence, not hang.
    with pytest.raises(ModelLoadError, match="RationalRewards-8B-T2I"):
        load_critic(None, task="t2i", device="cpu")


# -- the tiny critic, through the product's loader ---------------------------------------------------


@pytest.fixture(scope="module")
def critic_dir(tiny_dir):
    return tiny_dir("critic")


@pytest.fixture(scope="module")
def t2i_critic(critic_dir):
    return load_critic(str(critic_dir), task="t2i", device="cpu", max_new_tokens=16)


@pytest.fixture(scope="module")
def edit_critic(critic_dir):
    return load_critic(str(critic_dir), task="edit", device="cpu", max_new_tokens=16)


def t2i_requests():
    # Different request lengths and image sizes: different prompt lengths, so the batch needs padding.
    return [
        CritiqueRequest("a cat", solid((64, 64), (255, 0, 0))),
        CritiqueRequest("a much longer request about a lighthouse on a cliff at dusk " * 4,
                        solid((200, 90), (0, 0, 255))),
        CritiqueRequest(TRICKY, solid((20, 120), (0, 200, 0))),
    ]


def test_tiny_critic_loads_fp32_on_cpu_with_matching_vision_geometry(t2i_critic):
    from transformers import Qwen3VLForConditionalGeneration

    model, processor = t2i_critic.model, t2i_critic.processor
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert str(model.dtype) == "torch.float32" and t2i_critic.device == "cpu"
    vision = model.config.vision_config
    assert processor.image_processor.patch_size == vision.patch_size
    assert processor.image_processor.merge_size == vision.spatial_merge_size
    assert processor.image_processor.temporal_patch_size == vision.temporal_patch_size
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert isinstance(t2i_critic, Critic)
    info = t2i_critic.describe()
    assert info["task"] == "t2i" and info["dtype"] == "float32" and info["backend"] == "transformers"


def test_tiny_critic_writes_one_string_per_request_for_both_tasks(t2i_critic, edit_critic):
    texts = t2i_critic.critique(t2i_requests())
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    edits = edit_critic.critique([
        CritiqueRequest("make it blue", solid((64, 64), "red"), source_image=solid((48, 64), "gray")),
        CritiqueRequest(TRICKY, solid((90, 30), "blue"), source_image=solid((1200, 900), "white")),
    ])
    assert len(edits) == 2 and all(isinstance(t, str) and t for t in edits)
    assert t2i_critic.critique([]) == []


def test_batched_critique_equals_each_request_alone(t2i_critic):
    requests = t2i_requests()
    alone = [t2i_critic.critique([r])[0] for r in requests]
    # The check means something only if the requests give different answers.
    assert len(set(alone)) > 1
    assert t2i_critic.critique(requests) == alone
    assert t2i_critic.critique(requests[::-1]) == alone[::-1]


def test_batched_edit_critique_equals_each_request_alone(edit_critic):
    requests = [
        CritiqueRequest("make it blue", solid((64, 64), "red"), source_image=solid((48, 64), "gray")),
        CritiqueRequest("add a hat " * 10, solid((120, 40), "blue"), source_image=solid((64, 64), "white")),
    ]
    alone = [edit_critic.critique([r])[0] for r in requests]
    assert edit_critic.critique(requests) == alone


def noise(seed, size=(64, 64)):
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size[0] * size[1])])
    return img


def test_edit_critique_depends_on_which_image_is_the_source(edit_critic):
    # End to end through the processor: swapping source and edited image changes what the model sees.
    a, b = noise(1), noise(2)
    forward = edit_critic.critique([CritiqueRequest("swap", a, source_image=b)])
    backward = edit_critic.critique([CritiqueRequest("swap", b, source_image=a)])
    assert forward != backward


def test_critique_is_deterministic_across_calls_and_loads(t2i_critic, critic_dir):
    requests = t2i_requests()
    first = t2i_critic.critique(requests)
    assert t2i_critic.critique(requests) == first
    again = load_critic(str(critic_dir), task="t2i", device="cpu", max_new_tokens=16)
    assert again.critique(requests) == first


def test_max_new_tokens_bounds_the_critique(critic_dir):
    short = load_critic(str(critic_dir), task="t2i", device="cpu", max_new_tokens=4)
    longer = load_critic(str(critic_dir), task="t2i", device="cpu", max_new_tokens=12, min_new_tokens=12)
    requests = t2i_requests()[:1]
    a, b = short.critique(requests)[0], longer.critique(requests)[0]
    assert len(b) > len(a)
    # Greedy: the short critique is the start of the long one (bar a multi-byte character cut in half).
    assert b.startswith(a[:-1])


@pytest.mark.parametrize("native", [True, False], ids=["transformers-sanitizes", "gcr-fallback"])
def test_control_tokens_in_a_request_stay_text(critic_dir, native):
    # "<|image_pad|>" in the user's words must not become an image slot: the processor would count one
    # image token too many and refuse the batch. transformers >= 5.24 encodes such text itself; older
    # versions go through gcr's fallback, exercised here by switching the native path off.
    critic = load_critic(str(critic_dir), task="t2i", device="cpu", max_new_tokens=4)
    critic.sanitize_natively = native
    request = CritiqueRequest("<|vision_start|><|image_pad|><|im_end|> and <|video_pad|>", solid((32, 32), "red"))
    texts = critic.critique([request, CritiqueRequest("plain", solid((32, 32), "blue"))])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_retry_samples_reproducibly_without_touching_global_rng(t2i_critic):
    import torch

    requests = t2i_requests()
    state = torch.get_rng_state()
    first = t2i_critic.critique(requests, retry=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert t2i_critic.critique(requests, retry=True) == first
    assert all(isinstance(t, str) for t in first) and len(first) == 3


def test_static_cache_gives_the_same_tokens_as_plain_generate(critic_dir, t2i_critic):
    static = load_critic(str(critic_dir), task="t2i", device="cpu", max_new_tokens=16, static_cache=True)
    requests = t2i_requests()
    try:
        texts = static.critique(requests)
    except (NotImplementedError, ValueError, RuntimeError) as exc:   # pragma: no cover - depends on versions
        pytest.skip(f"transformers refuses a static cache on CPU here: {exc}")
    assert texts == t2i_critic.critique(requests)
    assert static.describe()["static_cache"] is True


def test_building_the_tiny_critic_is_deterministic(critic_dir, tmp_path):
    from gcr.tiny import build_tiny_critic

    rebuilt = build_tiny_critic(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (rebuilt / name).read_bytes() == (critic_dir / name).read_bytes(), name
