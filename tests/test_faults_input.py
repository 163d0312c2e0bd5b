"""Hostile input, end to end: text that looks like markup or terminal control, incomplete critiques,
resource bombs and odd encodings. Each case checks the exit code, that stderr is one clear sentence
without a traceback and, where a run exists, its final status and that every completed round is
still in the store with its image.

Loop-level cases use the fake generator and scripted critic (tests/fakes.py); end-to-end ones run the
real CLI on a tiny Flux with a scripted OpenAI-compatible critic server on 127.0.0.1.
"""
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from gcr import decide
from gcr.cli import app
from gcr.compare import compare_row
from gcr.images import MAX_IMAGE_PIXELS
from gcr.loop import Job, run_loop
from gcr.parse import parse_critique
from gcr.records import Candidate, LoopSettings, Round, Run
from gcr.rewrite import RefinedRequestRewriter
from gcr.store import RunStore
from tests.critic_server import FakeServer, request_of
from tests.fakes import FakeGenerator, ScriptedCritic, critique_text

runner = CliRunner()
TINY = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu", "--quiet"]

# Text that Rich would read as markup, a forged link, and terminal control sequences.
MARKUP = "[/]"
BOLD = "[bold red]x[/]"
LINK = "[link=file:///etc/passwd]x[/link]"
POSTER = "a poster that says [/] in big letters"
ESC = "\x1b[31mred"
HOSTILE = f"{POSTER} {BOLD} {LINK} {ESC} :warning:"
VISIBLE = (POSTER, BOLD, LINK, "\\x1b[31mred", ":warning:")  # what the terminal must show, verbatim


