"""Bad input: one clear sentence, the documented exit code, no traceback, nothing loaded or lost."""
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app

runner = CliRunner()


def gcr(*args, env=None):
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_clean_error(code, output, expected_code, *phrases):
    assert code == expected_code, output
    assert "Traceback" not in output
    text = " ".join(output.split())
    for phrase in phrases:
        assert phrase in text, output


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    return path


def test_empty_prompt(tmp_path):
    assert_clean_error(*gcr("refine", "   ", "--runs-dir", str(tmp_path)), 2, "request is empty")


def test_missing_image(tmp_path):
    assert_clean_error(*gcr("refine", "x", "--image", str(tmp_path / "nope.png"), "--runs-dir", str(tmp_path)),
                       2, "does not exist", "--image")


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    assert_clean_error(*gcr("refine", "x", "--image", str(bad), "--runs-dir", str(tmp_path)), 2, "cannot be read")


def test_image_with_text_to_image_preset(tmp_path, png):
    assert_clean_error(*gcr("refine", "x", "--image", str(png), "-g", "flux-dev", "--runs-dir", str(tmp_path)),
                       2, "text-to-image", "drop --image")


def test_edit_preset_without_image(tmp_path):
    assert_clean_error(*gcr("refine", "x", "-g", "flux-kontext", "--runs-dir", str(tmp_path)),
                       2, "--image PATH")


def test_unknown_preset_lists_valid_ones(tmp_path):
    code, output = gcr("refine", "x", "-g", "flux-deb", "--runs-dir", str(tmp_path))
    assert_clean_error(code, output, 2, "flux-dev", "flux-kontext", "sdxl")


def test_missing_local_model_dir(tmp_path):
    assert_clean_error(*gcr("refine", "x", "-g", str(tmp_path / "no-such-model"), "--runs-dir", str(tmp_path)),
                       2, "does not exist")


def test_cuda_requested_but_absent(tmp_path, tiny_dir):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_error(*gcr("refine", "x", "-g", str(tiny_dir("flux")), "--device", "cuda",
                            "--runs-dir", str(tmp_path)), 2, "CUDA")


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--target", "5"], ["--candidates", "0"],
                                  ["--patience", "0"], ["--min-delta", "-1"], ["--steps", "0"],
                                  ["--seed", "-3"], ["--width", "2"]])
def test_out_of_range_numbers(tmp_path, args):
    code, output = gcr("refine", "x", *args, "--runs-dir", str(tmp_path))
    assert_clean_error(code, output, 2, args[0])


@pytest.mark.parametrize("args,phrase", [(["--task", "video"], "--task must be"),
                                         (["--seed-policy", "random"], "--seed-policy must be"),
                                         (["--offload", "gpu"], "--offload must be"),
                                         (["--gen-arg", "novalue"], "key=value")])
def test_bad_choices(tmp_path, args, phrase):
    assert_clean_error(*gcr("refine", "x", *args, "--runs-dir", str(tmp_path)), 2, phrase)


def test_show_unknown_run(tmp_path):
    assert_clean_error(*gcr("show", "nope", "--runs-dir", str(tmp_path)), 2, "No run 'nope'")


def test_help_is_instant_because_heavy_libraries_stay_unloaded():
    code = ("import sys; from gcr.cli import app; from typer.testing import CliRunner;"
            "r = CliRunner().invoke(app, ['refine', '--help']); assert r.exit_code == 0, r.output;"
            "assert '--generator' in r.output;"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
