"""Critic engines that gcr starts itself (gcr.critics.engine) and keeps warm (`gcr critic ...`).

vLLM cannot run here, so its launcher path runs against a stand-in `vllm` executable written by the
tests: it records its command line and environment, serves /v1/models and /v1/chat/completions on
the port it was given, and, like vLLM, has a child process of its own that it stops on SIGTERM.
`transformers serve` is real: an independently written OpenAI-compatible server on the tiny critic.
Each of its starts costs ~10-20 s on 2 cores, so only three tests start one.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gcr.cli import app
from gcr.critics import engine, serverproc
from gcr.errors import GcrError, UsageError
from gcr.records import CritiqueRequest
from tests.fakes import critique_text

ROOT = Path(__file__).parents[1]
TINY = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu", "--max-new-tokens", "16"]

STANDIN = textwrap.dedent('''\
    import json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    record = os.environ["STANDIN_RECORD"]
    with open(record, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    mode = os.environ.get("STANDIN_MODE", "serve")
    if mode == "exit":
        print("RuntimeError: boom, no GPU here", flush=True)
        sys.exit(3)
    # Like vLLM's engine core: a child process that the server stops on SIGTERM.
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(record + ".worker", "w") as f:
        f.write(str(worker.pid))

    def on_term(*_):
        worker.kill()
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    if mode == "silent":  # never listens
        time.sleep(600)
    args = sys.argv[1:]
    model, port = args[1], int(args[args.index("--port") + 1])
    reply = open(os.environ["STANDIN_REPLY"]).read()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send(self, payload):
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.send({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                                   "owned_by": "standin"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send({"id": "c1", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": reply}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


@pytest.fixture
def vllm(tmp_path, monkeypatch):
    """A stand-in `vllm` executable; `.calls()` reads what each start recorded."""
    class StandIn:
        path = tmp_path / "vllm-env" / "bin" / "vllm"
        record = tmp_path / "vllm-calls.jsonl"

        def calls(self):
            return [json.loads(line) for line in self.record.read_text().splitlines()]

        def worker_pid(self):
            return int(Path(str(self.record) + ".worker").read_text())

    standin = StandIn()
    standin.path.parent.mkdir(parents=True)
    standin.path.write_text(f"#!{sys.executable}\n{STANDIN}")
    standin.path.chmod(0o755)
    reply = tmp_path / "reply.txt"
    reply.write_text(critique_text(3, 3, refined="a red cube, glossy"))
    monkeypatch.setenv("STANDIN_RECORD", str(standin.record))
    monkeypatch.setenv("STANDIN_REPLY", str(reply))
    monkeypatch.delenv(engine.VLLM_BIN_ENV, raising=False)
    return standin


@pytest.fixture
def critic_dir(tmp_path):
    """Enough of a checkpoint for gcr to name it (vLLM, not gcr, would read the weights)."""
    path = tmp_path / "my-critic"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def no_engine_left(tmp_path):
    """Stop anything a failing test left running under tmp_path, and fail if a test left anything."""
    yield
    running, _ = engine.list_engines(tmp_path / "runs")
    for state in running:
        engine.stop_engine(state)
    assert not running, f"engines left running: {running}"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s")


def server_processes(marker: str) -> list[int]:
    """Live processes whose command line contains `marker` (a path unique to the test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and serverproc.pid_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


# ---------------------------------------------------------------------------------------------
# The vLLM launcher, against the stand-in


def test_vllm_gets_the_flags_that_follow_from_task_tokens_and_safety(vllm, critic_dir, tmp_path):
    state = engine.start_engine(engine="vllm", spec=str(critic_dir), task="edit", home=tmp_path / "runs",
                                device="cpu", max_new_tokens=512, vllm_bin=str(vllm.path), ready_timeout=30)
    try:
        [call] = vllm.calls()
        argv = call["argv"]
        option = lambda name: argv[argv.index(name) + 1]  # noqa: E731
        assert argv[:2] == ["serve", str(critic_dir.resolve())]
        assert option("--host") == "127.0.0.1" and int(option("--port")) == state["port"]
        assert int(option("--max-model-len")) == engine.max_model_len("edit", 512)
        # Two images of at most MAX_PIXELS, the prompt and 512 new tokens fit; the model's own 256k do not.
        assert 512 + 2 * 784 < int(option("--max-model-len")) < 8192
        assert json.loads(option("--limit-mm-per-prompt")) == {"image": 2, "video": 0}
        assert json.loads(option("--speculative-config"))["method"] == "ngram"
        assert option("--load-format") == "safetensors"
        assert "--trust-remote-code" not in argv and "--gpu-memory-utilization" not in argv  # CPU: no GPU share
        # Ready means answering: the state points at a live server that lists the model.
        assert serverproc.probe(state["url"]) == [str(critic_dir.resolve())]
        assert Path(state["log"]).parent == tmp_path / "runs" / "engines"
        assert Path(state["state_file"]).is_file() and state["owner"] == os.getpid()
    finally:
        state["server"].stop()
    assert not serverproc.pid_alive(state["pid"]) and not serverproc.pid_alive(vllm.worker_pid())
    assert not port_open(state["port"]) and not Path(state["state_file"]).exists()


def test_vllm_on_a_gpu_gets_the_room_the_generator_leaves(vllm, critic_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "_resolve_device", lambda device: "cuda:1")
    monkeypatch.setattr(engine, "_gpu_total_bytes", lambda index: 80 * 2**30)
    state = engine.start_engine(engine="vllm", spec=str(critic_dir), task="t2i", home=tmp_path / "runs",
                                gpu_memory_bytes=30 * 2**30, vllm_bin=str(vllm.path), ready_timeout=30)
    state["server"].stop()
    [call] = vllm.calls()
    argv = call["argv"]
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.375"  # 30 of 80 GiB
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert call["cuda_visible_devices"] == "1"  # vLLM sees the card asked for as its device 0


def test_fp8_and_remote_code_are_opt_in_flags():
    plain = engine.vllm_command("vllm", "m", port=1, task="t2i", max_new_tokens=64)
    chosen = engine.vllm_command("vllm", "m", port=1, task="t2i", max_new_tokens=64, quantization="fp8",
                                 allow_remote_code=True, speculate=False)
    assert "--quantization" not in plain and "--trust-remote-code" not in plain
    assert chosen[chosen.index("--quantization") + 1] == "fp8" and "--trust-remote-code" in chosen
    assert "--speculative-config" not in chosen
    assert engine.gpu_memory_utilization(30, 80) == 0.375
    assert engine.gpu_memory_utilization(200, 80) == 0.95  # never the whole card


def test_the_memory_plan_leaves_the_engine_its_share_on_a_gpu(monkeypatch):
    """With --critic-engine the critic is another process on the same GPU: the generator's plan fits in
    what the engine needs left over, and the engine gets what the plan leaves."""
    from gcr import memory, runner

    free = 60 * 2**30
    monkeypatch.setattr(memory, "free_gpu_bytes", lambda device: free)
    opts = runner.ModelOptions(generator="flux-kontext", critic_engine="vllm")
    plan = runner.choose_memory_plan(opts, "edit", "cuda", log=lambda msg: None)
    share = memory.critic_footprint("rationalrewards-edit", max_new_tokens=2048)
    assert not plan.critic_in_process and plan.free_bytes == free
    budget = plan.free_bytes - plan.need_bytes
    assert budget >= share.weights + share.activations
    in_process = runner.choose_memory_plan(runner.ModelOptions(generator="flux-kontext"), "edit", "cuda",
                                           log=lambda msg: None)
    assert in_process.critic_in_process  # the same card without an engine: the critic is planned in-process


def test_a_missing_vllm_says_how_to_install_it(tmp_path, monkeypatch, critic_dir):
    monkeypatch.delenv(engine.VLLM_BIN_ENV, raising=False)
    result = invoke("refine", "a red cube", "-g", "flux-dev", "--critic", critic_dir, "--critic-engine", "vllm",
                    "--runs-dir", tmp_path / "runs", env={"PATH": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert "virtualenv" in result.stderr and "--vllm-bin" in result.stderr and "Traceback" not in result.output
    missing = invoke("refine", "a red cube", "--critic-engine", "vllm", "--vllm-bin", tmp_path / "nope",
                     "--runs-dir", tmp_path / "runs")
    assert missing.exit_code == 2 and "not an executable vllm" in missing.stderr
    with pytest.raises(UsageError, match="GCR_VLLM_BIN"):
        monkeypatch.setenv(engine.VLLM_BIN_ENV, str(tmp_path / "nope"))
        engine.find_vllm(None)


def test_a_server_that_never_answers_times_out_with_its_log_named(vllm, critic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "silent")
    shown = []
    with pytest.raises(GcrError) as caught:
        engine.start_engine(engine="vllm", spec=str(critic_dir), task="t2i", home=tmp_path / "runs", device="cpu",
                            vllm_bin=str(vllm.path), ready_timeout=2.5, log=shown.append)
    message = str(caught.value)
    [log] = (tmp_path / "runs" / "engines").glob("*.log")
    assert "did not answer" in message and str(log) in message and message.count(". ") == 0
    assert any("starting the vllm critic engine" in m and " s · log: " in m for m in shown)  # progress
    [call] = vllm.calls()
    assert not serverproc.pid_alive(call["pid"]) and not serverproc.pid_alive(vllm.worker_pid())
    assert not list((tmp_path / "runs" / "engines").glob("*.json"))


def test_a_server_that_exits_at_start_up_is_reported_with_its_last_line(vllm, critic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "exit")
    with pytest.raises(GcrError, match=r"exited during start-up \(exit code 3; last line: RuntimeError: boom"):
        engine.start_engine(engine="vllm", spec=str(critic_dir), task="t2i", home=tmp_path / "runs", device="cpu",
                            vllm_bin=str(vllm.path), ready_timeout=30)


def test_kill_9_of_the_parent_stops_the_engine_and_its_children(vllm, critic_dir, tmp_path):
    """The parent-death signal: nothing in the parent runs after SIGKILL, the kernel still tells the server."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import json, sys, time
            from pathlib import Path
            from gcr.critics import engine
            state = engine.start_engine(engine="vllm", spec={str(critic_dir)!r}, task="t2i",
                                        home=Path({str(tmp_path / 'runs')!r}), device="cpu",
                                        vllm_bin={str(vllm.path)!r}, ready_timeout=30)
            print(json.dumps({{"pid": state["pid"], "port": state["port"]}}), flush=True)
            time.sleep(600)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        started = json.loads(parent.stdout.readline())
        assert serverproc.pid_alive(started["pid"]) and port_open(started["port"])
        worker = vllm.worker_pid()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not serverproc.pid_alive(started["pid"]), what="server gone")
        wait_until(lambda: not serverproc.pid_alive(worker), what="its child gone")
        assert not port_open(started["port"])
    finally:
        parent.kill()
        if "started" in locals():  # a failure above must not leave the stand-in running
            serverproc.stop_group(started["pid"], grace=2)


def test_refine_and_batch_with_the_vllm_engine_start_it_once_and_stop_it(vllm, tiny_dir, critic_dir, tmp_path):
    result = invoke("refine", "a red cube", "-g", tiny_dir("flux"), "--critic", critic_dir, "--critic-engine", "vllm",
                    "--vllm-bin", vllm.path, "--rounds", 1, *TINY, "--json", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["rounds"][0]["overall"] == 3.0  # the stand-in's critique, read and scored
    critic = record["settings"]["critic"]
    assert critic["backend"] == "engine" and critic["engine"] == "vllm" and critic["id"] == str(critic_dir)
    assert critic["engine_started_by"] == "this command"
    [call] = vllm.calls()
    assert not serverproc.pid_alive(call["pid"]) and not serverproc.pid_alive(vllm.worker_pid())
    assert not list((tmp_path / "runs" / "engines").glob("*.json"))

    batch = tmp_path / "jobs.yaml"
    batch.write_text(textwrap.dedent(f"""
        defaults:
          generator: {tiny_dir("flux")}
          critic: {critic_dir}
          critic_engine: vllm
          vllm_bin: {vllm.path}
          rounds: 1
          steps: 2
          width: 32
          height: 32
          device: cpu
          max_new_tokens: 16
        jobs:
          - prompt: a red cube
          - prompt: a blue ball
    """))
    done = invoke("batch", batch, "--json", "--quiet", "--runs-dir", tmp_path / "runs")
    assert done.exit_code == 0, done.output
    assert [j["status"] for j in json.loads(done.stdout)["jobs"]] == ["completed", "completed"]
    assert len(vllm.calls()) == 2  # one engine for both jobs
    assert not serverproc.pid_alive(vllm.calls()[1]["pid"])


def test_ctrl_c_of_refine_stops_the_engine(vllm, tiny_dir, critic_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcr.cli", "refine", "a slow fox", "-g", str(tiny_dir("flux")), "--critic",
         str(critic_dir), "--critic-engine", "vllm", "--vllm-bin", str(vllm.path), "--rounds", "100",
         "--patience", "100", "--target", "4", "--on-converged", "reseed", *TINY, "--quiet",
         "--runs-dir", str(tmp_path / "runs")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: list((tmp_path / "runs" / "engines").glob("*.json")) and
                   any(p.suffix == ".png" for p in (tmp_path / "runs").rglob("*.png")), timeout=120,
                   what="a round with the engine up")
        [call] = vllm.calls()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert not serverproc.pid_alive(call["pid"]) and not serverproc.pid_alive(vllm.worker_pid())
        assert not list((tmp_path / "runs" / "engines").glob("*.json")), stderr
    finally:
        proc.kill()


def test_an_engine_that_dies_mid_run_is_reported_at_once(vllm, critic_dir, tmp_path):
    from PIL import Image

    from gcr.errors import CriticUnavailable

    critic = engine.launch(engine="vllm", spec=str(critic_dir), task="t2i", home=tmp_path / "runs", device="cpu",
                           vllm_bin=str(vllm.path), ready_timeout=30)
    request = CritiqueRequest("a red cube", Image.new("RGB", (16, 16), (200, 0, 0)))
    assert critic.critique([request]) == [critique_text(3, 3, refined="a red cube, glossy")]
    serverproc.stop_group(critic.state["pid"], grace=5)
    started = time.monotonic()
    with pytest.raises(CriticUnavailable, match=r"critic engine stopped \(exit code 0\): see its log at .*\.log"):
        critic.critique([request])
    assert time.monotonic() - started < 2  # not after the client's retries and backoff
    critic.close()


def test_batch_uses_a_warm_engine_for_the_same_critic(vllm, tiny_dir, critic_dir, tmp_path):
    runs = tmp_path / "runs"
    state = engine.start_engine(engine="vllm", spec=str(critic_dir), task="t2i", home=runs, device="cpu",
                                max_new_tokens=512, vllm_bin=str(vllm.path), ready_timeout=30, detach=True)
    try:
        # Only an engine that can take the job: its images per prompt and its token limit.
        model = str(critic_dir.resolve())
        assert engine.find_running(runs, model, "t2i", 256)[0]["pid"] == state["pid"]
        none, why = engine.find_running(runs, model, "edit", 256)
        assert none is None and "gcr critic start --task edit" in why
        none, why = engine.find_running(runs, model, "t2i", 1024)
        assert none is None and "at most 512 new tokens" in why

        batch = tmp_path / "jobs.yaml"
        batch.write_text(textwrap.dedent(f"""
            defaults: {{generator: {tiny_dir("flux")}, critic: {critic_dir}, rounds: 1, steps: 2, width: 32,
                        height: 32, device: cpu, max_new_tokens: 16}}
            jobs: [{{prompt: a red cube}}, {{prompt: a blue ball}}]
        """))
        done = invoke("batch", batch, "--json", "--quiet", "--runs-dir", runs)
        assert done.exit_code == 0, done.output
        assert "using the running vllm critic engine for" in done.stderr
        assert [j["best_overall"] for j in json.loads(done.stdout)["jobs"]] == [3.0, 3.0]  # its critiques
        assert len(vllm.calls()) == 1 and serverproc.pid_alive(state["pid"])  # not started again, still warm
    finally:
        engine.stop_engine(state)
    assert not serverproc.pid_alive(state["pid"]) and not Path(state["state_file"]).exists()


def test_transformers_serve_gets_safetensors_only_and_no_remote_code(critic_dir, tmp_path):
    command = engine.transformers_serve_command("/m", port=5, device="cpu")
    assert command[command.index("serve") + 1] == "/m"  # the one model it serves (FORCE_MODEL)
    assert command[command.index("--dtype") + 1] == "float32" and "--trust-remote-code" not in command
    assert "--trust-remote-code" in engine.transformers_serve_command("/m", port=5, device="cpu",
                                                                      allow_remote_code=True)
    (critic_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UsageError, match="no safetensors weights"):
        engine.start_engine(engine="transformers-serve", spec=str(critic_dir), task="t2i", home=tmp_path / "runs",
                            device="cpu")
    assert not (tmp_path / "runs" / "engines").exists()  # refused before anything started


def test_status_removes_the_record_of_an_engine_that_died(vllm, critic_dir, tmp_path):
    state = engine.start_engine(engine="vllm", spec=str(critic_dir), task="t2i", home=tmp_path / "runs",
                                device="cpu", vllm_bin=str(vllm.path), ready_timeout=30, detach=True)
    serverproc.stop_group(state["pid"], grace=5)  # gone behind gcr's back
    result = invoke("critic", "status", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0
    assert "no longer running" in result.stderr and "no critic engine is running" in result.stderr
    assert not Path(state["state_file"]).exists()
    # A recorded pid that a later process reuses is not taken for the engine (its start time differs).
    recorded = {**state, "pid": os.getpid(), "proc_start": "1"}
    recorded.pop("server")
    Path(state["state_file"]).write_text(json.dumps(recorded))
    assert engine.list_engines(tmp_path / "runs") == ([], [{**recorded, "state_file": state["state_file"]}])


# ---------------------------------------------------------------------------------------------
# transformers serve, for real


def test_refine_with_transformers_serve_runs_end_to_end_and_leaves_no_server(tiny_dir, tmp_path, no_engine_left):
    critic = tmp_path / "serve-critic-e2e"  # a path unique to this test, to find its server by
    shutil.copytree(tiny_dir("critic"), critic)
    result = invoke("refine", "a red cube", "-g", tiny_dir("flux"), "--critic", critic, "--critic-engine",
                    "transformers-serve", "--rounds", 2, "--seed", 5, *TINY, "--json", "--quiet",
                    "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 3, result.output  # completed; a random critic's text cannot be scored
    record = json.loads(result.stdout)
    assert record["status"] == "completed" and [r["index"] for r in record["rounds"]] == [1, 2]
    assert all(isinstance(r["raw_critique"], str) and r["raw_critique"] for r in record["rounds"])
    assert record["settings"]["critic"]["engine"] == "transformers-serve"
    [log] = (tmp_path / "runs" / "engines").glob("transformers-serve-*.log")
    port = int(log.stem.rpartition("-")[2])
    assert "POST /v1/chat/completions" in log.read_text()  # the critiques came from the server
    assert server_processes(str(critic)) == [] and not port_open(port)
    assert not list((tmp_path / "runs" / "engines").glob("*.json"))


def test_kill_9_of_refine_leaves_no_transformers_server(tiny_dir, tmp_path, no_engine_left):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcr.cli", "refine", "a slow fox", "-g", str(tiny_dir("flux")), "--critic",
         str(tiny_dir("critic")), "--critic-engine", "transformers-serve", "--rounds", "100", "--patience", "100",
         *TINY, "--quiet", "--runs-dir", str(runs)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or any(
            serverproc.probe(json.loads(p.read_text())["url"]) for p in (runs / "engines").glob("*.json")),
            timeout=180, what="the server answering")
        assert proc.poll() is None, proc.communicate()
        [state_file] = (runs / "engines").glob("*.json")
        state = json.loads(state_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: not serverproc.pid_alive(state["pid"]), timeout=5, what="server gone")
        assert not port_open(state["port"])
        # The record outlived gcr; the next status finds the engine gone and removes it.
        result = invoke("critic", "status", "--runs-dir", runs)
        assert "no longer running" in result.stderr and not state_file.exists()
    finally:
        proc.kill()
        proc.communicate()


def test_critic_start_status_reuse_and_stop(tiny_dir, tmp_path, no_engine_left):
    runs = tmp_path / "runs"
    critic = str(tiny_dir("critic"))
    started = invoke("critic", "start", "--engine", "transformers-serve", "--critic", critic, "--device", "cpu",
                     "--runs-dir", runs, "--json", "--quiet")
    assert started.exit_code == 0, started.output
    state = json.loads(started.stdout)
    assert serverproc.pid_alive(state["pid"]) and state["owner"] is None  # outlives the command

    again = invoke("critic", "start", "--engine", "transformers-serve", "--critic", critic, "--device", "cpu",
                   "--runs-dir", runs)
    assert again.exit_code == 0 and "already running" in again.stderr

    status = invoke("critic", "status", "--runs-dir", runs, "--json")
    [listed] = json.loads(status.stdout)
    assert listed["pid"] == state["pid"] and listed["answers"] is True
    assert "ready" in invoke("critic", "status", "--runs-dir", runs).stdout

    # refine without any engine flag uses it instead of loading the critic, and says so.
    result = invoke("refine", "a red cube", "-g", tiny_dir("flux"), "--critic", critic, "--rounds", 1,
                    *TINY, "--json", "--quiet", "--runs-dir", runs)
    assert result.exit_code == 3, result.output
    assert "using the running transformers-serve critic engine" in result.stderr
    described = json.loads(result.stdout)["settings"]["critic"]
    assert described["backend"] == "engine" and described["engine_started_by"] == "gcr critic start"
    assert serverproc.pid_alive(state["pid"])  # still warm for the next command

    stopped = invoke("critic", "stop", "--runs-dir", runs)
    assert stopped.exit_code == 0 and f"pid {state['pid']}" in stopped.stderr
    wait_until(lambda: not serverproc.pid_alive(state["pid"]), timeout=10, what="server gone")
    assert not port_open(state["port"])
    assert "no critic engine is running" in invoke("critic", "status", "--runs-dir", runs).stderr
