"""Batch files: every problem found up front with its line, paths relative to the file, stable fingerprints."""
import json
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
from PIL import Image

from gcr.batchfile import OPTION_SPECS, BatchFileError, JobSpec, Problem, load_batch_file
from gcr.errors import EXIT_USAGE, UsageError
from gcr.records import EDIT, T2I, LoopSettings

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples.yaml"


def write(folder: Path, text: str, name: str = "batch.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def png(path: Path, color=(10, 20, 30), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(BatchFileError) as info:
        load_batch_file(path)
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# The shipped example


def test_examples_yaml_validates_with_t2i_and_edit_jobs():
    spec = load_batch_file(EXAMPLES)
    tasks = [job.task for job in spec.jobs]
    assert tasks.count(T2I) >= 3 and tasks.count(EDIT) >= 1
    assert spec.defaults["generator"] == "flux-dev"
    for job in spec.jobs:
        assert job.prompt.strip()
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", job.id)
        if job.task == EDIT:
            # The edit sources ship with the repo, tiny, and resolve against the YAML's folder.
            assert job.image.is_file() and job.image.is_relative_to(REPO / "examples")
            assert job.image.stat().st_size < 5_000
            assert job.image_sha256
        else:
            assert job.image is None
    assert any(job.options != spec.defaults for job in spec.jobs if job.task == T2I)  # per-job overrides
    assert any('"OPEN"' in job.prompt for job in spec.jobs)
    assert len({job.id for job in spec.jobs}) == len(spec.jobs)


def test_loading_imports_nothing_heavy(tmp_path):
    code = ("import sys; from gcr.batchfile import load_batch_file; "
            f"load_batch_file({str(EXAMPLES)!r}); "
            "print([m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Every problem at once, with its line

BAD = """
defaults:
  rounds: 4
  generator: flux-dev
jobs:
  - id: fox
    prompt: a fox on a bench
    stepz: 4                          # BAD fox: unknown key 'stepz' (did you mean 'steps'?)
  - id: cat
    prompt: a cat
    rounds: true                      # BAD cat: rounds must be a whole number, not true
  - id: dog
    prompt: a dog
    target: 7                         # BAD dog: target must be between 1 and 4, not 7
  - id: house
    prompt: make it night
    generator: flux-kontext
    image: photos/missing.png         # BAD house: does not exist
  - id: fox                           # BAD fox: duplicate id 'fox': already used on line 5
    prompt: another fox
  - id: kontext-no-image              # BAD kontext-no-image: is an edit job
    prompt: make it winter
    generator: flux-kontext
  - id: t2i-with-image
    prompt: a tree
    image: ok.png                     # BAD t2i-with-image: is a text-to-image job
  - prompt: "   "                     # BAD #8: the prompt is empty
  - id: good
    prompt: a perfectly fine job
    min-delta: 0.1
"""


def test_every_problem_reported_at_once_with_line_numbers(tmp_path):
    png(tmp_path / "ok.png")
    path = write(tmp_path, BAD)
    expected = []  # (line, job, phrase) read from the "# BAD job: phrase" markers
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if "# BAD " in line:
            job, phrase = line.split("# BAD ", 1)[1].split(": ", 1)
            expected.append((number, job, phrase.strip()))
    assert len(expected) == 8

    with pytest.raises(BatchFileError) as info:
        load_batch_file(path)
    err = info.value
    assert isinstance(err, UsageError) and err.exit_code == EXIT_USAGE
    got = [(p.line, p.job, p.message) for p in err.problems]
    assert [(line, job) for line, job, _ in got] == [(line, job) for line, job, _ in expected], got
    for (_, _, message), (_, _, phrase) in zip(got, expected):
        assert phrase in message
    text = str(err)
    assert text.splitlines()[0] == f"{path} has 8 problems; nothing was run: fix them and run again."
    assert f"{path}:7 job 'fox': unknown key 'stepz' (did you mean 'steps'?)" in text
    assert f"{path}:26 job #8: the prompt is empty" in text
    assert len(text.splitlines()) == 9


def test_more_kinds_of_problems(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write(tmp_path, """
        defaults:
          colour: red
          prompt: not here
        jobs:
          - prompt: a
            seed: -1
            offload: off
            dtype: fp8
            steps: 4.0
            generator: fluxdev
          - prompt: b
            task: edit
            generator: flux-dev
          - prompt: c
            image: broken.png
          - prompt: d
            min-delta: 0.1
            min_delta: 0.2
          - prompt: e
            critic: rationalrewards-t2i
            image: broken.png
          - id: ../escape
            prompt: f
          - id: 7
            prompt: g
          - prompt: h
            gen_args: {num_inference_steps: 3}
          - 42
          - prompt: !!python/object/apply:os.system ["echo pwned"]
          - prompt: yes
        rounds: 3
        extra: 1
    """)
    by_line = {}
    for p in problems_of(path):
        by_line.setdefault(p.line, []).append(p.message)
    flat = {line: " | ".join(msgs) for line, msgs in by_line.items()}
    assert "unknown key 'colour'" in flat[2] and "valid keys: image, generator" in flat[2]
    assert "'prompt' belongs in each job" in flat[3]
    assert "seed must be between 0 and 2147483647, not -1" in flat[6]
    assert "offload must be one of none, model, group, sequential, not false" in flat[7] and "quotes" in flat[7]
    assert "dtype must be one of auto, bf16, fp16, fp32, not 'fp8'" in flat[8]
    assert "steps must be a whole number, not 4.0" in flat[9]
    assert "unknown generator preset 'fluxdev'; did you mean 'flux-dev'?" in flat[10]
    assert "task is edit but the generator 'flux-dev' is a text-to-image model" in flat[12]
    assert "is not a readable image" in flat[15] and "is not a readable image" in flat[21]
    assert "'min_delta' is set twice (first on line 17)" in flat[18]
    assert "judges t2i results but this is an edit job" in flat[20]
    assert "not file-name safe" in flat[22]
    assert 'id must be text, not 7: write id: "7"' in flat[24]
    assert "set num_inference_steps with the steps option" in flat[27]
    assert "a job must be a mapping" in flat[28]
    assert "could not determine a constructor" in flat[29]  # the tag is refused, never run
    assert "the prompt must be text, not true" in flat[30]
    assert "'rounds' is a refine option: put it under `defaults:`" in flat[31]
    assert "unknown top-level key 'extra'" in flat[32]
    assert len(by_line) == 20 and sum(map(len, by_line.values())) == 20  # nothing else, nothing twice


def test_problems_inherited_from_defaults_are_reported_once(tmp_path):
    path = write(tmp_path, """
        defaults:
          generator: ./no-such-dir
        jobs:
          - prompt: a
          - prompt: b
          - prompt: c
    """)
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].line == 2 and problems[0].job is None
    assert problems[0].message.startswith("defaults: the generator directory")


@pytest.mark.parametrize("text, line, phrase", [
    ("jobs:\n  - prompt: a\n    steps: 3\n   - prompt: b\n", 4, "YAML syntax error"),
    ('jobs:\n  - prompt: "unclosed\n  - prompt: b\n', 4, "from line 2"),
    ("jobs:\n  - prompt: a\n\tsteps: 3\n", 3, "YAML syntax error"),
])
def test_syntax_error_reports_its_line(tmp_path, text, line, phrase):
    path = tmp_path / "syntax.yaml"
    path.write_text(text)
    [problem] = problems_of(path)
    assert problem.line == line and phrase in problem.message
    assert f"{path}:{line}: YAML syntax error" in problem.format(str(path))


@pytest.mark.parametrize("text, phrase", [
    ("", "is empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("jobs:\n", "`jobs:` is empty"),
    ("jobs: []\n", "`jobs:` is empty"),
    ("defaults: {rounds: 2}\n", "there is no `jobs:` list"),
    ("jobs: a fox\n", "must be a list"),
])
def test_file_shape_problems(tmp_path, text, phrase):
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    assert any(phrase in p.message for p in problems_of(path))


def test_missing_file(tmp_path):
    [problem] = problems_of(tmp_path / "nope.yaml")
    assert problem.line is None and "no such file" in problem.message


# ---------------------------------------------------------------------------------------------
# Paths, merging, spelling


def test_relative_image_resolves_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    png(folder / "img" / "src.png")
    path = write(folder, """
        jobs:
          - prompt: make it red
            image: img/src.png
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    png(elsewhere / "img" / "src.png", color=(200, 0, 0))  # a decoy at the same relative path from cwd
    monkeypatch.chdir(elsewhere)
    job = load_batch_file(Path("..") / "project" / "batch.yaml").jobs[0]
    assert job.image == (folder / "img" / "src.png").resolve()
    assert job.task == EDIT and job.generator == "flux-kontext"  # the CLI's default with an image
    assert job.image_sha256 == load_batch_file(path).jobs[0].image_sha256


def test_local_generator_dir_relative_to_yaml_and_its_task_from_model_index(tmp_path, monkeypatch):
    for name, cls in (("kontext", "FluxKontextPipeline"), ("flux", "FluxPipeline")):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    (tmp_path / "models" / "empty").mkdir()
    png(tmp_path / "src.png")
    path = write(tmp_path, """
        jobs:
          - prompt: a
            generator: models/flux
          - prompt: b
            generator: ./models/kontext
            image: src.png
          - prompt: c
            generator: ./models/kontext
          - prompt: d
            generator: models/empty
          - prompt: e
            generator: some-org/some-model
    """)
    monkeypatch.chdir(tmp_path.parent)
    problems = problems_of(path)
    assert [(p.line, p.job) for p in problems] == [(7, "#3"), (10, "#4")]
    assert "is an edit job" in problems[0].message
    assert "has no model_index.json" in problems[1].message

    # Without the bad jobs the rest loads: absolute model paths, tasks known, hub ids left unknown.
    lines = path.read_text().splitlines()
    write(tmp_path, "\n".join(lines[:6] + lines[10:]) + "\n")
    spec = load_batch_file(path)
    assert [j.task for j in spec.jobs] == [T2I, EDIT, None]
    assert spec.jobs[0].options["generator"] == str((tmp_path / "models" / "flux").resolve())
    assert spec.jobs[2].options["generator"] == "some-org/some-model"


def test_defaults_merge_and_jobs_override(tmp_path):
    path = write(tmp_path, """
        defaults:
          rounds: 3
          target: 3
          steps: 20
          gen_args: {max_sequence_length: 256, true_cfg_scale: 4}
        jobs:
          - prompt: plain
          - id: custom
            prompt: custom
            rounds: 7
            steps: null
            gen_args: {max_sequence_length: 128}
          - just a prompt string
    """)
    plain, custom, bare = load_batch_file(path).jobs
    assert plain.options == {"rounds": 3, "target": 3.0, "steps": 20,
                             "gen_args": {"max_sequence_length": 256, "true_cfg_scale": 4}}
    assert isinstance(plain.options["target"], float)  # ints are accepted for float options
    assert custom.options == {"rounds": 7, "target": 3.0,
                              "gen_args": {"max_sequence_length": 128, "true_cfg_scale": 4}}
    assert custom.option("steps") is None and custom.option("patience") == LoopSettings.patience
    assert bare.prompt == "just a prompt string" and bare.options == plain.options
    assert [j.id for j in (plain, custom, bare)] == ["job-001", "custom", "job-003"]
    assert [j.line for j in (plain, custom, bare)] == [7, 8, 13]


def test_dashed_keys_and_yaml_merge_keys(tmp_path):
    path = write(tmp_path, """
        common: &common
          min-delta: 0.2
          max-new-tokens: 512
          seed-policy: vary
        defaults: *common
        jobs:
          - prompt: a
            time-budget: 60
            gen-arg: {max_sequence_length: 64}
          - prompt: b
            <<: *common
            seed-policy: fixed
    """)
    problems = problems_of(path)  # `common` is not a batch key, and it is said so
    assert [(p.line, p.message) for p in problems] == [
        (1, "unknown top-level key 'common' (valid keys: defaults, jobs)")]
    path.write_text(path.read_text().replace("common: &common", "defaults: &common").replace(
        "defaults: *common\n", ""))
    a, b = load_batch_file(path).jobs
    assert a.options == {"min_delta": 0.2, "max_new_tokens": 512, "seed_policy": "vary", "time_budget": 60.0,
                         "gen_args": {"max_sequence_length": 64}}
    assert b.options["seed_policy"] == "fixed"  # a key written in the job overrides the merged one


def test_ids_must_be_unique_ignoring_case_and_default_ids_count(tmp_path):
    path = write(tmp_path, """
        jobs:
          - prompt: a
          - id: job-001
            prompt: b
          - id: Cat
            prompt: c
          - id: cat
            prompt: d
    """)
    problems = problems_of(path)
    assert [(p.line, p.job) for p in problems] == [(3, "job-001"), (7, "cat")]
    assert "already used on line 2" in problems[0].message
    assert "differs only in case" in problems[1].message


# ---------------------------------------------------------------------------------------------
# Fingerprints (what --resume compares)


def fingerprints(tmp_path, text) -> list[str]:
    return [j.fingerprint() for j in load_batch_file(write(tmp_path, text)).jobs]


def test_fingerprint_tracks_what_changes_results(tmp_path):
    src = png(tmp_path / "src.png")
    base = """
        defaults: {rounds: 4, device: cpu}
        jobs:
          - {id: a, prompt: a red fox}
          - {id: e, prompt: make it blue, image: src.png}
    """
    fa, fe = fingerprints(tmp_path, base)
    assert fingerprints(tmp_path, base) == [fa, fe]  # stable
    assert fingerprints(tmp_path, base.replace("a red fox", "a red fox!"))[0] != fa
    assert fingerprints(tmp_path, base.replace("rounds: 4", "rounds: 5")) != [fa, fe]
    # Things that do not change what a job produces leave it alone.
    for same in ("device: cuda:1", "device: cpu, offload: model, critic_url: 'http://h:8000/v1'",
                 "device: cpu, api_key_env: KEY, allow_remote_code: true",
                 "device: cpu, target: 3.5, gen_args: {}, min-delta: 0.05"):
        assert fingerprints(tmp_path, base.replace("device: cpu", same).replace("rounds: 4, ", "")) == \
            fingerprints(tmp_path, base.replace("rounds: 4, ", "")), same
    # The same file, the image redrawn: only the edit job changes.
    png(src, color=(99, 99, 99))
    fa2, fe2 = fingerprints(tmp_path, base)
    assert fa2 == fa and fe2 != fe


def test_jobspec_fingerprint_includes_generator_default_by_image():
    t2i = JobSpec(id="a", prompt="p", image=None, options={}, line=1)
    explicit = JobSpec(id="a", prompt="p", image=None, options={"generator": "flux-dev"}, line=1)
    other = JobSpec(id="a", prompt="p", image=None, options={"generator": "sdxl"}, line=1)
    assert t2i.fingerprint() == explicit.fingerprint() != other.fingerprint()


# ---------------------------------------------------------------------------------------------
# One table of limits, the same as the CLI's


def test_option_specs_match_the_cli_refine_options():
    import typer.models

    from gcr.cli.refine import refine

    hints = typing.get_type_hints(refine, include_extras=True)
    cli_options = {}
    for name, hint in hints.items():
        info = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None)
        if info is not None:
            cli_options[name] = info
    # --request-file is where the request comes from: a batch job's is its `prompt`.
    cli_names = set(cli_options) - {"image", "runs_dir", "json_out", "quiet", "request_file"}
    assert set(OPTION_SPECS) == (cli_names - {"gen_arg"}) | {"gen_args"}
    for name, spec in OPTION_SPECS.items():
        info = cli_options.get(name)
        if info is None:
            continue
        assert (info.min, info.max) == (spec.min, spec.max), name


def test_an_invalid_default_causes_no_follow_on_problems(tmp_path):
    path = write(tmp_path, """
        defaults:
          generator: flux-kontext
          image: [a.png]
        jobs:
          - prompt: make it red
          - prompt: make it blue
    """)
    [problem] = problems_of(path)  # not also "edit job without an image", twice
    assert (problem.line, problem.job) == (3, None)
    assert problem.message == "defaults: image must be a file path, not a list"
