"""Batch files: a YAML list of refine jobs, read and validated completely before anything loads.

    defaults:            # any refine option, for every job
      generator: flux-dev
      rounds: 4
    jobs:
      - prompt: a fox reading a newspaper on a park bench
      - id: sign
        prompt: a shop sign that reads "OPEN"
        candidates: 2    # a job's own options override the defaults
      - prompt: make the sky stormy, keep the house
        image: examples/house.png   # relative to this file's folder
        generator: flux-kontext

`load_batch_file` returns a `BatchSpec` or raises ONE `BatchFileError` listing every problem in the
file with its line number, so a user fixes a thousand-job file in one pass instead of one crash per
overnight run. Nothing heavy is imported here (no torch, no diffusers): `gcr batch --check` is instant.

`OPTION_SPECS` is the single table of refine options (type, range or choices, help, default); the
CLI's `refine` flags carry the same limits.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gcr.critics.served import CRITIC_TIMEOUT_HELP, DEFAULT_TIMEOUT_S as DEFAULT_CRITIC_TIMEOUT_S
from gcr.critics.quant import QUANTS
from gcr.critics.speculate import DEFAULT_SPECULATE, MAX_SPECULATE
from gcr.errors import UsageError
from gcr.modelspec import critic_task as _critic_task
from gcr.modelspec import generator_task as _generator_task
from gcr.modelspec import preset_size_problems
from gcr.records import EDIT, ON_CONVERGED, T2I, TASKS, LoopSettings


# ---------------------------------------------------------------------------------------------
# The refine options: one table for the batch file and the CLI


@dataclass(frozen=True)
class OptionSpec:
    """One refine option. `min`/`max` are inclusive; None = unbounded. `default` is what the CLI
    uses when the option is absent (None: the preset's or pipeline's value, or drawn at run time)."""

    type: type                        # int, float, str, bool or dict
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None
    affects_output: bool = True       # part of a job's fingerprint (changing it changes results)
    allow_empty: bool = False         # str only: "" is a meaningful value


OPTION_SPECS: dict[str, OptionSpec] = {
    "generator": OptionSpec(str, "A preset (see `gcr generators`), a hub id or a local diffusers directory. "
                                 "Default: flux-dev, or flux-kontext with an image."),
    "task": OptionSpec(str, "t2i or edit. Default: the preset's, or inferred from the pipeline.", choices=TASKS),
    "critic": OptionSpec(str, "Critic preset, hub id or local dir. Default: rationalrewards-t2i or "
                              "rationalrewards-edit by task."),
    "critic_url": OptionSpec(str, "Use a served critic (vLLM or any OpenAI-compatible /v1 URL) instead of "
                                  "loading it in-process.", affects_output=False),
    "critic_model": OptionSpec(str, "Model name on the critic server (default: the one it serves)."),
    "api_key_env": OptionSpec(str, "Name of the environment variable holding the critic server's API key.",
                              affects_output=False),
    "critic_timeout": OptionSpec(float, CRITIC_TIMEOUT_HELP, 0.1, 3600.0, default=DEFAULT_CRITIC_TIMEOUT_S,
                                 affects_output=False),
    "critic_engine": OptionSpec(str, "Start a server for the critic and use it: vllm or transformers-serve.",
                                choices=("vllm", "transformers-serve"), affects_output=False),
    "vllm_bin": OptionSpec(str, "The vllm executable for critic_engine vllm (default: $GCR_VLLM_BIN, else PATH).",
                           affects_output=False),
    "rounds": OptionSpec(int, "Most rounds to run.", 1, 100, default=LoopSettings.rounds),
    "target": OptionSpec(float, "Stop when every applicable score is at least this (1-4).", 1.0, 4.0,
                         default=LoopSettings.target),
    "min_delta": OptionSpec(float, "A gain smaller than this counts as no improvement.", 0.0, 3.0,
                            default=LoopSettings.min_delta),
    "patience": OptionSpec(int, "Stop after this many rounds without improvement.", 1, 100,
                           default=LoopSettings.patience),
    "time_budget": OptionSpec(float, "Stop starting new rounds after this many seconds.", 0.0, None),
    "candidates": OptionSpec(int, "Images per round (one per seed); the best-scored is the round's result.",
                             1, 64, default=LoopSettings.candidates),
    "seed": OptionSpec(int, "Base seed. Default: random (recorded with the run).", 0, 2**31 - 1),
    "seed_policy": OptionSpec(str, "fixed: same seeds every round (isolates the prompt's effect); vary: new "
                                   "seeds each round.", choices=("fixed", "vary"),
                              default=LoopSettings.seed_policy),
    "on_converged": OptionSpec(str, "When the critic proposes a prompt already run with the same seeds: stop "
                                    "(converged), or reseed (spend the rest on fresh seeds).",
                               choices=ON_CONVERGED, default=LoopSettings.on_converged),
    "steps": OptionSpec(int, "Denoising steps (default: the preset's).", 1, 1000),
    "guidance": OptionSpec(float, "Guidance scale (default: the preset's).", 0.0, 100.0),
    "width": OptionSpec(int, "Image width in pixels.", 8, 8192),
    "height": OptionSpec(int, "Image height in pixels.", 8, 8192),
    "negative_prompt": OptionSpec(str, "Negative prompt, where the pipeline supports one.", allow_empty=True),
    "gen_args": OptionSpec(dict, "Extra pipeline arguments, e.g. {max_sequence_length: 256}."),
    "device": OptionSpec(str, "auto, cpu, cuda or cuda:N.", default="auto", affects_output=False),
    "dtype": OptionSpec(str, "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.",
                        choices=("auto", "bf16", "fp16", "fp32"), default="auto"),
    "offload": OptionSpec(str, "Generator CPU offload: none, model, group or sequential (default: chosen by memory).",
                          choices=("none", "model", "group", "sequential"), default=None, affects_output=False),
    "memory": OptionSpec(str, "GPU memory plan: auto, resident, offload-model, swap, offload-group or critic-cpu.",
                         choices=("auto", "resident", "offload-model", "swap", "offload-group", "critic-cpu"),
                         default="auto", affects_output=False),
    "critic_decode": OptionSpec(str, "In-process critic decoding: auto, compile, graph, eager or off.",
                                choices=("auto", "compile", "graph", "eager", "off"), default="auto",
                                affects_output=False),
    "critic_speculate": OptionSpec(int, "In-process critic: tokens drafted per decode step by prompt lookup "
                                        "(speculative decoding; the same critiques). 0 = off. Default: "
                                        f"{DEFAULT_SPECULATE} on a GPU, off on a CPU.", 0, MAX_SPECULATE,
                                   affects_output=False),
    "critic_quant": OptionSpec(str, "In-process critic weights: none, or fp8 (GPUs of compute capability 8.9+; "
                                    "changes the critiques).", choices=QUANTS, default="none"),
    "max_new_tokens": OptionSpec(int, "Longest critique the critic may write, in tokens.", 16, 32768,
                                 default=2048),
    "allow_remote_code": OptionSpec(bool, "Allow models to run code from their repository (off: safer).",
                                    default=False, affects_output=False),
    # Reported, never optimized (gcr.judge): adding or changing it does not change a job's rounds.
    "judge": OptionSpec(str, "An independent judge that gcr reports but never optimizes: clipscore, pickscore, "
                             "a CLIP directory or hub id (CLIPScore), or pickscore:DIR.", affects_output=False),
}

# Keys a job has besides the options. `image` may also sit in `defaults` (many edits of one image).
JOB_KEYS = ("prompt", "id", "image")
TOP_LEVEL_KEYS = ("defaults", "jobs")
ALIASES = {"gen_arg": "gen_args"}  # the CLI's flag is --gen-arg (repeatable); the file uses a mapping

# gen_args keys that have their own option (the generator refuses them as extras).
_MANAGED_GEN_ARGS = {"num_inference_steps": "steps", "width": "width", "height": "height",
                     "negative_prompt": "negative_prompt"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def cli_flag(name: str) -> str:
    """The command-line spelling of an option: min_delta -> --min-delta."""
    return "--" + name.replace("_", "-")


def check_option(name: str, value: Any) -> Any:
    """Check one option value against OPTION_SPECS; return it normalized (ints become floats for float
    options). Raise ValueError with a message that names the fix."""
    spec = OPTION_SPECS[name]
    yaml_bool_hint = " (YAML reads yes/no/on/off as true/false: put the value in quotes)"
    if spec.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {_show(value)}")
        return value
    if spec.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, not {_show(value)}")
        _check_range(name, spec, value)
        return value
    if spec.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and _parses_as_float(value):
                hint = " (YAML reads 1e-2 as text: write 0.01 or 1.0e-2)"
            raise ValueError(f"{name} must be a number, not {_show(value)}{hint}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, not {value}")
        _check_range(name, spec, value)
        return float(value)
    if spec.type is str:
        if not isinstance(value, str):
            hint = yaml_bool_hint if isinstance(value, bool) else ""
            what = f"one of {', '.join(spec.choices)}" if spec.choices else "text"
            raise ValueError(f"{name} must be {what}, not {_show(value)}{hint}")
        if spec.choices is not None:
            if value not in spec.choices:
                raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, not {value!r}")
            return value
        if not value.strip() and not spec.allow_empty:
            raise ValueError(f"{name} is empty: give a value or remove the key")
        _check_text(name, value)
        return value
    if spec.type is dict:
        return _check_gen_args(name, value)
    raise AssertionError(f"no checker for {spec.type}")  # pragma: no cover


def _check_range(name: str, spec: OptionSpec, value: float) -> None:
    lo, hi = spec.min, spec.max
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            raise ValueError(f"{name} must be at least {_num(lo)}, not {_num(value)}")
        raise ValueError(f"{name} must be between {_num(lo)} and {_num(hi)}, not {_num(value)}")


def _check_text(name: str, value: str) -> None:
    if name == "device" and not _DEVICE.match(value):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not {value!r}")
    if name == "critic_url":
        parts = urllib.parse.urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"critic_url {value!r} is not an http(s) URL: use e.g. http://localhost:8000/v1")
    if name == "api_key_env" and not _ENV_NAME.match(value):
        raise ValueError(f"api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), "
                         f"not {value!r}")


def _check_gen_args(name: str, value: Any) -> dict:
    from gcr.generate import CONTROLLED_ARGS, SOURCE_IMAGE_ARGS  # import-light: torch loads lazily there

    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of pipeline arguments, e.g. "
                         f"{name}: {{max_sequence_length: 256}}, not {_show(value)}")
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{name} key {key!r} is not an argument name")
        if key in _MANAGED_GEN_ARGS:
            raise ValueError(f"set {key} with the {_MANAGED_GEN_ARGS[key]} option, not in {name}")
        if key in CONTROLLED_ARGS or key in SOURCE_IMAGE_ARGS:
            raise ValueError(f"gcr sets the {key} argument itself: remove it from {name}")
        problem = json_value_problem(value[key])
        if problem:
            raise ValueError(f"{name} {key}: {problem}")
    return dict(value)


def json_value_problem(value: Any) -> str | None:
    """Why `value` cannot be a pipeline argument that is stored and printed as strict JSON, or None:
    only text, finite numbers, true/false, null, lists and mappings with text keys qualify (a YAML
    date, set or binary, or a NaN, would break the run record and `--json`)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str) and _SURROGATE.search(v):
            return f"the text holds {lone_surrogate(v)}, half of a character: write the character itself"
        if v is None or isinstance(v, (bool, int, str)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                return f"{v} is not a finite number"
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                return "mapping keys must be text"
            stack.extend(v.values())
        else:
            return f"a {type(v).__name__} value is not allowed: use text, numbers, true/false, lists or mappings"
    return None


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Results and errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a batch file. `line` is 1-based (None: the whole file); `job` is the job's
    id, or "#N" (1-based position) when it has none; None for the file itself and for `defaults`."""

    line: int | None
    job: str | None
    message: str
    kind: str = "job"   # what `job` names: a batch file's job, a score manifest's entry

    def format(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line is not None else file
        if self.job is None:
            return f"{where}: {self.message}"
        label = self.job if self.job.startswith("#") else repr(self.job)
        return f"{where} {self.kind} {label}: {self.message}"


class BatchFileError(UsageError):
    """Every problem found in a batch file, reported at once."""

    def __init__(self, file: str, problems: list[Problem], outcome: str = "nothing was run"):
        self.file = file
        self.problems = sorted(problems, key=lambda p: (p.line or 0))
        n = len(self.problems)
        head = (f"{file} has {n} problem{'s' if n != 1 else ''}; {outcome}: "
                f"fix {'them' if n != 1 else 'it'} and run again.")
        super().__init__("\n".join([head, *("  " + p.format(file) for p in self.problems)]))


@dataclass(frozen=True)
class JobSpec:
    """One job of a batch, validated. `options` holds only what the file set (defaults merged with the
    job's own keys, snake_case, normalized); an absent option means the CLI's default applies."""

    id: str
    prompt: str
    image: Path | None              # absolute
    options: dict
    line: int                       # where the job starts in the file
    index: int = 0                  # 1-based position in `jobs`
    task: str | None = None         # as known without loading: explicit, preset's or model_index.json's
    image_sha256: str | None = None  # content hash of `image`, read when the file was validated

    @property
    def generator(self) -> str:
        """The generator this job uses: its own or the CLI's default (flux-kontext for an image)."""
        return self.options.get("generator") or ("flux-kontext" if self.image is not None else "flux-dev")

    def option(self, name: str) -> Any:
        """The value in effect: the file's, else the CLI default from OPTION_SPECS."""
        if name == "generator":
            return self.generator
        return self.options.get(name, OPTION_SPECS[name].default)

    def fingerprint(self) -> str:
        """sha256 over everything that determines this job's results: the prompt, the options that
        affect outputs (with defaults filled in, so writing a default explicitly changes nothing) and
        the source image's bytes. Device, offload, critic server address and API key are left out:
        moving a job to another GPU or server does not change what it should produce."""
        payload = {
            "version": 1,
            "prompt": self.prompt,
            "options": {name: self.option(name) for name, spec in OPTION_SPECS.items()
                        if spec.affects_output and name != "gen_args"},
            "gen_args": self.options.get("gen_args") or {},  # absent and {} mean the same
            "image_sha256": self.image_sha256,
        }
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "image": str(self.image) if self.image else None,
                "options": dict(self.options), "line": self.line, "index": self.index, "task": self.task,
                "fingerprint": self.fingerprint()}


@dataclass(frozen=True)
class BatchSpec:
    path: Path                      # absolute
    defaults: dict                  # the `defaults` block, normalized
    jobs: list[JobSpec] = field(default_factory=list)

    def job(self, job_id: str) -> JobSpec:
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise KeyError(job_id)


def with_judge(spec: BatchSpec, judge: str | None) -> BatchSpec:
    """`gcr batch FILE --judge J`: J for every job that names no judge of its own (the file wins)."""
    if not judge:
        return spec
    from dataclasses import replace

    jobs = [j if j.options.get("judge") else replace(j, options={**j.options, "judge": judge}) for j in spec.jobs]
    return replace(spec, jobs=jobs)


# ---------------------------------------------------------------------------------------------
# Loading


# Limits of the YAML reader, checked while the file is composed, before any value is built: a file
# beyond them is refused at --check with the line where it went over, instead of exhausting memory
# or the stack when it runs.
MAX_YAML_DEPTH = 32            # nesting levels, aliases followed; a batch file needs about 5
MAX_YAML_VALUES = 1_000_000    # values once every alias is expanded (a "billion laughs" file has 10^9)


class _YamlLimit(yaml.composer.ComposerError):
    """A file gcr's YAML reader refuses (not a syntax error): the problem text says why and the fix."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts while it composes: the nesting depth and the number of values
    with aliases expanded (an alias costs what its anchor holds, so nine levels of nine aliases fail
    at the level that crosses MAX_YAML_VALUES), refuses an alias used inside its own anchor (a value
    that contains itself), and refuses unpaired surrogates (what a JSON-style "\\ud83d" escape
    decodes to): they cannot be stored, printed or sent to a model."""

    def __init__(self, stream):
        super().__init__(stream)
        self._level = 0            # nesting level of the node being composed
        self._deepest = 0          # deepest level reached inside it, aliases expanded
        self._values = 0           # values so far, aliases expanded
        self._measured: dict = {}  # id(node) -> (values, depth) of every finished node

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is PyYAML's to report
                measured = self._measured.get(id(target))
                if measured is None:
                    raise _YamlLimit(None, None, f"the alias *{event.anchor} is used inside its own anchor "
                                     f"&{event.anchor}: a value cannot contain itself", event.start_mark)
                values, depth = measured
                self._charge(values, self._level + depth, event)
            return super().compose_node(parent, index)
        self._level += 1
        outer, self._deepest = self._deepest, self._level
        before = self._values
        self._charge(1, self._level, event)
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.ScalarNode):
            _check_surrogates(node)
        self._measured[id(node)] = (self._values - before, self._deepest - self._level + 1)
        self._deepest = max(outer, self._deepest)
        self._level -= 1
        return node

    def _charge(self, values: int, deepest: int, event) -> None:
        """Count a value, or an alias's expansion, that reaches nesting level `deepest`."""
        self._values += values
        self._deepest = max(self._deepest, deepest)
        if deepest > MAX_YAML_DEPTH:
            raise _YamlLimit(None, None, f"values are nested more than {MAX_YAML_DEPTH} levels deep here "
                             "(aliases followed): flatten the structure", event.start_mark)
        if self._values > MAX_YAML_VALUES:
            what = f"the alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else "this value"
            raise _YamlLimit(None, None, f"{what} takes the file past {MAX_YAML_VALUES:,} values with every "
                             "alias expanded: use fewer or smaller aliases", event.start_mark)


