"""The critic on a serving engine that gcr starts itself: `vllm serve` or `transformers serve`.

    launch(engine=..., spec=..., task=..., home=...)   start a server, return a ready critic that
                                                        stops it on close (and at any exit of gcr)
    start_engine(..., detach=True)                      what `gcr critic start` keeps warm
    find_running(home, model, task, ...)                an engine kept warm for this critic, if any

The server is a child process on a free port of 127.0.0.1 (gcr.critics.serverproc keeps it from
outliving gcr); its log and a small state file live under `<runs-dir>/engines/`. gcr talks to it
through the served critic (gcr.critics.served), like any OpenAI-compatible server.

vLLM pins its own torch and transformers, so it lives in its own environment and gcr runs its
`vllm` executable: `--vllm-bin PATH`, else $GCR_VLLM_BIN, else `vllm` on the PATH. `transformers
serve` comes with gcr's own transformers (the [serving] extra) and also runs on a CPU.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from gcr.critics import serverproc
from gcr.errors import CriticUnavailable, GcrError, UsageError
from gcr.prompts import IMAGE_SLOTS, MAX_PIXELS, system_prompt, user_template
from gcr.records import TASKS, CritiqueRequest

VLLM = "vllm"
TRANSFORMERS_SERVE = "transformers-serve"
ENGINES = (VLLM, TRANSFORMERS_SERVE)

VLLM_BIN_ENV = "GCR_VLLM_BIN"          # where the vllm executable is, when not on the PATH
TIMEOUT_ENV = "GCR_ENGINE_TIMEOUT"     # start-up timeout in seconds, for refine and batch
START_TIMEOUT_S = 1200.0               # a first vLLM start downloads 17.5 GB and captures CUDA graphs
# SIGTERM lets vLLM shut its engine-core and worker processes down (SIGKILL orphans them, vLLM issue
# 55510). transformers serve is a single process with nothing to clean up: SIGKILL frees it at once.
DEATH_SIGNAL = {VLLM: signal.SIGTERM, TRANSFORMERS_SERVE: signal.SIGKILL}
STOP_GRACE_S = {VLLM: 30.0, TRANSFORMERS_SERVE: 5.0}

# Prompt-lookup (n-gram) speculation in vLLM: a critique restates and quotes the request, so drafts
# copied from the prompt are often right; greedy output is unchanged.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# Context budget: the prompt text (at most ~3 characters a token), the user's request, and each image
# at most MAX_PIXELS (gcr.prompts downscales larger ones) in 32x32-pixel tokens plus its two markers.
REQUEST_TOKENS = 1024
IMAGE_TOKENS = math.ceil(MAX_PIXELS / (32 * 32)) + 2
_DTYPE_NAMES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
                "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_WEIGHT_FILES = ("*.safetensors", "*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken")

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Command lines


def max_model_len(task: str, max_new_tokens: int) -> int:
    """The longest sequence a critique of `task` needs: its prompt plus `max_new_tokens`, rounded up."""
    text_tokens = (len(system_prompt(task)) + len(user_template(task))) // 3 + REQUEST_TOKENS
    total = text_tokens + IMAGE_SLOTS[task] * IMAGE_TOKENS + max_new_tokens
    return -(-total // 256) * 256


def vllm_command(binary: str, model: str, *, port: int, task: str, max_new_tokens: int, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None, speculate: bool = True,
                 quantization: str | None = None, allow_remote_code: bool = False) -> list[str]:
    """`vllm serve` for one critic on 127.0.0.1:`port`."""
    command = [
        binary, "serve", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len(task, max_new_tokens)),
        "--limit-mm-per-prompt", json.dumps({"image": IMAGE_SLOTS[task], "video": 0}),
        "--load-format", "safetensors",      # never unpickle weights
        "--generation-config", "vllm",       # gcr's requests say how to sample, not the checkpoint's file
        "--dtype", _dtype_name(dtype),
    ]
    if gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.3f}"]
    if speculate:
        command += ["--speculative-config", json.dumps(NGRAM)]
    if quantization:
        command += ["--quantization", quantization]
    if allow_remote_code:
        command.append("--trust-remote-code")
    return command


def transformers_serve_command(model_dir: str, *, port: int, device: str, dtype: str = "auto",
                               allow_remote_code: bool = False) -> list[str]:
    """`transformers serve` pinned to one local model directory (the positional FORCE_MODEL: the server
    preloads it, lists it alone in /v1/models and answers every request with it)."""
    if dtype == "auto":  # as the in-process critic: bf16 on CUDA, fp32 elsewhere
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", _dtype_name(dtype)]
    if allow_remote_code:
        command.append("--trust-remote-code")
    return command


def find_vllm(vllm_bin: str | None) -> str:
    """The vllm executable: --vllm-bin, else $GCR_VLLM_BIN, else `vllm` on the PATH."""
    given = vllm_bin or os.environ.get(VLLM_BIN_ENV)
    if given:
        path = Path(given).expanduser()
        if path.is_dir():
            path = path / "vllm"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
        where = "--vllm-bin" if vllm_bin else f"${VLLM_BIN_ENV}"
        raise UsageError(f"{where} points at {given}, which is not an executable vllm: give the path of "
                         "`vllm` inside the virtualenv where vLLM is installed (e.g. ~/vllm-env/bin/vllm).")
    found = shutil.which("vllm")
    if found:
        return found
    raise UsageError("vLLM is not installed where gcr can find it: install it in its own virtualenv "
                     "(python -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm) and pass "
                     f"--vllm-bin ~/vllm-env/bin/vllm or set {VLLM_BIN_ENV}, or use the transformers-serve "
                     "engine instead.")


def gpu_memory_utilization(budget_bytes: int, total_bytes: int) -> float:
    """vLLM's --gpu-memory-utilization is a fraction of the card's TOTAL memory that it claims at start
    (and refuses to start when that much is not free): the bytes it may use, as that fraction."""
    return max(0.05, min(0.95, budget_bytes / total_bytes))


def critic_gpu_bytes(model: str, task: str, max_new_tokens: int, batch: int = 8) -> int:
    """What a critic engine needs on the GPU: weights, the KV cache of `batch` critiques, the activations
    and a CUDA context of its own (gcr.memory's numbers)."""
    from gcr import memory

    footprint = memory.critic_footprint(
        "rationalrewards-edit", batch=batch, max_new_tokens=max_new_tokens,
        prompt_tokens=max_model_len(task, 0))
    weights = _weights_on_disk(Path(model)) if Path(model).is_dir() else footprint.weights
    return weights + footprint.activations + memory.RESERVE


# ---------------------------------------------------------------------------------------------
# Starting


def start_engine(*, engine: str, spec: str | None, task: str, home: Path, device: str = "auto",
                 dtype: str = "auto", max_new_tokens: int = 2048, allow_remote_code: bool = False,
                 vllm_bin: str | None = None, gpu_memory_bytes: int | None = None, speculate: bool = True,
                 quantization: str | None = None, ready_timeout: float | None = None, log: Log = lambda msg: None,
                 detach: bool = False,
                 longer: str = f"{TIMEOUT_ENV}=SECONDS") -> dict:
    """Start a critic engine and wait until it answers (at most `ready_timeout` seconds; default
    $GCR_ENGINE_TIMEOUT or START_TIMEOUT_S). Returns its state (also written under `home`/engines).
    Unless `detach`, the server dies with this process. `speculate` (n-gram drafts)
    and `quantization` (e.g. "fp8": changes outputs) apply to vLLM."""
    from gcr.critics.inprocess import resolve_critic

    if engine not in ENGINES:
        raise UsageError(f"unknown critic engine {engine!r}: expected one of {', '.join(ENGINES)}.")
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}.")
    timeout = start_timeout() if ready_timeout is None else ready_timeout
    source = resolve_critic(spec, task=task)
    device = _resolve_device(device)
    env = dict(os.environ)
    if engine == VLLM:
        binary = find_vllm(vllm_bin)
        model = source.location
        utilization = None
        if device.startswith("cuda"):
            # vLLM sees one card: the one asked for, as its device 0.
            index = int(device.partition(":")[2] or 0)
            if device.partition(":")[2]:
                env["CUDA_VISIBLE_DEVICES"] = _visible_device(index)
            budget = gpu_memory_bytes or critic_gpu_bytes(model, task, max_new_tokens)
            utilization = gpu_memory_utilization(budget, _gpu_total_bytes(index))

        def command(port):
            return vllm_command(binary, model, port=port, task=task, max_new_tokens=max_new_tokens, dtype=dtype,
                                gpu_memory_utilization=utilization, speculate=speculate,
                                quantization=quantization, allow_remote_code=allow_remote_code)
        limits = {"max_images": IMAGE_SLOTS[task], "max_new_tokens": max_new_tokens}
    else:
        _check_serving_installed()
        model = _local_safetensors_dir(source, allow_remote_code)

        def command(port):
            return transformers_serve_command(model, port=port, device=device, dtype=dtype,
                                              allow_remote_code=allow_remote_code)
        limits = {"max_images": None, "max_new_tokens": None}

    engines = engines_dir(home)
    for attempt in range(2):  # a port taken between choosing and binding it: once more on another
        port = serverproc.free_port()
        stem = f"{engine}-{_slug(source.id)}-{port}"
        url = f"http://127.0.0.1:{port}/v1"
        log(f"starting the {engine} critic engine for {source.id} on 127.0.0.1:{port}")
        server = serverproc.start(command(port), name=engine, url=url, log_path=engines / f"{stem}.log",
                                  env=env, detach=detach, death_signal=DEATH_SIGNAL[engine],
                                  grace=STOP_GRACE_S[engine])
        state = {"engine": engine, "critic": source.id, "model": model, "task": task, **limits,
                 "url": url, "port": port, "pid": server.pid,
                 "proc_start": serverproc.process_start_time(server.pid),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "log": str(server.log_path), "owner": None if detach else os.getpid(),
                 "state_file": str(engines / f"{stem}.json")}
        _write_state(state)
        server.on_stop = lambda state=state: _remove_state(state)
        try:
            server.wait_ready(timeout, progress=log, longer=longer)
        except serverproc.EngineStartError:
            if attempt == 0 and _port_taken(server.log_path):
                continue
            raise
        except BaseException:  # Ctrl-C while it starts: nothing is left behind
            server.stop()
            raise
        state["server"] = server
        return state
    raise AssertionError("unreachable")  # pragma: no cover


