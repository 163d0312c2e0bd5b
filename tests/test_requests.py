"""Requests from anywhere: the argument, stdin (`-`) or --request-file; a file name given as the
request is refused with a hint; sizes a pipeline would round are refused, before loading a preset and
right after loading any other pipeline."""
import pytest
from typer.testing import CliRunner

from gcr.cli import app
from gcr.cli.common import MAX_REQUEST_BYTES
from gcr.store import RunStore
from tests.fakes import ScriptedCritic, critique_text, use_fake_models

runner = CliRunner()


@pytest.fixture
def models(monkeypatch):
    return use_fake_models(monkeypatch, ScriptedCritic(lambda *a: critique_text(4.0, 4.0)))


def refine(tmp_path, *args, input=None):
    result = runner.invoke(app, ["refine", *args, "-g", "flux-dev", "--rounds", "1", "--quiet",
                                 "--runs-dir", str(tmp_path / "runs")], input=input)
    return result


def one_sentence(result, code, *phrases):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def stored_request(tmp_path):
    return RunStore(tmp_path / "runs").get_run("last").request


def test_a_dash_reads_the_request_from_stdin(tmp_path, models):
    result = refine(tmp_path, "-", input="a fox reading the paper, ☕ on the side\n")
    assert result.exit_code == 0, result.output
    assert stored_request(tmp_path) == "a fox reading the paper, ☕ on the side"
    assert models.calls[0][0].request == "a fox reading the paper, ☕ on the side"  # judged against it


def test_request_file_is_read_as_utf8_without_its_bom_and_final_newline(tmp_path, models):
    path = tmp_path / "prompt.txt"
    path.write_bytes("\ufeffune enseigne qui dit « OUVERT »\nen lettres blanches\n".encode("utf-8"))
    result = refine(tmp_path, "--request-file", str(path))
    assert result.exit_code == 0, result.output
    assert stored_request(tmp_path) == "une enseigne qui dit « OUVERT »\nen lettres blanches"


@pytest.mark.parametrize("content,phrases", [
    (b"\xff\xfe not utf-8", ["not UTF-8", "save it as UTF-8"]),
    (b"  \n\t\n", ["is empty"]),
    (b"a" * (MAX_REQUEST_BYTES + 1), ["over 65,536 bytes"]),
    (b"a\x00b", ["NUL byte"]),
])
def test_a_bad_request_file_is_one_sentence(tmp_path, models, content, phrases):
    path = tmp_path / "prompt.txt"
    path.write_bytes(content)
    one_sentence(refine(tmp_path, "--request-file", str(path)), 2, str(path), *phrases)
    assert models.calls == []


def test_a_request_file_of_exactly_the_limit_is_accepted(tmp_path, models):
    path = tmp_path / "long.txt"
    path.write_text("a" * MAX_REQUEST_BYTES)
    assert refine(tmp_path, "--request-file", str(path)).exit_code == 0


def test_a_missing_or_directory_request_file_is_one_sentence(tmp_path, models):
    one_sentence(refine(tmp_path, "--request-file", str(tmp_path / "nope.txt")), 2, "does not exist",
                 "--request-file")
    one_sentence(refine(tmp_path, "--request-file", str(tmp_path)), 2, "is a directory")


@pytest.mark.parametrize("stdin,phrase", [("", "empty"), ("   \n", "empty"),
                                          ("x" * (MAX_REQUEST_BYTES + 10), "over 65,536 bytes")])
def test_a_bad_request_on_stdin_is_one_sentence(tmp_path, models, stdin, phrase):
    one_sentence(refine(tmp_path, "-", input=stdin), 2, "stdin", phrase)


def test_a_file_name_given_as_the_request_is_refused_with_the_option_to_use(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text("a red fox")
    one_sentence(refine(tmp_path, "prompt.txt"), 2, "'prompt.txt' is a file", "--request-file prompt.txt")
    assert models.calls == [] and RunStore(tmp_path / "runs").list_runs() == []
    # A request that merely looks like a file name is still a request.
    assert refine(tmp_path, "notes.txt").exit_code == 0
    assert stored_request(tmp_path) == "notes.txt"


def test_request_given_twice_or_not_at_all(tmp_path, models):
    path = tmp_path / "p.txt"
    path.write_text("a fox")
    one_sentence(refine(tmp_path, "a fox", "--request-file", str(path)), 2, "not both")
    one_sentence(refine(tmp_path), 2, "no request", "--request-file")


@pytest.mark.parametrize("args,phrases", [
    (["--width", "63"], ["--width 63 is not a multiple of 16", "use 48 or 64"]),
    (["--height", "1000"], ["--height 1000 is not a multiple of 16", "use 992 or 1008"]),
    (["--width", "12", "-g", "sdxl"], ["--width 12 is not a multiple of 8", "use 8 or 16"]),
])
def test_a_size_a_preset_would_round_is_refused_before_loading(tmp_path, models, args, phrases):
    result = runner.invoke(app, ["refine", "a fox", "-g", "flux-dev", *args, "--runs-dir", str(tmp_path)])
    one_sentence(result, 2, *phrases)
    assert models.calls == []


def test_a_size_any_pipeline_would_round_is_refused_right_after_loading_it(tmp_path, tiny_dir):
    from gcr.generate import GenerationSettings, load_generator
    from gcr.errors import UsageError

    with pytest.raises(UsageError) as e:  # the tiny Flux works in 8-pixel steps (VAE 4 x 2x2 patches)
        load_generator(str(tiny_dir("flux")), settings=GenerationSettings(width=63, height=32), device="cpu")
    assert "--width 63 is not a multiple of 8, which FluxPipeline needs: use 56 or 64" in str(e.value)
    from gcr.records import GenerationRequest

    ok = load_generator(str(tiny_dir("flux")), settings=GenerationSettings(width=56, height=32), device="cpu")

    [image] = ok.generate([GenerationRequest("a fox", 1)])
    assert image.size == (56, 32)  # what was asked for is what is made


def test_a_batch_file_size_a_preset_would_round_is_a_problem_with_its_line(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("defaults:\n  generator: flux-schnell\njobs:\n  - prompt: a fox\n    width: 100\n")
    result = runner.invoke(app, ["batch", str(path), "--check"])
    assert result.exit_code == 2
    assert f"{path}:5 job #1: width 100 is not a multiple of 16, which flux-schnell needs: use 96 or 112" \
        in result.stderr
