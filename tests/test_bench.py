"""`gcr bench` on the tiny configs (what CI can run), and the published architecture data it builds from."""
import json

import pytest
import typer
from typer.testing import CliRunner

from gcr import archs
from gcr.bench import sample_critique
from gcr.cli.bench import bench as bench_command, parse_batches
from gcr.errors import UsageError

app = typer.Typer()
app.command("bench")(bench_command)


@app.callback()
def _group():  # keep `bench` a named subcommand, as it is under `gcr`
    pass


runner = CliRunner()


def bench(*args):
    return runner.invoke(app, ["bench", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def result():
    run = bench("--json", "--batch", "1,2", "--reps", "1", "--warmup", "0", "--device", "cpu",
                "--decode-mode", "eager", "--compare-decoders", "plain")
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)


def test_json_has_the_documented_keys_and_says_weights_are_random(result):
    for key in ("device", "random_weights", "generate_s", "critique_s", "round_s", "critic_tokens_per_s",
                "peak_memory_bytes"):
        assert key in result
    assert result["random_weights"] is True and "RANDOM" in result["note"]
    assert result["device"] == "cpu" and result["scale"] == "tiny"
    assert result["generator"] == "flux-kontext" and result["critic"] == "rationalrewards-edit"


def test_every_stage_is_timed_and_the_round_adds_up(result):
    stages = result["generate_stages_s"]
    assert stages["denoise_calls"] == result["settings"]["steps"] == 2
    assert stages["vae_encode"] > 0 and stages["vae_decode"] > 0 and stages["text_encode"] > 0
    assert stages["denoise_step"] == pytest.approx(stages["denoise_total"] / 2)
    assert result["round_s"] == pytest.approx(result["generate_s"] + result["critique_s"]
                                              + result["overhead_s"]["total"])
    assert 0 < result["overhead_fraction"] < 1
    assert result["overhead_s"]["critique_chars"] >= 2000   # a ~600-token critique was parsed


def test_critiques_are_timed_per_batch_size_on_the_fast_path(result):
    batches = result["critique_batches"]
    assert set(batches) == {"1", "2"}
    for size, b in batches.items():
        assert b["new_tokens"] == result["settings"]["critique_tokens"] == 32
        assert b["path"] == "fast-eager"
        assert b["critiques_per_min"] == pytest.approx(60 * int(size) / b["critique_s"])
        assert b["prefill_s"] > 0 and b["tokens_per_s_per_sequence"] > 0
    assert result["critic_tokens_per_s"] == batches["1"]["tokens_per_s_per_sequence"]
    assert result["decoders"]["fast"]["same_tokens_as_plain"] is True


def test_table_output_names_the_stages_and_the_caveat():
    run = bench("--batch", "1", "--reps", "1", "--warmup", "0", "--device", "cpu", "--critique-tokens", "8",
                "--no-static")
    assert run.exit_code == 0, run.output
    for text in ("text encode", "denoise, per step", "VAE decode", "critic prefill", "critic decode",
                 "loop overhead", "round", "Critiques by batch size", "RANDOM"):
        assert text in run.output
    assert "generate: fast decoding is off" in run.output  # --no-static: plain generate


@pytest.mark.parametrize("args, message", [
    (["--generator", "my/model"], "presets only"),
    (["--scale", "full", "--device", "cpu"], "needs a CUDA GPU"),
    (["--batch", "1,x"], "--batch takes"),
    (["--critic", "rationalrewards-t2i"], "judges t2i"),
    (["--decode-mode", "turbo"], "--decode-mode"),
    (["--compare-decoders", "vllm"], "--compare-decoders"),
])
def test_bad_options_are_usage_errors_before_anything_is_built(args, message):
    run = bench(*args)
    assert run.exit_code == 2 and message in run.output


def test_parse_batches():
    assert parse_batches("1, 8,16") == (1, 8, 16)
    with pytest.raises(UsageError):
        parse_batches("0")


def test_sample_critique_is_long_and_reads_cleanly():
    from gcr.parse import parse_critique

    text = sample_critique(600)
    critique = parse_critique(text, "t2i")
    assert len(text) >= 2400 and critique.overall == 3.0 and not critique.problems


# -- published architectures ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(archs.ARCHITECTURES))
def test_builders_make_the_published_parameter_counts(preset):
    """Counted on the meta device: a changed config number shows up as a changed count."""
    for component in archs.architecture(preset).components:
        assert archs.count_params(component) == component.params, (preset, component.name)


def test_critic_architecture_is_qwen3_vl_8b():
    component = archs.critic_architecture("rationalrewards-edit")
    assert archs.count_params(component) == component.params == 8_767_123_696
    assert archs.critic_weight_bytes("rationalrewards-t2i") == 2 * 8_767_123_696  # ~17.5 GB in bf16


def test_every_generator_preset_has_an_architecture():
    from gcr.presets import GENERATOR_PRESETS

    assert set(GENERATOR_PRESETS) == set(archs.ARCHITECTURES)
    for name, arch in archs.ARCHITECTURES.items():
        assert arch.pipeline_class == GENERATOR_PRESETS[name].pipeline_class
    assert sum(archs.weight_bytes("flux-kontext").values()) / 1e9 == pytest.approx(33.7, abs=0.1)


def test_unknown_presets_and_scales_are_refused():
    with pytest.raises(UsageError, match="gcr bench knows"):
        archs.architecture("dall-e")
    with pytest.raises(UsageError, match="scale"):
        archs.build_component(archs.T5_XXL, "huge")