def launch(*, engine: str, spec: str | None, task: str, home: Path, max_new_tokens: int = 2048,
           log: Log = lambda msg: None, request_timeout: float | None = None, **options) -> "EngineCritic":
    """The `engine` backend of gcr.critics.load: start a server for the critic, return a ready critic
    that owns it (close() stops it). `request_timeout` is the served critic's per-request timeout
    (None: its default); `options` go to start_engine."""
    state = start_engine(engine=engine, spec=spec, task=task, home=home, max_new_tokens=max_new_tokens,
                         log=log, **options)
    try:
        return EngineCritic(state, task=task, max_tokens=max_new_tokens, owned=True, timeout=request_timeout)
    except BaseException:
        state["server"].stop()
        raise


def start_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return START_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds: set it to e.g. 1800, or unset it.")
    return seconds


# ---------------------------------------------------------------------------------------------
# The critic


class EngineCritic:
    """A served critic on an engine: one gcr started for this command (`owned`: close() stops it) or
    one found running (`gcr critic start`)."""

    def __init__(self, state: dict, *, task: str, max_tokens: int, owned: bool, timeout: float | None = None):
        from gcr import critics

        self.state, self.owned = state, owned
        self.id = state["critic"]
        self.engine = state["engine"]
        self._served = critics.load("served", url=state["url"], task=task, max_tokens=max_tokens,
                                    **({} if timeout is None else {"timeout": timeout}))

    @property
    def url(self) -> str:
        return self._served.url

    @property
    def task(self) -> str:
        return self._served.task

    @task.setter
    def task(self, value: str) -> None:  # the other task's prompts on the same engine
        self._served = copy.copy(self._served)
        self._served.task = value

    def critique(self, requests: Sequence[CritiqueRequest], retry: bool = False) -> list[str]:
        self._check_running()  # a dead engine: say so now, not after the client's retries
        try:
            return self._served.critique(requests, retry=retry)
        except GcrError:
            self._check_running()
            raise

    def _check_running(self) -> None:
        server = self.state.get("server")
        if server is not None and not server.running():
            raise CriticUnavailable(f"the {self.engine} critic engine stopped (exit code "
                                    f"{server.popen.returncode}): see its log at {server.log_path}.")
        if server is None and not self.owned and not _alive(self.state):
            raise CriticUnavailable(f"the {self.engine} critic engine at {self.url} (pid {self.state['pid']}) "
                                    "is no longer running: start it again with gcr critic start.")

    def describe(self) -> dict:
        return {**self._served.describe(), "id": self.id, "backend": "engine", "engine": self.engine,
                "model": self.state["model"],
                "engine_started_by": "this command" if self.owned else "gcr critic start"}

    def close(self) -> None:
        """Close the client; stop the engine if this critic started it."""
        close_client = getattr(self._served, "close", None)  # its connection pool, where it has one
        if callable(close_client):
            close_client()
        server = self.state.pop("server", None)
        if self.owned and server is not None:
            server.stop()

    def __repr__(self) -> str:
        return f"EngineCritic(engine={self.engine!r}, url={self.url!r}, id={self.id!r})"


