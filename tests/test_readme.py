"""Every `gcr ...` command documented in the README runs, on tiny local models.

Presets become tiny checkpoints of the same family, `--critic-url` points at a local server that
speaks the OpenAI chat format (a test double answering with a fixed critique), and examples.yaml
is rewritten to tiny models. Nothing else about the commands changes.
"""
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app
from tests.critic_server import FakeServer
from tests.fakes import critique_text

ROOT = Path(__file__).parents[1]
TINY_FAMILY = {"flux-dev": "flux", "flux-kontext": "flux-kontext", "sd3.5-medium": "sd3",
               "./my-diffusers-dir": "flux"}
TINY_FLAGS = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu", "--max-new-tokens", "16"]


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            if line.startswith("gcr "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.fixture(scope="module")
def served_critic():
    """A scripted OpenAI-compatible critic whose critiques are readable, so the README's served run refines."""
    server = FakeServer()
    server.models = ["TIGER-Lab/RationalRewards-8B-T2I"]
    server.answer = lambda body: critique_text(3.0, 3.25, refined="a lighthouse at night, beam sweeping over rough sea")
    yield server.start().url
    server.stop()


def tiny_examples(tmp_path: Path, tiny_dir) -> Path:
    """examples.yaml with every model swapped for a tiny one of the same family."""
    spec = yaml.safe_load((ROOT / "examples.yaml").read_text())
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    spec["defaults"].update(critic=str(tiny_dir("critic")), steps=2, width=32, height=32, device="cpu",
                            max_new_tokens=16, rounds=2)
    spec["defaults"]["generator"] = str(tiny_dir("flux"))
    for job in spec["jobs"]:
        if isinstance(job, dict):
            if job.get("generator") in TINY_FAMILY:
                job["generator"] = str(tiny_dir(TINY_FAMILY[job["generator"]]))
            for key in ("steps", "width", "height", "rounds", "gen_args"):
                job.pop(key, None)
    path = tmp_path / "examples.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_readme_has_the_main_commands():
    verbs = {c[0] for c in readme_commands()}
    assert {"refine", "show", "runs", "generators", "batch", "compare", "report", "selftest", "score"} <= verbs


def score_inputs(folder: Path) -> None:
    """The files the README's `gcr score` examples name."""
    for name, colour in (("img1.png", (200, 40, 40)), ("img2.png", (40, 200, 40)), ("edited.png", (90, 90, 200)),
                         ("original.png", (90, 120, 160))):
        Image.new("RGB", (32, 32), colour).save(folder / name)
    (folder / "manifest.yaml").write_text("- image: img1.png\n  prompt: a fox reading a newspaper\n"
                                          "- id: storm\n  image: edited.png\n  source: original.png\n"
                                          "  prompt: make the sky stormy\n")


def test_every_readme_command_runs(tmp_path, tiny_dir, served_critic, monkeypatch):
    monkeypatch.setenv("BROWSER", "true")  # `--open` must not start a real browser here
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32), (90, 120, 160)).save(tmp_path / "house.png")
    shutil.copytree(tiny_dir("flux"), tmp_path / "my-diffusers-dir")
    shutil.copytree(tiny_dir("critic"), tmp_path / "my-critic-dir")
    examples = tiny_examples(tmp_path, tiny_dir)
    score_inputs(tmp_path)
    runner = CliRunner()
    last_batch = None
    for args in readme_commands():
        verb = args[0]
        args = [str(examples) if a == "examples.yaml" else a for a in args]
        for i, a in enumerate(args):
            if a in ("--generator", "-g") and args[i + 1] in TINY_FAMILY:
                args[i + 1] = str(tiny_dir(TINY_FAMILY[args[i + 1]]))
            if a == "--critic-url":
                args[i + 1] = served_critic
            if a == "--judge" and args[i + 1] in ("clipscore", "pickscore"):
                args[i + 1] = str(tiny_dir("clip"))
        if "<batch-or-run-id>" in args:
            args = [last_batch if a == "<batch-or-run-id>" else a for a in args if a != "..."]
        if verb == "refine":
            args += TINY_FLAGS + ([] if {"--critic", "--critic-url"} & set(args) else
                                  ["--critic", str(tiny_dir("critic"))])
        if verb == "score":
            args += ["--device", "cpu", "--max-new-tokens", "16", "--critic", str(tiny_dir("critic"))]
        if verb == "batch" and "--json" not in args and "--check" not in args:
            args += ["--json"]
        result = runner.invoke(app, args, env={"COLUMNS": "160"})
        # 3: a random critic scores nothing (a batch with nothing scored exits like a refine)
        expected = (0, 3) if verb in ("refine", "score") or (verb == "batch" and "--check" not in args) else (0,)
        assert result.exit_code in expected, f"gcr {' '.join(args)}\n{result.output}"
        assert "Traceback" not in result.output
        if verb == "batch" and "--check" not in args:
            last_batch = json.loads(result.stdout)["id"]
        if "--critic-url" in args:  # the served critic's critiques are readable: the loop refines
            assert "lighthouse at night, beam" in result.stdout or "3.12" in result.stdout
    assert last_batch


def _section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)


def test_ci_runs_exactly_the_readmes_tests_block():
    """.ci/run reads the block out of README.md (its own extraction code, run here), so they cannot drift."""
    import subprocess
    import sys

    script = (ROOT / ".ci" / "run").read_text()
    extractor = re.search(r"<<'EOF'\n(.*?)\nEOF", script, re.S).group(1)
    extracted = subprocess.run([sys.executable, "-c", extractor], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    [block] = re.findall(r"^```bash\n(.*?)^```", _section("Tests"), re.S | re.M)
    assert extracted == block
    assert 'bash -euo pipefail -c "$tests_block"' in script and "pytest" not in script.replace(extractor, "")
    lines = block.strip().splitlines()
    assert lines[0].startswith("python3 -m venv .venv")  # a fresh virtualenv of its own
    assert 'pip install -e ".[test]"' in block and lines[-1] == "python -m pytest -q"


def test_the_test_extra_holds_what_the_suite_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert {re.split(r"[<>=\[ ]", req)[0] for req in extra} >= {"pytest", "hypothesis"}


def test_the_quick_start_is_one_command_that_ends_in_the_demo():
    [block] = re.findall(r"^```bash\n(.*?)^```", _section("Quick start"), re.S | re.M)
    [command] = block.strip().splitlines()
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == ".venv/bin/gcr demo"
    assert all("--no-cache-dir" in s for s in steps if "pip install" in s)  # no pip cache under $HOME