def _check_surrogates(node) -> None:
    value = node.value
    m = _SURROGATE.search(value) if isinstance(value, str) else None
    if m is None:
        return
    code = f"\\u{ord(m.group()):04x}"
    try:  # two escaped halves ("\ud83d\ude00") name one character: say how to write it
        whole = value[m.start():m.start() + 2].encode("utf-16", "surrogatepass").decode("utf-16")
        hint = f"write {code}\\u{ord(value[m.start() + 1]):04x} as \\U{ord(whole):08X}, or the character itself"
    except UnicodeDecodeError:
        hint = "write the character itself, or escape it whole as \\UXXXXXXXX"
    raise _YamlLimit(None, None, f"the text holds {code}, half of a character (a surrogate, as JSON escapes "
                     f"emoji), which YAML does not join: {hint}", node.start_mark)


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """The first unpaired surrogate in `text` as an escape (`\\udcff`), or None. Command-line
    arguments that are not valid UTF-8 arrive with them (Python's surrogateescape)."""
    m = _SURROGATE.search(text)
    return None if m is None else f"\\u{ord(m.group()):04x}"


def load_batch_file(path: str | Path) -> BatchSpec:
    """Read and validate a batch file; raise BatchFileError listing every problem, or return the spec."""
    return _Validator(Path(path)).run()