def gcr(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    return result


def assert_one_sentence(result, code, *phrases):
    """Exit `code`; stderr is exactly one line, one sentence, `error: ...`, with no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    sentence = lines[0]
    assert sentence.startswith("error: ") and sentence.rstrip().endswith("."), sentence
    for phrase in phrases:
        assert phrase in sentence, sentence
    return sentence


def assert_literal(output: str):
    """Every hostile string is shown as written, and no raw control character reached the terminal."""
    flat = " ".join(output.split())
    for visible in VISIBLE:
        assert visible in flat, output
    assert "\x1b" not in output and "⚠" not in output


def assert_rounds_kept(runs_dir: Path, run_id: str, status: str, rounds: int):
    run = RunStore(runs_dir).get_run(run_id)
    assert run.status == status, (run.status, run.error)
    assert [r.index for r in run.rounds] == list(range(1, rounds + 1))
    for r in run.rounds:
        for c in r.candidates:
            assert Path(c.image).is_file()
    return run


# -- a scripted critic server ----------------------------------------------------------------------


@pytest.fixture
def critic_server():
    """Start scripted OpenAI-compatible servers whose critique is `answer(request)`; stopped after the test."""
    servers = []

    def start(answer):
        server = FakeServer()
        server.answer = lambda body: answer(request_of(body))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


CUT_OFF = "# Detailed Judgement\n1. Text Faithfulness:\n## Justification: The fox is there.\n## Score: 4.0"


# -- 1. Text is data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tiny_dir, tmp_path_factory):
    """A real refine whose request, refined request and critique are all hostile text."""
    root = tmp_path_factory.mktemp("hostile")
    server = FakeServer()
    server.answer = lambda body: critique_text(2.0 + len(server.posts) / 4, 3.0,  # posts so far: this call's number
                                               refined=f"{HOSTILE} round {len(server.posts)}", summary=HOSTILE)
    server.start()
    result = gcr("refine", HOSTILE, "-g", tiny_dir("flux"), "--critic-url", server.url, "--rounds", 2,
                 "--patience", 5, "--seed", 1, *TINY[:-1], "--runs-dir", root)
    server.stop()
    return root, result


def test_refine_with_markup_and_escapes_in_request_and_critique_completes_and_prints_them(hostile_run):
    runs_dir, result = hostile_run
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout)
    run = RunStore(runs_dir).get_run("last")
    assert run.request == HOSTILE  # stored verbatim: only the terminal copy is neutralized
    assert run.rounds[1].prompt == f"{HOSTILE} round 1"
    assert_rounds_kept(runs_dir, run.id, "completed", 2)


@pytest.mark.parametrize("command", [["show", "last"], ["runs"], ["compare", "last"]])
def test_every_reading_command_prints_a_hostile_store_literally(hostile_run, command):
    runs_dir, _ = hostile_run
    result = gcr(*command, "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    assert POSTER in " ".join(result.stdout.split()) and "\x1b" not in result.output
    if command[0] == "show":
        assert_literal(result.stdout)


@pytest.fixture
def damaged_store(tmp_path):
    """A store whose every text field is hostile: job ids, batch file name, errors, critiques."""
    store = RunStore(tmp_path)
    run = store.create_run(Run(id="20260101-000000-hostile-0001", request=HOSTILE, task="t2i",
                               generator=f"gen {BOLD}", critic=f"critic {LINK}", batch_id="batch-hostile",
                               settings={"job_id": f"job {MARKUP} {ESC}", "loop": LoopSettings().to_dict()}))
    cand = Candidate(seed=1, raw_critique=HOSTILE, scores={"text_faithfulness": 3.0, "physical_quality": 3.0,
                                                           "text_rendering": None},
                     overall=3.0, refined_request=HOSTILE, summary=HOSTILE, problems=(HOSTILE,))
    store.record_round(run, Round(1, HOSTILE, (cand,), next_prompt=HOSTILE, rewrite_note=HOSTILE),
                       [Image.new("RGB", (8, 8))])
    store.record_round(run, Round(2, HOSTILE, error=f"critique failed: {HOSTILE}"), [])
    store.finish_run(run.id, status="failed", stop_reason="error", best_round=1, error=HOSTILE)
    store.create_batch("batch-hostile", f"/tmp/{POSTER} {ESC}.yaml", [(f"job {MARKUP} {ESC}", "fp")])
    store.set_batch_job("batch-hostile", f"job {MARKUP} {ESC}", run_id=run.id, fingerprint="fp", position=0,
                        error=HOSTILE)
    store.set_batch_status("batch-hostile", "failed")
    store.close()
    return tmp_path, run.id


@pytest.mark.parametrize("command", [["show", "RUN"], ["show", "batch-hostile"], ["runs"], ["compare", "RUN"],
                                     ["compare", "batch-hostile"], ["report", "batch-hostile"]])
def test_a_store_full_of_hostile_text_keeps_working_for_every_command(damaged_store, command):
    runs_dir, run_id = damaged_store
    result = gcr(*[run_id if a == "RUN" else a for a in command], "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "Traceback" not in result.output
    flat = " ".join(result.stdout.split())
    if command[0] != "report":
        assert POSTER in flat
    if command == ["show", "RUN"]:
        assert_literal(result.stdout)
        assert f"error: {POSTER}" in flat  # the run's error, literally
    if command == ["show", "batch-hostile"]:
        assert f"{POSTER} \\x1b[31mred.yaml" in flat  # the batch file name in the title


def test_json_of_a_hostile_store_is_strict_and_verbatim(damaged_store):
    runs_dir, run_id = damaged_store
    for command in (["show", run_id], ["show", "batch-hostile"], ["runs"], ["compare", "batch-hostile"]):
        result = gcr(*command, "--runs-dir", runs_dir, "--json")
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout, parse_constant=pytest.fail)
        assert any(HOSTILE in v for v in strings(record))  # scripts get the text as stored


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def test_the_error_handler_prints_markup_and_escapes_in_messages_literally(tmp_path):
    result = gcr("show", f"{BOLD}{ESC}", "--runs-dir", tmp_path)
    assert_one_sentence(result, 2, BOLD, "\\x1b[31mred")
    assert "\x1b" not in result.output


def test_generators_prints_square_brackets_in_descriptions():
    result = gcr("generators")
    assert result.exit_code == 0
    assert "FLUX.1 [dev]" in " ".join(result.stdout.replace("│", " ").split())


def test_progress_lines_and_library_logs_are_literal():
    from gcr.runner import StoreSink
    from gcr.view import Progress

    buf = io.StringIO()
    with Progress(1, console=Console(file=buf, width=200)) as progress:
        progress.log(f"loading generator ./models/{BOLD}")  # what load_models logs: plain text
        progress.update(f"checking critic server {LINK}")

        class Store:
            def record_round(self, run, round_, images, metadata):
                return round_

        run = Run(id="r", request="x", task="t2i", generator="g", critic="c", settings={"job_id": f"j{MARKUP}"},
                  batch_id="b")
        sink = StoreSink(Store(), {"r": run}, progress)
        sink.round_done(Job("r", "x", LoopSettings()), Round(1, "x", error=f"critique failed: {ESC} {BOLD}"), [])
    out = buf.getvalue()
    assert f"loading generator ./models/{BOLD}" in out
    assert f"j{MARKUP} round 1: unscored critique failed: \\x1b[31mred {BOLD}" in out
    assert "\x1b" not in out


def test_selftest_and_bench_lines_are_literal():
    from gcr import selftest
    from gcr.bench import result_tables

    lines = []
    selftest._stage({"stages": []}, "stage", lines.append, lambda: (_ for _ in ()).throw(RuntimeError(BOLD + ESC)))
    console = Console(file=io.StringIO(), width=200)
    for line in lines:
        console.print(line)
    result = {"generator": f"g{MARKUP}", "critic": "c", "device": "cpu", "scale": "tiny",
              "settings": {"width": 8, "height": 8, "steps": 1, "critique_tokens": 2},
              "generate_stages_s": {"text_encode": 0.1, "denoise_step": 0.1, "denoise_calls": 1, "denoise_total": 0.1,
                                    "vae_encode": None, "vae_decode": 0.1, "other": 0.0},
              "generate_s": 0.3, "critic_prefill_s": 0.1, "critic_prompt_tokens": 3, "critic_tokens_per_s": 5.0,
              "critic_path": f"path {LINK}", "critique_s": 0.5, "round_s": 1.0, "round_over_generate": 3.0,
              "overhead_s": {"total": 0.1, "store": 0.1, "parse": 0.0, "rewrite": 0.0, "table": 0.0},
              "overhead_fraction": 0.01, "critique_batches": {"8": {"error": f"OOM {BOLD} {ESC}"}}}
    for table in result_tables(result):
        console.print(table)
    out = console.file.getvalue()
    assert "FAILED stage" in out and BOLD in out and "\\x1b[31mred" in out and LINK in out
    assert "\x1b" not in out


def test_batch_check_and_summary_print_a_hostile_file_name_literally(tiny_dir, tmp_path, critic_server):
    server = critic_server(lambda request: critique_text(3.0, 3.0))
    name = f"jobs [bold red]x {ESC}.yaml"  # markup and an escape, no "/" (a file name cannot hold one)
    path = tmp_path / name
    path.write_text(yaml.safe_dump({
        "defaults": {"generator": str(tiny_dir("flux")), "critic_url": server.url, "rounds": 1, "steps": 2,
                     "width": 32, "height": 32, "device": "cpu"},
        "jobs": [{"id": "a", "prompt": HOSTILE}]}))
    check = gcr("batch", path, "--check")
    assert check.exit_code == 0, check.output
    assert "jobs [bold red]x \\x1b[31mred.yaml has 1 valid jobs" in " ".join(check.stderr.split())
    assert "\x1b" not in check.output
    result = gcr("batch", path, "--runs-dir", tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.output
    assert POSTER in " ".join(result.stdout.split()) and "\x1b" not in result.output
    run_id = RunStore(tmp_path / "runs").get_run("last").id
    assert_rounds_kept(tmp_path / "runs", run_id, "completed", 1)


# -- 3. Complete critiques only meet targets -------------------------------------------------------


class ListSink:
    def __init__(self):
        self.rounds = []

    def stage(self, *a):
        pass

    def round_done(self, job, round_, images):
        self.rounds.append(round_)
        return round_

    def job_done(self, job):
        pass


def test_a_cut_off_critique_is_retried_once_then_recorded_incomplete_and_never_meets_the_target():
    job = Job("run", "a fox", LoopSettings(rounds=3, patience=5, target=3.5))
    critic = ScriptedCritic(lambda *a: CUT_OFF)
    run_loop([job], FakeGenerator(), critic, RefinedRequestRewriter(), ListSink(), "t2i")
    assert job.stop_reason == "max_rounds" and len(job.rounds) == 3  # 4.0 on one dimension is not the target
    assert critic.retries == 3  # once per round
    for r in job.rounds:
        assert r.overall == 4.0 and not r.complete and r.result.attempts == 2
        assert r.result.missing == ("physical_quality", "text_rendering")
        assert any("physical_quality: no score found" in p for p in r.result.problems)


def test_an_incomplete_critique_whose_retry_is_complete_uses_the_retry():
    critic = ScriptedCritic(lambda request, call, image: CUT_OFF if call == 1 else critique_text(3.75, 3.75))
    job = Job("run", "a fox", LoopSettings(rounds=2))
    run_loop([job], FakeGenerator(), critic, RefinedRequestRewriter(), ListSink(), "t2i")
    assert job.rounds[0].complete and job.rounds[0].overall == 3.75 and job.stop_reason == "target"


def test_na_is_a_judgement_but_a_missing_dimension_is_not():
    na = parse_critique(critique_text(3.0, 3.0, tr="N/A"), "t2i")
    assert na.complete and na.missing == ()
    edit = parse_critique(critique_text(3.0, 3.0), "edit")  # no image faithfulness at all
    assert edit.readable and not edit.complete and edit.missing == ("image_faithfulness",)


def test_an_incomplete_round_never_wins_over_a_complete_one_in_decide_and_compare():
    def judged(overall, missing=()):
        return Candidate(seed=0, scores={"text_faithfulness": overall}, overall=overall, missing=missing)

    assert decide.best_candidate([judged(4.0, ("physical_quality",)), judged(2.0), judged(3.0)]) == 2
    rounds = [Round(1, "p", (judged(4.0, ("physical_quality",)),)), Round(2, "p", (judged(2.5),)), Round(3, "p")]
    assert decide.best_round(rounds) == 2
    assert decide.best_round(rounds[:1]) == 1  # with nothing complete, the incomplete one is still the best
    run = Run(id="r", request="x", task="t2i", generator="g", critic="c", rounds=tuple(rounds))
    assert compare_row(run)["best_round"] == 2  # an unfinished run's best, by the same rule


def test_a_stored_candidate_from_before_completeness_is_read_with_its_missing_dimensions():
    old = {"index": 1, "prompt": "p", "candidates": [{"seed": 1, "scores": {"text_faithfulness": 4.0},
                                                      "overall": 4.0, "problems": ["physical_quality: no score found",
                                                                                   "text_rendering: no score found"]}]}
    r = Round.from_dict(old)
    assert r.result.missing == ("physical_quality", "text_rendering") and not r.complete


def test_e2e_a_critique_cut_off_after_its_first_dimension_does_not_stop_the_run_on_target(
        tiny_dir, tmp_path, critic_server):
    server = critic_server(lambda request: CUT_OFF)
    result = gcr("refine", "a fox", "-g", tiny_dir("flux"), "--critic-url", server.url, "--rounds", 2,
                 "--target", 3.5, "--patience", 5, *TINY, "--runs-dir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["stop_reason"] == "max_rounds" and record["status"] == "completed"
    assert [r["complete"] for r in record["rounds"]] == [False, False]
    assert record["rounds"][0]["candidates"][0]["missing"] == ["physical_quality", "text_rendering"]
    assert len(server.posts) == 4  # each round's critique retried once
    assert_rounds_kept(tmp_path, record["id"], "completed", 2)
    shown = gcr("show", record["id"], "--runs-dir", tmp_path)
    assert "incomplete critique" in " ".join(shown.stdout.split())


# -- Parser: a literal backslash-n -----------------------------------------------------------------


def test_a_literal_backslash_n_between_score_and_justification_is_a_line_break():
    text = critique_text(3.0, 3.0).replace("## Justification: because.\n## Score: 3.0",
                                           "## Score: 2.0  \\n## Justification: The sign reads OPNE.", 1)
    c = parse_critique(text, "t2i")
    assert c.scores["text_faithfulness"] == 2.0 and c.complete
    assert c.justifications["text_faithfulness"] == "The sign reads OPNE."


def test_a_literal_backslash_n_in_ordinary_text_is_kept():
    c = parse_critique(critique_text(3.0, 3.0, refined='a sign that reads print("a\\nb") at C:\\new'), "t2i")
    assert c.refined_request == 'a sign that reads print("a\\nb") at C:\\new'


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\\n", "\\", "n", "\n", "## Score: ", "2.5", "# Summary", "1. Text Faithfulness:",
                                 "## Justification:", " ", "\\r\\n", "N/A", "## Refined Request: x"]), max_size=40))
def test_the_parser_never_raises_on_backslash_n_text(parts):
    c = parse_critique("".join(parts), "t2i")
    assert isinstance(c.problems, tuple) and (c.complete <= c.readable)


# -- 6. Resource bombs and odd encodings -----------------------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that claims to be width x height (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 9500), (8193, 8192)])
def test_an_image_over_the_pixel_limit_is_one_sentence_for_image(tmp_path, size):
    image = png_header_only(tmp_path / "bomb.png", *size)
    result = gcr("refine", "make it blue", "--image", image, "-g", "flux-kontext", "--runs-dir", tmp_path / "r")
    assert_one_sentence(result, 2, "pixel limit", f"{MAX_IMAGE_PIXELS:,}")
    assert not (tmp_path / "r" / "gcr.sqlite3").exists() or RunStore(tmp_path / "r").list_runs() == []


def test_a_batch_file_image_over_the_pixel_limit_is_refused_at_check_with_the_same_limit(tmp_path):
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    path = tmp_path / "b.yaml"
    path.write_text("jobs:\n  - prompt: make it blue\n    image: bomb.png\n")
    result = gcr("batch", path, "--check")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "b.yaml:3" in result.stderr and f"{MAX_IMAGE_PIXELS:,}-pixel limit" in result.stderr


def nine_by_nine() -> str:
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "defaults:\n  gen_args:\n    payload:\n" + "".join(f"      - {line}\n" for line in levels) \
        + "jobs:\n  - prompt: boom\n"


@pytest.mark.parametrize("name,content,line,phrase", [
    ("laughs", nine_by_nine(), 10, "1,000,000 values"),
    ("deep", "jobs:\n  - prompt: x\n    gen_args: {a: " + "[" * 5000 + "]" * 5000 + "}\n", 3, "nested more than"),
    ("lone-surrogate", 'jobs:\n  - prompt: "a smile \\ud83d"\n', 2, "\\ud83d"),
    ("escaped-emoji", 'jobs:\n  - prompt: ok\n  - prompt: "a smile \\ud83d\\ude00"\n', 3, "\\U0001F600"),
    ("self-alias", "jobs:\n  - prompt: x\n    gen_args: &g {a: [*g]}\n", 3, "inside its own anchor"),
    ("control-char", 'jobs:\n  - prompt: "bell \x07"\n', 2, "U+0007"),
    ("non-finite-gen-arg", "jobs:\n  - prompt: x\n    gen_args: {guidance_rescale: .inf}\n", 3, "finite"),
])
def test_hostile_yaml_is_refused_at_check_with_its_line(tmp_path, name, content, line, phrase):
    path = tmp_path / f"{name}.yaml"
    path.write_text(content, encoding="utf-8")
    result = gcr("batch", path, "--check")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    head, *problems = result.stderr.strip().splitlines()
    assert head.startswith("error: ") and head.endswith("run again.") and len(problems) == 1, result.stderr
    assert f"{name}.yaml:{line}" in problems[0] and phrase in problems[0], problems[0]


@pytest.mark.parametrize("args,phrases", [
    (["refine", "x", "--time-budget", "inf"], ("'--time-budget'", "inf is not a finite number")),
    (["refine", "x", "--time-budget", "Infinity"], ("'--time-budget'", "Infinity is not a finite number")),
    (["refine", "x", "--target", "nan"], ("'--target'", "nan is not a finite number", "from 1 to 4")),
    (["refine", "x", "--target", "NaN"], ("'--target'", "NaN is not a finite number")),
    (["refine", "x", "--min-delta", "-inf"], ("'--min-delta'", "-inf is not a finite number", "from 0 to 3")),
    (["refine", "x", "--guidance", "nan"], ("'--guidance'", "nan is not a finite number")),
    (["refine", "x", "--critic-timeout", "inf"], ("'--critic-timeout'", "inf is not a finite number")),
    (["refine", "x", "--target", "4.5"], ("'--target'", "4.5 is out of range", "from 1 to 4")),
    (["refine", "x", "--target", "high"], ("'--target'", "'high' is not a number")),
    (["refine", "x", "--gen-arg", "guidance_rescale=NaN"], ("--gen-arg 'guidance_rescale'",)),
    (["refine", "x", "--gen-arg", "guidance_rescale=1e999"], ("inf is not a finite number",)),
    (["refine", "x", "--gen-arg", "deep=" + "[" * 100000], ("--gen-arg 'deep'",)),
    (["score", "a.png", "--min-overall", "nan"], ("'--min-overall'", "nan is not a finite number", "such as 3.5")),
    (["score", "a.png", "--critic-timeout", "nan"], ("'--critic-timeout'", "nan is not a finite number")),
    (["bench", "--cap-gb", "inf"], ("'--cap-gb'", "inf is not a finite number")),
    (["critic", "start", "--timeout", "nan"], ("'--timeout'", "nan is not a finite number")),
])
def test_non_finite_numbers_on_the_command_line_are_one_sentence(tmp_path, args, phrases):
    # Every real-valued option goes through one parser (gcr.cli.options.number): nan is named as what
    # it is, never reported as out of range, and inf never passes an option without an upper bound.
    extra = ["--runs-dir", tmp_path] if args[0] in ("refine", "score") else []
    assert_one_sentence(gcr(*args, *extra), 2, *phrases)


@pytest.mark.parametrize("args,what", [(["refine", "a \udcff b"], "The request"),
                                       (["show", "run-\udcfe"], "The run id"),
                                       (["refine", "x", "--image", "img-\udcff.png"], "--image")])
def test_command_line_bytes_that_are_not_utf8_are_one_sentence(tmp_path, args, what):
    assert_one_sentence(gcr(*args, "--runs-dir", tmp_path), 2, what, "not UTF-8")


def test_json_output_stays_strict_when_the_store_holds_non_finite_values(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run(Run(id="20260101-000000-nan-0001", request="x", task="t2i", generator="g",
                               critic="c", settings={"loop": {**LoopSettings().to_dict(), "time_budget": float("inf")}}))
    cand = Candidate(seed=1, scores={"text_faithfulness": 3.0}, overall=3.0)
    store.record_round(run, Round(1, "x", (cand,), timings={"total_s": float("nan")}), [Image.new("RGB", (8, 8))])
    store.finish_run(run.id, status="completed", stop_reason="max_rounds", best_round=1)
    for command in (["show", run.id], ["runs"], ["compare", run.id]):
        result = gcr(*command, "--runs-dir", tmp_path, "--json")
        assert result.exit_code == 0, result.output
        json.loads(result.stdout, parse_constant=pytest.fail)  # no NaN, no Infinity
    record = json.loads(gcr("show", run.id, "--runs-dir", tmp_path, "--json").stdout)
    assert record["settings"]["loop"]["time_budget"] is None and record["rounds"][0]["timings"]["total_s"] is None
