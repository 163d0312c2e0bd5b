"""Consistent messages and codes: what is knowable before loading is refused before torch is even
imported, with exit 2 for generator and critic alike; Click's own usage errors are one line, exit 2."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app

runner = CliRunner()
ROOT = Path(__file__).parents[1]


@pytest.fixture
def paths(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("weights elsewhere")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    return tmp_path


CASES = [  # (arguments after the request, phrases of the one-line error)
    (["-g", "flux-deb"], ["Unknown generator preset 'flux-deb'", "did you mean 'flux-dev'"]),
    (["-g", "flux-dev", "--image", "{p}/in.png"], ["text-to-image generator", "drop --image"]),
    (["-g", "flux-kontext"], ["image-editing generator", "--image PATH"]),
    (["-g", "{p}/no-such-dir"], ["does not exist"]),
    (["-g", "{p}/not-a-model"], ["has no model_index.json", "not a diffusers pipeline"]),
    (["-g", "{p}/pipe"], ["image-editing generator", "--image PATH"]),  # its task from model_index.json
    (["-g", "flux-dev", "--task", "edit"], ["--task is edit", "text-to-image model"]),
    (["-g", "flux-dev", "--critic", "rationalrewards-edit"], ["judges edit results", "rationalrewards-t2i"]),
    (["-g", "flux-dev", "--critic", "rationalrewards-tti"], ["Unknown critic preset", "rationalrewards-t2i"]),
    (["-g", "flux-dev", "--critic", "{p}/no-such-critic"], ["critic directory", "does not exist"]),
    (["-g", "flux-dev", "--critic", "{p}/not-a-model"], ["has no config.json", "not a model"]),
    (["-g", "sd3.5-large", "--width", "1000"], ["not a multiple of 16", "992 or 1008"]),
]


def test_every_check_that_needs_no_model_runs_before_torch_is_imported(paths):
    """One process runs every case through the real CLI, then reports whether torch was imported."""
    cases = [[a.replace("{p}", str(paths)) for a in args] for args, _ in CASES]
    code = f"""
import json, sys
from typer.testing import CliRunner
from gcr.cli import app
out = []
for args in {cases!r}:
    r = CliRunner().invoke(app, ["refine", "a fox", *args, "--runs-dir", {str(paths / 'runs')!r}])
    out.append([r.exit_code, r.stderr])
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(json.dumps({{"results": out, "heavy": heavy}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["heavy"] == []  # nothing was loaded to find any of these
    for (args, phrases), (exit_code, stderr) in zip(CASES, report["results"]):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert exit_code == 2, (args, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, stderr)
        text = lines[0]
        for phrase in phrases:
            assert phrase in text, (args, text)


def test_a_directory_that_is_not_a_model_exits_2_from_the_loaders_too(paths):
    """The loaders themselves (used by batches and the library) treat it like a missing directory."""
    from gcr.critics.inprocess import load_critic
    from gcr.errors import UsageError
    from gcr.generate import load_generator

    with pytest.raises(UsageError, match="no model_index.json"):
        load_generator(str(paths / "not-a-model"), device="cpu")
    with pytest.raises(UsageError, match="no config.json"):
        load_critic(str(paths / "not-a-model"), task="t2i", device="cpu")
    assert UsageError.exit_code == 2


BOX = re.compile("[\u2500-\u257f]")


@pytest.mark.parametrize("args,phrase", [
    (["refine", "a fox", "--rond", "3"], "No such option: --rond"),
    (["refine", "a fox", "--target", "nan"], "--target"),
    (["refine", "a fox", "--target", "7"], "--target"),
    (["refine", "a fox", "--rounds", "many"], "--rounds"),
    (["refine", "a fox", "--rounds", "0"], "--rounds"),
    (["show"], "Missing argument"),
    (["shw", "last"], "No such command 'shw'"),
    (["batch", "x.yaml", "--batch-size"], "--batch-size"),
])
def test_clicks_own_usage_errors_are_one_line_without_a_frame(args, phrase):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and phrase in lines[0] and "--help" in lines[0]
    assert not BOX.search(result.output) and "Traceback" not in result.output


def test_help_and_a_bare_command_still_work():
    assert runner.invoke(app, ["--help"]).exit_code == 0
    assert "refine" in runner.invoke(app, []).output  # no arguments: the help, as before
