"""The in-process critic's decoding and weight options: --critic-speculate, --critic-quant, the compile
cache, through refine, batch files and the library (speculation's identity is in test_speculate.py)."""
import os

import pytest
import torch
from typer.testing import CliRunner

from gcr.batchfile import BatchFileError, load_batch_file
from gcr.cli import app
from gcr.compilecache import ENV, cache_counters, compile_cache_dir, use_compile_cache
from gcr.critics.quant import check_quant, quantize_critic, quantize_language_model
from gcr.errors import UsageError

runner = CliRunner()


def refine(*args, tmp_path):
    result = runner.invoke(app, ["refine", *map(str, args), "--runs-dir", str(tmp_path / "runs")],
                           env={"COLUMNS": "200"})
    return result.exit_code, " ".join((result.output or "").split())


def no_runs(tmp_path) -> bool:
    listed = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs"), "--json"])
    return listed.exit_code == 0 and '"id"' not in listed.stdout


def test_fp8_on_a_cpu_is_refused_with_one_sentence_before_anything_loads(tmp_path, tiny_dir):
    code, output = refine("a red cube", "-g", tiny_dir("flux"), "--critic", tiny_dir("critic"), "--device", "cpu",
                          "--critic-quant", "fp8", tmp_path=tmp_path)
    assert code == 2 and "Traceback" not in output
    assert ("--critic-quant fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell), "
            "and this critic runs on the cpu: drop --critic-quant.") in output
    assert no_runs(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--critic-quant", "int4"], "--critic-quant must be one of none, fp8"),
    (["--critic-quant", "fp8", "--critic-url", "http://127.0.0.1:9/v1"], "applies to the in-process critic"),
    (["--critic-speculate", "2", "--critic-decode", "off"], "--critic-speculate 2 needs the fast decoder"),
    (["--critic-speculate", "17"], "--critic-speculate"),
])
def test_contradictory_or_out_of_range_critic_options_are_usage_errors(tmp_path, tiny_dir, args, message):
    code, output = refine("a red cube", "-g", tiny_dir("flux"), "--critic", tiny_dir("critic"), "--device", "cpu",
                          *args, tmp_path=tmp_path)
    assert code == 2 and message in output and "Traceback" not in output


def test_help_says_what_the_options_do_and_that_fp8_changes_critiques():
    result = runner.invoke(app, ["refine", "--help"], env={"COLUMNS": "250"})
    text = " ".join(result.output.split())
    assert "--critic-speculate" in text and "speculative decoding: the same critiques" in text
    assert "--critic-quant" in text and "fp8 CHANGES the critiques" in text
    assert "random weights cannot show by how much" in text


def test_batch_files_take_and_check_the_critic_options(tmp_path):
    from gcr.batch import plan_job

    good = tmp_path / "good.yaml"
    good.write_text("defaults:\n  critic_speculate: 5\n  critic_quant: fp8\njobs:\n  - prompt: a fox\n"
                    "  - prompt: a cat\n    critic_speculate: 0\n")
    spec = load_batch_file(good)
    opts = [plan_job(job).opts for job in spec.jobs]
    assert [(o.critic_speculate, o.critic_quant) for o in opts] == [(5, "fp8"), (0, "fp8")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  - prompt: a fox\n    critic_speculate: 40\n  - prompt: a cat\n    critic_quant: fp4\n")
    with pytest.raises(BatchFileError) as info:
        load_batch_file(bad)
    text = str(info.value)
    assert "critic_speculate" in text and "40" in text and "critic_quant" in text and "fp4" in text


# -- the compile cache -------------------------------------------------------------------------------


def test_compiled_artifacts_go_under_the_runs_home_unless_the_user_chose_a_place(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "set-below")
    monkeypatch.delenv(ENV)
    chosen = use_compile_cache(tmp_path / "runs")
    assert chosen == (tmp_path / "runs" / "cache" / "torch-compile").resolve() == compile_cache_dir(tmp_path / "runs").resolve()
    assert os.environ[ENV] == str(chosen) and not chosen.exists()   # nothing made until something compiles
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert use_compile_cache(tmp_path / "runs") == tmp_path / "mine"
    assert set(cache_counters()) == {"fx_graph_hits", "fx_graph_misses", "aot_autograd_hits", "aot_autograd_misses"}


# -- fp8 --------------------------------------------------------------------------------------------


def test_check_quant_accepts_none_and_names_the_fix_otherwise(monkeypatch):
    check_quant("none", "cpu")
    check_quant(None, "cuda")
    with pytest.raises(UsageError, match="must be one of none, fp8"):
        check_quant("int8", "cuda")
    # An older GPU (what an A100 reports), without needing one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UsageError, match=r"NVIDIA A100-SXM4-80GB has 8\.0: drop --critic-quant\.$"):
        check_quant("fp8", "cuda")


def _tiny_critic_model(tiny_dir, dtype=torch.float32, device="cpu"):
    from gcr.critics.inprocess import load_critic

    return load_critic(str(tiny_dir("critic")), task="t2i", device=device, dtype={torch.float32: "fp32",
                       torch.bfloat16: "bf16"}[dtype], max_new_tokens=8)


def test_fp8_quantizes_the_decoder_linears_only(tiny_dir):
    """torchao's float8 dynamic-activation path runs only on compute capability 8.9+; its float8
    weight-only config runs on a CPU, so the layer choice and the application are tested with it."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig

    critic = _tiny_critic_model(tiny_dir)
    model = critic.model
    before = {name: type(m.weight).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers, params = quantize_language_model(model, Float8WeightOnlyConfig())
    after = {name: type(m.weight).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    decoder = {n for n in after if ".language_model.layers." in n}
    text_config = model.config.get_text_config()
    assert layers == len(decoder) == 7 * text_config.num_hidden_layers   # q k v o gate up down
    assert params == sum(dict(model.named_modules())[n].weight.numel() for n in decoder)
    assert all(after[n] == "Float8Tensor" for n in decoder)
    assert all(after[n] == before[n] == "Parameter" for n in after if n not in decoder)  # vision, lm_head
    from gcr.records import CritiqueRequest
    from PIL import Image

    [text] = critic.critique([CritiqueRequest("a red cube", Image.new("RGB", (32, 32), "red"))])
    assert isinstance(text, str)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="float8 dynamic quantization needs a GPU of compute capability 8.9+")
def test_fp8_dynamic_quantization_runs_the_fast_decoder_on_a_hopper_gpu(tiny_dir):
    from PIL import Image

    from gcr.records import CritiqueRequest

    critic = _tiny_critic_model(tiny_dir, torch.bfloat16, "cuda")
    info = quantize_critic(critic.model, "fp8")
    assert info["scheme"] == "fp8" and info["linear_layers"] > 0
    texts = critic.critique([CritiqueRequest("a red cube", Image.new("RGB", (32, 32), "red"))] * 2)
    assert len(texts) == 2 and critic.fast.last.path.startswith("fast-")
