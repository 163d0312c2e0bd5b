"""The diffusers generator backend, end to end on tiny real-architecture checkpoints (CPU, float32).

Every family in gcr.tiny is built, saved, loaded back through `load_generator` and run: the same code
path a user's `--generator` takes, minus the download.
"""
import json

import numpy as np
import pytest
from PIL import Image

from gcr.errors import ModelLoadError, UsageError
from gcr.devices import resolve_device, resolve_dtype
from gcr.generate import GenerationSettings, infer_task, load_generator
from gcr.presets import CRITIC_PRESETS, GENERATOR_PRESETS, default_critic_for, resolve_generator
from gcr.records import EDIT, T2I, TASKS, GenerationRequest
from gcr.tiny import FAMILIES

TASK_OF = {"flux": T2I, "flux-kontext": EDIT, "sd3": T2I, "qwen-image": T2I, "qwen-image-edit": EDIT, "sdxl": T2I}
W, H = 64, 32  # not square, so a swapped width/height shows
SMALL = GenerationSettings(steps=2, width=W, height=H)


def small_settings(family, **changes):
    base = dict(steps=2, width=W, height=H)
    if family == "qwen-image-edit":
        # guidance 1 turns true CFG off: half the work on its 1024 px conditioning image.
        base["guidance"] = 1.0
    base.update(changes)
    return GenerationSettings(**base)