# ---------------------------------------------------------------------------------------------
# Engines kept warm between commands (gcr critic start|status|stop)


def engines_dir(home: Path) -> Path:
    return Path(home) / "engines"


def list_engines(home: Path) -> tuple[list[dict], list[dict]]:
    """(running, gone): the recorded engines whose process runs, each with `answers` (its model list
    answers now), and the records of engines that are gone, which are deleted."""
    running, gone = [], []
    for path in sorted(engines_dir(home).glob("*.json")):
        state = _read_state(path)
        if state is None:
            continue
        if _alive(state):
            state["answers"] = serverproc.probe(state["url"]) is not None
            running.append(state)
        else:
            _remove_state(state)
            gone.append(state)
    return running, gone


def find_running(home: Path, model: str, task: str, max_new_tokens: int) -> tuple[dict | None, str | None]:
    """A warm engine (started by `gcr critic start`) that serves `model` and can judge `task` with
    `max_new_tokens`: (its state, None), or (None, why a running engine for it cannot be used)."""
    if not engines_dir(home).is_dir():
        return None, None
    reason = None
    for state in list_engines(home)[0]:
        if state.get("owner") is not None or state.get("model") != model or not state["answers"]:
            continue
        if state.get("max_images") is not None and state["max_images"] < IMAGE_SLOTS[task]:
            reason = (f"the running {state['engine']} critic engine for {state['critic']} was started for "
                      f"{state['task']} critiques (one image): start one with `gcr critic start --task {task}`")
            continue
        if state.get("max_new_tokens") is not None and state["max_new_tokens"] < max_new_tokens:
            reason = (f"the running {state['engine']} critic engine for {state['critic']} allows at most "
                      f"{state['max_new_tokens']} new tokens: pass --max-new-tokens {state['max_new_tokens']}, "
                      f"or restart it with --max-new-tokens {max_new_tokens}")
            continue
        return state, None
    return None, reason


