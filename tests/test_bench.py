"""`gcr bench` on the tiny configs (what CI can run), and the published architecture data it builds from."""
import json
import shutil
from pathlib import Path

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
CRITIQUES = Path(__file__).parent / "data" / "critiques"


def bench(*args):
    return runner.invoke(app, ["bench", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def result():
    run = bench("--json", "--batch", "1,2", "--reps", "1", "--warmup", "0", "--device", "cpu",
                "--decode-mode", "eager", "--compare-decoders", "plain", "--speculate", "3",
                "--speculate-replay", str(CRITIQUES))
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


def test_speculation_is_timed_per_k_and_batch_against_k0_and_projected_with_the_replay(result):
    spec = result["speculation"]
    assert set(spec["verify"]) == {"0", "3"} and result["settings"]["speculate"] == [3]
    for k, by_batch in spec["verify"].items():
        assert set(by_batch) == {"1", "2"}
        for b in by_batch.values():
            assert b["path"] == "fast-eager" and b["step_ms"] > 0 and b["new_tokens"] == 32
            assert b["cost_vs_k0"] > 0 and b["tokens_per_s_per_sequence"] > 0
            if k == "3":
                assert b["same_tokens_as_k0"] is True and b["steps"] <= 31
    assert result["critic_path"] == "fast-eager" and result["settings"]["critic_speculate"] == 0
    replay = spec["replay"]
    assert set(replay["by_k"]) == {str(k) for k in range(2, 9)} and "real Qwen tokenizer" in replay["note"]
    projection = spec["projection"]
    assert projection["default_k"] == 3 and projection["recommended_k_assumed_cost"] in range(2, 9)
    assert projection["recommended_k_measured_cost"] == 3   # the only K measured
    assert set(projection["expected"]) == {"1", "2"} and projection["expected"]["1"]["3"]["speedup"] > 0


def test_replay_only_needs_no_model_and_prints_the_acceptance_table():
    run = bench("--speculate-replay", str(CRITIQUES), "--replay-only", "--json")
    assert run.exit_code == 0, run.output
    record = json.loads(run.stdout)
    assert record["replay_only"] is True and "generate_s" not in record
    by_k = record["speculation"]["replay"]["by_k"]
    assert [int(k) for k in by_k] == list(range(2, 9))
    assert all(0 < r["acceptance"] < 1 and r["tokens_per_step"] > 1 for r in by_k.values())
    table = bench("--speculate-replay", str(CRITIQUES), "--replay-only")
    assert table.exit_code == 0, table.output
    for text in ("Speculation replay: 5 critiques", "tokens / pass", "speed-up b1", "Qwen", "ASSUMED",
                 "the K to run"):
        assert text in table.output


def test_fp8_is_refused_on_a_cpu_with_one_sentence():
    run = bench("--critic-quant", "fp8", "--device", "cpu")
    assert run.exit_code == 2
    assert "--critic-quant fp8 needs an NVIDIA GPU of compute capability 8.9 or newer" in run.output
    assert "Traceback" not in run.output and run.output.count(".") <= 3


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C compiler")
def test_first_call_of_the_compiled_decoder_cold_then_warm_from_the_compile_cache():
    """Two fresh processes share one compile cache: the first compiles (misses), the second finds
    what the first compiled (hits), and both write plain generate's tokens (~1-2 min on 2 cores)."""
    run = bench("--json", "--first-call", "--batch", "1", "--reps", "1", "--warmup", "0", "--device", "cpu",
                "--critique-tokens", "8", "--steps", "1", "--width", "32", "--height", "32")
    assert run.exit_code == 0, run.output
    first = json.loads(run.stdout)["compile_first_call"]
    cold, warm = first["cold"], first["warm"]
    assert "error" not in cold and "error" not in warm, first
    assert first["speculate"] == 3 and cold["speculate"] == warm["speculate"] == 3
    assert cold["path"] == warm["path"] == "fast-compile" and cold["compile_failed"] is None
    assert cold["cache"]["fx_graph_misses"] >= 1 and cold["cache"]["fx_graph_hits"] == 0
    assert warm["cache"]["fx_graph_hits"] >= 1 and warm["cache"]["fx_graph_misses"] == 0
    assert cold["cache_dir"] == warm["cache_dir"]
    assert cold["same_tokens_as_plain"] is True and warm["same_tokens_as_plain"] is True
    assert first["warm_over_cold"] > 0


@pytest.mark.parametrize("args, message", [
    (["--generator", "my/model"], "presets only"),
    (["--scale", "full", "--device", "cpu"], "needs a CUDA GPU"),
    (["--batch", "1,x"], "--batch takes"),
    (["--critic", "rationalrewards-t2i"], "judges t2i"),
    (["--decode-mode", "turbo"], "--decode-mode"),
    (["--compare-decoders", "vllm"], "--compare-decoders"),
    (["--speculate", "0"], "--speculate takes"),
    (["--speculate", "2", "--no-static"], "--no-static"),
    (["--critic-speculate", "2", "--no-static"], "--critic-decode off"),
    (["--replay-only"], "--replay-only needs --speculate-replay"),
    (["--speculate-replay", "/nonexistent", "--replay-only"], "holds no critique texts"),
    (["--critic-quant", "int4"], "--critic-quant must be"),
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