@pytest.fixture(scope="module")
def gen(tiny_dir):
    """Loaded generators, one per family, shared by the tests of this module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_generator(str(tiny_dir(family)), settings=small_settings(family), device="cpu")
        return cache[family]

    return get


def source(color, size=(48, 40)):
    return Image.new("RGB", size, color)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def requests(family, pairs, color="red"):
    src = source(color) if TASK_OF[family] == EDIT else None
    return [GenerationRequest(prompt=p, seed=s, source_image=src) for p, s in pairs]


# ---------------------------------------------------------------------------------------------
# Every family: build, load, generate, determinism


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_with_its_class_and_task(family, tiny_dir, gen):
    from diffusers import DiffusionPipeline

    index = json.loads((tiny_dir(family) / "model_index.json").read_text())
    assert index["_class_name"] == FAMILIES[family]
    g = gen(family)
    assert type(g.pipe).__name__ == FAMILIES[family]
    assert g.task == TASK_OF[family] == infer_task(g.pipe)
    # Plain diffusers auto-detection picks the same class (what a user's own script would get).
    assert type(DiffusionPipeline.from_pretrained(tiny_dir(family))).__name__ == FAMILIES[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_images_depend_only_on_prompt_and_seed(family, gen):
    g = gen(family)
    prompt = "a red cube on a table"
    batch = g.generate(requests(family, [(prompt, 1), (prompt, 2)]))
    single_1 = g.generate(requests(family, [(prompt, 1)]))
    single_2 = g.generate(requests(family, [(prompt, 2)]))
    again_1 = g.generate(requests(family, [(prompt, 1)]))

    assert len(batch) == 2 and len(single_1) == len(single_2) == 1
    for image in batch + single_1:
        assert isinstance(image, Image.Image) and image.size == (W, H) and image.mode == "RGB"
    assert np.array_equal(pixels(single_1[0]), pixels(again_1[0])), "same seed must give the same image"
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1])), "different seeds must differ"
    # Batching is only an optimisation: within one gray level of generating each image alone.
    assert np.abs(pixels(batch[0]) - pixels(single_1[0])).max() <= 1
    assert np.abs(pixels(batch[1]) - pixels(single_2[0])).max() <= 1


@pytest.mark.parametrize("family", [f for f in FAMILIES if TASK_OF[f] == EDIT])
def test_edit_models_use_the_source_image(family, gen):
    g = gen(family)
    red, blue = (GenerationRequest("make it shiny", 7, source(c)) for c in ("red", "blue"))
    out_red, out_blue = g.generate([red, blue])
    assert not np.array_equal(pixels(out_red), pixels(out_blue))
    with pytest.raises(UsageError, match="source image"):
        g.generate([GenerationRequest("make it shiny", 7)])


def test_text_to_image_model_refuses_a_source_image(gen):
    with pytest.raises(UsageError, match="cannot take a source image"):
        gen("flux").generate([GenerationRequest("a cat", 1, source("red"))])


def test_empty_request_list_makes_no_call(gen):
    assert gen("flux").generate([]) == []


def test_tiny_build_is_deterministic(tmp_path, tiny_dir):
    from gcr.tiny import build_tiny_pipeline

    again = build_tiny_pipeline("flux", tmp_path / "flux")
    first = tiny_dir("flux")
    weights = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert weights
    for rel in weights:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_unknown_tiny_family(tmp_path):
    from gcr.tiny import build_tiny_pipeline

    with pytest.raises(UsageError, match="flux-kontext"):
        build_tiny_pipeline("flux2", tmp_path)


# ---------------------------------------------------------------------------------------------
# Settings reach the pipeline, and bad ones fail before any compute


def test_settings_are_resolved_and_described(gen):
    g = gen("flux")
    info = g.describe()
    json.dumps(info)  # goes into the run record
    assert info["pipeline"] == "FluxPipeline" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["settings"]["steps"] == 2 and (info["settings"]["width"], info["settings"]["height"]) == (W, H)
    # Not given: the pipeline's own default.
    assert info["settings"]["guidance"] == 3.5 and info["settings"]["guidance_arg"] == "guidance_scale"


def test_guidance_changes_the_image(tiny_dir, gen):
    strong = load_generator(str(tiny_dir("flux")), settings=small_settings("flux", guidance=9.0), device="cpu")
    req = requests("flux", [("a cat", 3)])
    assert not np.array_equal(pixels(strong.generate(req)[0]), pixels(gen("flux").generate(req)[0]))


def test_qwen_uses_true_cfg_with_the_model_card_negative_prompt(gen):
    settings = gen("qwen-image").settings
    assert settings["guidance_arg"] == "true_cfg_scale" and settings["guidance"] == 4.0
    assert settings["negative_prompt"] == " "  # without one, true CFG silently switches off


def test_negative_prompt_reaches_the_pipeline(tiny_dir, gen):
    neg = load_generator(str(tiny_dir("sd3")), settings=small_settings("sd3", negative_prompt="blurry"),
                         device="cpu")
    req = requests("sd3", [("a cat", 3)])
    assert not np.array_equal(pixels(neg.generate(req)[0]), pixels(gen("sd3").generate(req)[0]))


def test_negative_prompt_on_a_model_that_ignores_it(tiny_dir):
    with pytest.raises(UsageError, match="true_cfg_scale"):
        load_generator(str(tiny_dir("flux")), settings=small_settings("flux", negative_prompt="blurry"),
                       device="cpu")
    # With true CFG switched on, Flux does use it.
    ok = load_generator(str(tiny_dir("flux")), device="cpu",
                        settings=small_settings("flux", negative_prompt="blurry", extra={"true_cfg_scale": 2.0}))
    assert ok.settings["negative_prompt"] == "blurry"


def test_extra_arguments_pass_through(tiny_dir):
    g = load_generator(str(tiny_dir("flux")), settings=small_settings("flux", extra={"max_sequence_length": 1000}),
                       device="cpu")
    # FluxPipeline itself rejects this value: proof that the extra argument reached its __call__.
    with pytest.raises(UsageError, match="rejected the settings: .*max_sequence_length"):
        g.generate(requests("flux", [("a cat", 1)]))


def test_unknown_extra_argument_names_the_valid_ones(tiny_dir):
    with pytest.raises(UsageError) as err:
        load_generator(str(tiny_dir("flux")), settings=small_settings("flux", extra={"max_seq_len": 64}),
                       device="cpu")
    message = str(err.value)
    assert "max_seq_len" in message and "max_sequence_length" in message and "\n" not in message


def test_extra_argument_that_has_its_own_setting(tiny_dir):
    with pytest.raises(UsageError, match="steps"):
        load_generator(str(tiny_dir("flux")), settings=GenerationSettings(extra={"num_inference_steps": 3}),
                       device="cpu")
    with pytest.raises(UsageError, match="itself"):
        load_generator(str(tiny_dir("flux")), settings=GenerationSettings(extra={"generator": None}), device="cpu")


def test_task_mismatch(tiny_dir):
    with pytest.raises(UsageError, match="edit"):
        load_generator(str(tiny_dir("flux")), task=EDIT, settings=SMALL, device="cpu")


# ---------------------------------------------------------------------------------------------
# Loading safety and failures


def test_pickle_weights_are_refused(tiny_dir, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_dir("flux"))
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    # (transformers 5 writes safetensors regardless; the diffusers components are now pickles only.)
    assert list((tmp_path / "transformer").glob("*.bin")) and not list((tmp_path / "transformer").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_generator(str(tmp_path), device="cpu")


def test_directory_that_is_not_a_pipeline(tmp_path):
    # A usage error (exit 2), like a directory that does not exist: the fix is the path, not a retry.
    with pytest.raises(UsageError, match="model_index.json"):
        load_generator(str(tmp_path), device="cpu")


def test_hub_id_offline_is_a_load_error():
    # conftest sets HF_HUB_OFFLINE=1: the hub lookup fails at once, and says so in one sentence.
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as err:
        load_generator("nobody-here/no-such-model", device="cpu")
    assert "nobody-here/no-such-model" in str(err.value) and "\n" not in str(err.value)


def test_offload_needs_cuda(tiny_dir):
    with pytest.raises(UsageError, match="CUDA"):
        load_generator(str(tiny_dir("flux")), device="cpu", offload="model")
    with pytest.raises(UsageError, match="sequential"):
        load_generator(str(tiny_dir("flux")), device="cpu", offload="all")


# ---------------------------------------------------------------------------------------------
# Device and dtype


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")


def test_resolve_dtype():
    import torch

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(UsageError, match="int8"):
        resolve_dtype("int8", "cpu")


# ---------------------------------------------------------------------------------------------
# Presets


def test_resolve_preset_dir_and_hub_id(tiny_dir):
    preset, src, local = resolve_generator("flux-dev")
    assert preset.name == "flux-dev" and src == "black-forest-labs/FLUX.1-dev" and not local
    assert resolve_generator(str(tiny_dir("flux"))) == (None, str(tiny_dir("flux")), True)
    assert resolve_generator("someone/some-model") == (None, "someone/some-model", False)
    # A preset's hub id gets the preset's defaults.
    assert resolve_generator("Qwen/Qwen-Image")[0].name == "qwen-image"


def test_unknown_preset_suggests_the_closest_and_lists_all():
    with pytest.raises(UsageError) as err:
        resolve_generator("flux-deb")
    message = str(err.value)
    assert "did you mean 'flux-dev'" in message and "\n" not in message
    assert all(name in message for name in GENERATOR_PRESETS)


@pytest.mark.parametrize("spec", ["./models/x", "/abs/path/to/model", "~/no/such/model"])
def test_missing_directory(spec):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_generator(spec)


def test_a_file_is_not_a_model(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UsageError, match="file"):
        resolve_generator(str(f))


@pytest.mark.parametrize("name", list(GENERATOR_PRESETS))
def test_presets_match_their_pipeline_classes(name):
    """Preset data against the real diffusers signatures: a typo here would only show on a GPU."""
    import inspect

    import diffusers

    p = GENERATOR_PRESETS[name]
    assert p.name == name and p.task in TASKS and p.hub_id.count("/") == 1
    cls = getattr(diffusers, p.pipeline_class)
    assert infer_task(cls) == p.task
    params = inspect.signature(cls.__call__).parameters
    for arg in (p.guidance_arg, "num_inference_steps", "width", "height", *p.extra):
        assert arg in params, arg
    # Negative prompts work through classic CFG (no true_cfg_scale) or through true CFG as the guidance.
    uses_negative = "negative_prompt" in params and (
        "true_cfg_scale" not in params or p.guidance_arg == "true_cfg_scale")
    assert p.negative_prompt_supported == uses_negative
    assert p.steps > 0 and p.guidance >= 0


def test_critic_presets():
    assert default_critic_for(T2I).hub_id == "TIGER-Lab/RationalRewards-8B-T2I"
    assert default_critic_for(EDIT).hub_id == "TIGER-Lab/RationalRewards-8B-Edit"
    assert {p.task for p in CRITIC_PRESETS.values()} == set(TASKS)
    with pytest.raises(UsageError):
        default_critic_for("video")


def test_kontext_follows_the_source_shape():
    from gcr.generate import _kontext_size

    w, h = _kontext_size((1600, 900))
    assert w > h and abs(w / h - 16 / 9) < 0.2
    assert _kontext_size((512, 512)) == (1024, 1024)


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA error: out of memory"])
def test_cuda_out_of_memory_names_the_offload_flag(gen, monkeypatch, message):
    """Seen on an H100 with the card filled: the caching allocator raises OutOfMemoryError, cuBLAS
    workspaces a plain "CUDA error: out of memory"; both must reach the user as OutOfMemory."""
    import torch

    from gcr.errors import OutOfMemory

    g = gen("flux")
    error = torch.cuda.OutOfMemoryError if "allocate" in message else RuntimeError

    def out_of_memory(**kwargs):
        raise error(message)

    monkeypatch.setattr(g, "pipe", out_of_memory)
    with pytest.raises(OutOfMemory, match="--offload model"):
        g.generate(requests("flux", [("a cat", 1)]))


def test_with_settings_reuses_the_pipeline(gen):
    g = gen("flux")
    assert g.with_settings(g.requested) is g
    other = g.with_settings(small_settings("flux", steps=3, width=32, height=32))
    assert other.pipe is g.pipe and other.settings["steps"] == 3 and g.settings["steps"] == 2
    assert other.generate(requests("flux", [("a cat", 1)]))[0].size == (32, 32)
    with pytest.raises(UsageError, match="max_seq_len"):
        g.with_settings(GenerationSettings(extra={"max_seq_len": 3}))