def connect_running(state: dict, *, task: str, max_tokens: int, timeout: float | None = None) -> EngineCritic:
    return EngineCritic(state, task=task, max_tokens=max_tokens, owned=False, timeout=timeout)


def stop_engine(state: dict) -> bool:
    """Stop a recorded engine's process group and delete its record. False when it was already gone."""
    stopped = False
    if _alive(state):
        stopped = serverproc.stop_group(state["pid"], STOP_GRACE_S.get(state.get("engine"), 10.0))
    _remove_state(state)
    return stopped


def _alive(state: dict) -> bool:
    """The recorded process still runs and is the same process (not a later one with its pid)."""
    pid = state.get("pid")
    if not isinstance(pid, int) or not serverproc.pid_alive(pid):
        return False
    recorded, now = state.get("proc_start"), serverproc.process_start_time(pid)
    return recorded is None or now is None or recorded == now


def _write_state(state: dict) -> None:
    path = Path(state["state_file"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in state.items() if k != "server"}, indent=2))
    os.replace(tmp, path)


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not {"pid", "url", "engine", "model"} <= set(state):
        return None
    state["state_file"] = str(path)
    return state


def _remove_state(state: dict) -> None:
    try:
        Path(state["state_file"]).unlink()
    except (OSError, KeyError):
        pass


# ---------------------------------------------------------------------------------------------
# Helpers


def _dtype_name(dtype: str) -> str:
    name = _DTYPE_NAMES.get(dtype.lower())
    if name is None:
        raise UsageError(f"unknown dtype {dtype!r}: expected auto, bf16, fp16 or fp32.")
    return name


def _resolve_device(device: str) -> str:
    if device == "cpu":  # nothing to check, and no torch import
        return device
    from gcr.devices import resolve_device

    return resolve_device(device)


def _visible_device(index: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # already remapped: keep the user's numbering
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(ids):
            return ids[index]
    return str(index)


def _gpu_total_bytes(index: int) -> int:
    import torch

    return torch.cuda.mem_get_info(index)[1]


def _check_serving_installed() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"`transformers serve` needs {' and '.join(missing)}: pip install "
                         "'transformers[serving]' in gcr's environment.")


def _local_safetensors_dir(source, allow_remote_code: bool) -> str:
    """A local directory for `transformers serve` that holds safetensors weights: transformers prefers
    them over pickled ones, and `serve` has no switch to forbid the latter. Hub ids are downloaded first
    (safetensors and config files only)."""
    path = Path(source.location)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = list(_WEIGHT_FILES) + (["*.py"] if allow_remote_code else [])
        try:
            path = Path(snapshot_download(source.location, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - hub and network errors come in many types
            raise GcrError(f"cannot download the critic {source.id} ({type(exc).__name__}): check the name and "
                           "your network or Hugging Face cache, or pass a local directory.") from None
    if not any(path.rglob("*.safetensors")):
        raise UsageError(f"the critic {source.id} has no safetensors weights in {path}: gcr loads safetensors "
                         "only; convert the checkpoint with save_pretrained(safe_serialization=True).")
    return str(path.resolve())


def _weights_on_disk(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.safetensors"))


def _slug(text: str) -> str:
    from gcr.store import slug

    return slug(Path(text).name if Path(text).is_absolute() else text, 40)


def _port_taken(log_path: Path) -> bool:
    try:
        tail = log_path.read_bytes()[-4096:].decode("utf-8", errors="replace").lower()
    except OSError:
        return False
    return "address already in use" in tail or "errno 98" in tail