@dataclass
class _Value:
    value: Any
    line: int
    key: str            # as written in the file (for messages)


class _Validator:
    def __init__(self, path: Path):
        self.path = path
        self.shown = str(path)
        self.absolute = path.expanduser().resolve()
        self.base = self.absolute.parent     # relative paths in the file start here
        self.problems: list[Problem] = []
        self._seen: set = set()
        self._images: dict[Path, tuple] = {}           # resolved path -> (sha256, error)
        self._models: dict[tuple, tuple] = {}          # (kind, spec) -> (task or None, error or None)

    def add(self, line: int | None, job: str | None, message: str) -> None:
        key = (line, job, message)
        if key not in self._seen:  # an inherited default's problem is reported once, at its line
            self._seen.add(key)
            self.problems.append(Problem(line, job, message))

    def add_for(self, value: _Value | None, defaults: dict, label: str, line: int, message: str) -> None:
        """A problem about `value`: the job's own, or (when inherited) the defaults', reported once."""
        if _job_of(value, defaults, label) is None:
            self.add(line, None, "defaults: " + message)
        else:
            self.add(line, label, message)

    def fail(self):
        raise BatchFileError(self.shown, self.problems)

    # -- the file -------------------------------------------------------------------------------

    def run(self) -> BatchSpec:
        root, loader = self._parse()
        try:
            spec = self._check_root(root, loader)
        finally:
            loader.dispose()
        if self.problems:
            self.fail()
        return spec

    def read_text(self, kind: str) -> str:
        """The file as UTF-8 text (a BOM dropped), or fail with why not. `kind` names what it should be."""
        try:
            data = self.path.expanduser().read_bytes()
        except FileNotFoundError:
            self.add(None, None, "no such file: check the path")
            self.fail()
        except IsADirectoryError:
            self.add(None, None, f"is a directory, not {kind}")
            self.fail()
        except OSError as e:
            self.add(None, None, f"cannot be read ({e.strerror or e})")
            self.fail()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            self.add(data[:e.start].count(b"\n") + 1, None, "is not UTF-8 text: save the file as UTF-8")
            self.fail()

    def _parse(self):
        text = self.read_text("a YAML batch file")
        # SafeLoader only: tags like !!python/object are refused, never executed.
        try:
            loader = _BoundedLoader(text)  # checks that every character is one YAML allows
        except yaml.reader.ReaderError as e:
            code = e.character if isinstance(e.character, int) else ord(e.character)
            self.add(text[:e.position].count("\n") + 1, None,
                     f"holds the control character U+{code:04X}, which YAML does not allow: remove it")
            self.fail()
        try:
            root = loader.get_single_node()
        except _YamlLimit as e:
            loader.dispose()
            self.add(e.problem_mark.line + 1, None, e.problem)
            self.fail()
        except yaml.MarkedYAMLError as e:
            loader.dispose()
            mark = e.problem_mark or e.context_mark
            context = e.context or ""
            if e.context_mark and mark and e.context_mark.line != mark.line:
                context += f" (from line {e.context_mark.line + 1})"
            what = " ".join(x for x in (context, e.problem) if x)
            self.add(mark.line + 1 if mark else None, None, f"YAML syntax error: {what}")
            self.fail()
        except yaml.YAMLError as e:
            loader.dispose()
            self.add(None, None, f"YAML error: {e}")
            self.fail()
        if root is None:
            loader.dispose()
            self.add(None, None, "is empty: write a `jobs:` list (see examples.yaml)")
            self.fail()
        return root, loader

    def _construct(self, loader, node, job: str | None):
        """The Python value of a node (safe constructors only); None plus a problem when it has none."""
        try:
            return loader.construct_object(node, deep=True), True
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or node.start_mark
            self.add(mark.line + 1, job, f"YAML error: {e.problem or e.context}")
            return None, False

    def _pairs(self, loader, node, job: str | None, where: str) -> list[tuple[str, Any, int]]:
        """(key, value node, line) of a mapping node; reports duplicate and non-text keys."""
        own_keys = {id(k) for k, _ in node.value}
        try:
            loader.flatten_mapping(node)  # resolves `<<: *anchor` merges like safe_load does
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or node.start_mark
            self.add(mark.line + 1, job, f"YAML error: {e.problem}")
            return []
        pairs: dict[str, tuple[str, Any, int]] = {}
        own: dict[str, int] = {}   # canonical key -> line, for keys written in this mapping itself
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key, ok = self._construct(loader, key_node, job)
            if not ok:
                continue
            if not isinstance(key, str):
                self.add(line, job, f"{where}key {_show(key)} is not a name")
                continue
            canon = _canonical(key)
            if id(key_node) in own_keys:
                if canon in own:
                    self.add(line, job, f"{where}{key!r} is set twice (first on line {own[canon]})")
                    continue
                own[canon] = line
            # A key written here overrides one merged in with `<<:` (merged pairs come first).
            pairs[canon] = (key, value_node, line)
        return list(pairs.values())

    def _check_root(self, root, loader) -> BatchSpec:
        if not isinstance(root, yaml.MappingNode):
            self.add(root.start_mark.line + 1, None,
                     "the file must be a mapping with a `jobs:` list (and optionally `defaults:`)")
            self.fail()
        sections = {}
        for key, node, line in self._pairs(loader, root, None, ""):
            if key in TOP_LEVEL_KEYS:
                sections[key] = (node, line)
            elif _canonical(key) in OPTION_SPECS:
                self.add(line, None, f"{key!r} is a refine option: put it under `defaults:` (for every job) "
                                     "or in a job")
            else:
                self.add(line, None, f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}")

        defaults = self._check_defaults(loader, *sections["defaults"]) if "defaults" in sections else {}
        if "jobs" not in sections:
            self.add(root.start_mark.line + 1, None, "there is no `jobs:` list: add one with at least one job")
            return BatchSpec(self.absolute, _plain(defaults), [])
        jobs_node, jobs_line = sections["jobs"]
        if isinstance(jobs_node, yaml.ScalarNode) and jobs_node.tag.endswith(":null"):
            self.add(jobs_line, None, "`jobs:` is empty: add at least one job with a prompt")
            return BatchSpec(self.absolute, _plain(defaults), [])
        if not isinstance(jobs_node, yaml.SequenceNode):
            self.add(jobs_line, None, "`jobs:` must be a list, each item a job (`- prompt: ...`)")
            return BatchSpec(self.absolute, _plain(defaults), [])
        if not jobs_node.value:
            self.add(jobs_line, None, "`jobs:` is empty: add at least one job with a prompt")

        jobs = [self._check_job(loader, node, i, defaults) for i, node in enumerate(jobs_node.value, start=1)]
        jobs = [j for j in jobs if j is not None]
        self._check_ids(jobs)
        return BatchSpec(self.absolute, _plain(defaults), [j for j, _ in jobs])

    # -- defaults and jobs ----------------------------------------------------------------------

    def _check_defaults(self, loader, node, line) -> dict[str, _Value]:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.add(line, None, "defaults: must be a mapping of refine options, e.g. `rounds: 4`")
            return {}
        values = {}
        for key, value_node, key_line in self._pairs(loader, node, None, "defaults: "):
            name = _canonical(key)
            if name in ("prompt", "id"):
                self.add(key_line, None, f"defaults: {key!r} belongs in each job, not in defaults")
                continue
            if name not in OPTION_SPECS and name != "image":
                self.add(key_line, None, f"defaults: unknown key {key!r}{_suggest(name, _valid_keys(False))}")
                continue
            value, ok = self._construct(loader, value_node, None)
            # Invalid values stay (as _INVALID) so jobs do not fall back to a default and report
            # follow-on problems that fixing this one line would make disappear.
            checked = self._check_value(name, value, key_line, None, "defaults: ") if ok else _INVALID
            values[name] = _Value(checked, key_line, key)
        return values

    def _check_job(self, loader, node, index: int, defaults: dict[str, _Value]):
        label = f"#{index}"
        line = node.start_mark.line + 1
        # A bare string is shorthand for {prompt: ...}: long prompt lists stay readable.
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str"):
            own = {"prompt": _Value(loader.construct_object(node), line, "prompt")}
        elif isinstance(node, yaml.MappingNode):
            own = {}
            pairs = self._pairs(loader, node, label, "")
            # The id first, so every other problem of this job can name it.
            for key, value_node, key_line in pairs:
                if key == "id":
                    value, ok = self._construct(loader, value_node, label)
                    if ok:
                        if isinstance(value, str) and _ID.match(value):
                            label = value
                            own["id"] = _Value(value, key_line, key)
                        else:
                            self._bad_id(value, key_line, label)
            for key, value_node, key_line in pairs:
                name = _canonical(key)
                if name == "id":
                    continue
                if name not in OPTION_SPECS and name not in JOB_KEYS:
                    self.add(key_line, label, f"unknown key {key!r}{_suggest(name, _valid_keys(True))}")
                    continue
                value, ok = self._construct(loader, value_node, label)
                if not ok:
                    own[name] = _Value(_INVALID, key_line, key)
                    continue
                checked = self._check_value(name, value, key_line, label, "")
                own[name] = _Value(checked, key_line, key)
        else:
            self.add(line, label, "a job must be a mapping with a prompt (`- prompt: ...`) or a plain prompt string")
            return None

        # Prompt.
        prompt = own.get("prompt")
        if prompt is None:
            self.add(line, label, "has no prompt: add `prompt: what the image should show`")
        elif prompt.value is None or (isinstance(prompt.value, str) and not prompt.value.strip()):
            self.add(prompt.line, label, "the prompt is empty: say what the image should show")
        prompt_text = prompt.value.strip() if prompt and isinstance(prompt.value, str) else ""

        # Merge: the job's keys override the defaults'; gen_args merge key by key; null unsets.
        merged: dict[str, _Value] = {k: v for k, v in defaults.items()}
        for name, v in own.items():
            if name in ("prompt", "id"):
                continue
            if name == "gen_args" and "gen_args" in merged and isinstance(v.value, dict) \
                    and isinstance(merged["gen_args"].value, dict):
                v = _Value({**merged["gen_args"].value, **v.value}, v.line, v.key)
            merged[name] = v
        invalid = {name for name, v in merged.items() if v.value is _INVALID}
        merged = {name: v for name, v in merged.items() if v.value is not _INVALID and v.value is not None}

        image = merged.pop("image", None)
        image_path, image_hash = None, None
        if image is not None:
            image_path = image.value
            if image_path not in self._images:  # each file is read once, however many jobs use it
                self._images[image_path] = self._check_image(image_path)
            image_hash, error = self._images[image_path]
            if error:
                self.add_for(image, defaults, label, image.line, error)
        has_image = image is not None or "image" in invalid

        task = self._check_task(merged, invalid, image, has_image, line, label, defaults)
        if "generator" not in invalid:  # a size the preset's pipeline would round down silently
            gen = merged.get("generator")
            size = {name: merged[name].value if name in merged else None for name in ("width", "height")}
            for name, problem in preset_size_problems(gen.value if gen else ("flux-kontext" if has_image else
                                                      "flux-dev"), size["width"], size["height"], flag=str):
                self.add_for(merged[name], defaults, label, merged[name].line, problem)

        explicit_id = own.get("id")
        job_id = explicit_id.value if explicit_id else f"job-{index:03d}"
        options = {name: v.value for name, v in merged.items()}
        return (JobSpec(id=job_id, prompt=prompt_text, image=image_path, options=options, line=line, index=index,
                        task=task, image_sha256=image_hash),
                (explicit_id.line if explicit_id else line, label, explicit_id is not None))

    def _bad_id(self, value, line, label):
        if not isinstance(value, str):
            hint = f": write id: \"{value}\"" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            self.add(line, label, f"id must be text, not {_show(value)}{hint}")
        else:
            self.add(line, label, f"id {value!r} is not file-name safe: use letters, digits, '-', '_' and '.', "
                                  "starting with a letter or digit, at most 64 characters")

    def _check_value(self, name: str, value: Any, line: int, job: str | None, where: str):
        """A value as written at `line` (in defaults or a job): checked, normalized, or _INVALID."""
        if value is None:
            if name == "prompt":
                return None  # reported as a missing prompt
            if name in OPTION_SPECS and OPTION_SPECS[name].default is not None:
                self.add(line, job, f"{where}{name} cannot be null: give a value or remove the key")
                return _INVALID
            return None  # null unsets an option inherited from defaults
        if name == "prompt":
            if not isinstance(value, str):
                hint = " (YAML reads yes/no/on/off as true/false)" if isinstance(value, bool) else ""
                self.add(line, job, f"the prompt must be text, not {_show(value)}{hint}: put it in quotes")
                return _INVALID
            return value
        if name == "image":
            if not isinstance(value, str) or not value.strip():
                self.add(line, job, f"{where}image must be a file path, not {_show(value)}")
                return _INVALID
            return (self.base / Path(value.strip()).expanduser()).resolve()
        try:
            value = check_option(name, value)
        except ValueError as e:
            self.add(line, job, f"{where}{e}")
            return _INVALID
        if name in ("generator", "critic"):
            return self._local_path(value)
        if name == "judge":
            return self._judge(value, line, job, where)
        return value

    def _judge(self, spec: str, line: int, job: str | None, where: str):
        """A judge spec with a path made absolute (relative to the file, like models), checked before
        anything loads (gcr.judge)."""
        from gcr.judge import METRICS, judge_problem

        prefix, sep, rest = spec.partition(":")
        metric = f"{prefix}:" if sep and prefix in METRICS else ""
        location = rest if metric else spec
        from gcr.presets import JUDGE_PRESETS, _looks_like_path

        if location not in JUDGE_PRESETS:
            candidate = self.base / Path(location.strip()).expanduser()
            if candidate.is_dir() or _looks_like_path(location.strip()):
                location = str(candidate.resolve())
        value = metric + location
        problem = judge_problem(value)
        if problem:
            self.add(line, job, f"{where}{problem}")
            return _INVALID
        return value

    def _local_path(self, spec: str) -> str:
        """Model paths in a batch file are relative to the file's folder, like images; presets and hub
        ids pass through. Returns an absolute path for anything that is (or is written as) a path."""
        from gcr.presets import CRITIC_PRESETS, GENERATOR_PRESETS, _looks_like_path

        if spec in GENERATOR_PRESETS or spec in CRITIC_PRESETS:
            return spec
        candidate = (self.base / Path(spec).expanduser())
        if candidate.is_dir() or _looks_like_path(spec):
            return str(candidate.resolve())
        return spec

    # -- cross-checks ---------------------------------------------------------------------------

    def _check_image(self, path: Path) -> tuple[str | None, str | None]:
        """(content sha256, None) for a readable image, else (None, what is wrong): the same check
        and pixel limit as --image (gcr.images)."""
        from gcr.images import ImageProblem, read_image

        try:
            _, digest = read_image(path)
        except ImageProblem as e:
            hint = "" if path.is_file() else f": check the path (relative paths start at {self.base})"
            return None, f"{e}{hint}"
        return digest, None

    def _check_task(self, merged, invalid, image, has_image, line, label, defaults) -> str | None:
        """The job's task as far as it is known without loading anything; reports conflicts."""
        if "task" in invalid or "generator" in invalid:
            return None  # already reported; guessing on would only add noise
        explicit = merged.get("task")
        gen = merged.get("generator")
        gen_spec = gen.value if gen else ("flux-kontext" if has_image else "flux-dev")
        gen_task, error = self._generator_task(gen_spec)
        if error:
            self.add_for(gen, defaults, label, gen.line if gen else line, error)
            return explicit.value if explicit else None
        task = gen_task
        if explicit is not None:
            if gen_task is not None and gen_task != explicit.value:
                kind = "an edit" if gen_task == EDIT else "a text-to-image"
                # Both from defaults: one problem in defaults, not one per job.
                both_defaults = _job_of(explicit, defaults, label) is None and gen is not None \
                    and _job_of(gen, defaults, label) is None
                message = (f"task is {explicit.value} but the generator {_short(gen_spec)} is {kind} model: "
                           "change the task or the generator")
                if both_defaults:
                    self.add(explicit.line, None, "defaults: " + message)
                else:
                    self.add(explicit.line, label, message)
                return None
            task = explicit.value
        if task == EDIT and not has_image:
            self.add(line, label, f"is an edit job ({_why(explicit, gen_spec)}) but has no image: add "
                                  "`image: path/to/source.png`")
        elif task == T2I and has_image:
            self.add(image.line if image else line, label,
                     f"is a text-to-image job ({_why(explicit, gen_spec)}) but has an image: drop `image:`, "
                     "or choose an edit generator such as flux-kontext")
        self._check_critic(merged, task, label, defaults)
        return task

    def _generator_task(self, spec: str) -> tuple[str | None, str | None]:
        """(task or None when unknown, error message or None) for a generator spec; cached."""
        key = ("generator", spec)
        if key not in self._models:
            self._models[key] = _generator_task(spec)
        return self._models[key]

    def _check_critic(self, merged, task, label, defaults) -> None:
        critic = merged.get("critic")
        if critic is None or "critic_url" in merged:  # a served critic ignores `critic`
            return
        key = ("critic", critic.value)
        if key not in self._models:
            self._models[key] = _critic_task(critic.value)
        critic_task, error = self._models[key]
        if error:
            self.add_for(critic, defaults, label, critic.line, error)
        elif critic_task is not None and task is not None and critic_task != task:
            self.add(critic.line, label, f"the critic {critic.value!r} judges {critic_task} results but this is "
                                         f"{'an edit' if task == EDIT else 'a text-to-image'} job: use a "
                                         f"rationalrewards-{task} critic or remove `critic:`")

    def _check_ids(self, jobs) -> None:
        seen: dict[str, tuple[int, str]] = {}
        for job, (id_line, label, explicit) in jobs:
            folded = job.id.lower()  # job-A and job-a collide on case-insensitive file systems
            if folded in seen:
                first_line, first_id = seen[folded]
                same = "" if first_id == job.id else f" ({first_id!r} differs only in case)"
                origin = "" if explicit else " (the id this job gets by default; give it an `id:`)"
                self.add(id_line, label, f"duplicate id {job.id!r}{origin}: already used on line {first_line}"
                                         f"{same}; ids must be unique")
            else:
                seen[folded] = (id_line, job.id)


_INVALID = object()  # a value that was reported as a problem and takes no further part


def _canonical(key: str) -> str:
    name = key.replace("-", "_")
    return ALIASES.get(name, name)


def _valid_keys(job: bool) -> list[str]:
    return ([*JOB_KEYS] if job else ["image"]) + list(OPTION_SPECS)


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key.lower(), list(valid), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid keys: {', '.join(valid)})"


def _job_of(value: _Value | None, defaults: dict, label: str) -> str | None:
    """Problems about a value inherited from `defaults` belong to defaults, not to each job."""
    if value is not None and any(value is d for d in defaults.values()):
        return None
    return label


def _short(spec: str) -> str:
    return repr(spec) if len(spec) <= 60 else repr("..." + spec[-57:])


def _why(explicit, gen_spec: str) -> str:
    return f"task: {explicit.value}" if explicit is not None else f"generator {_short(gen_spec)}"


def _plain(values: dict[str, _Value]) -> dict:
    return {name: v.value for name, v in values.items() if v.value is not None and v.value is not _INVALID}
