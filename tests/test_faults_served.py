"""Fault injection on the served critic: a scripted OpenAI-compatible server on 127.0.0.1 fails in
every way a real one does, and gcr must end each case in one clear sentence, a final run status and
every completed round kept, with bounded waits and the API key never sent elsewhere or written down.

The first half drives `ServedCritic` directly (fast, exact); the second runs the real CLI on the tiny
flux pipeline and checks exit code, stderr, the store and the image files.
"""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from gcr.cli import app
from gcr.critics import served
from gcr.critics.served import CriticRefused, ServedCritic
from gcr.errors import CriticUnavailable, GcrError, UsageError
from gcr.records import CritiqueRequest
from gcr.store import RunStore
from tests.critic_server import FakeServer, free_port
from tests.fakes import critique_text

ROOT = Path(__file__).parents[1]
# '/', '+' and '=' make the key's JSON- and URL-escaped forms differ from the key itself.
KEY = "sk-fault/K3y+s3cret=42"
KEY_ENV = "GCR_FAULT_KEY"
ESCAPED = (KEY, json.dumps(KEY)[1:-1], urllib.parse.quote(KEY, safe=""), urllib.parse.quote_plus(KEY))
READABLE = critique_text(2.0, 2.0, refined="a red fox, sharper fur")


@pytest.fixture
def server():
    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def other():
    """A second server, on another origin: the target of hostile redirects."""
    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_S", 0.01)


def critic(server, **kw):
    kw.setdefault("task", "t2i")
    kw.setdefault("model", "tiger/critic")
    kw.setdefault("timeout", 5)
    return ServedCritic(server.url, **kw)


def req(text="a red fox"):
    return CritiqueRequest(text, Image.new("RGB", (16, 16), "red"))


def one_sentence(message: str):
    assert message and "\n" not in message and "Traceback" not in message
    assert message.rstrip().endswith(".")


# -- the client: retries, backoff, timeouts ----------------------------------------------------------


def test_the_official_clients_retry_loop_makes_the_attempts(server):
    """The retry count the client puts on each attempt shows whose loop is running."""
    server.script = [("status", 503, {"error": {"message": "warming up"}})] * 2
    assert critic(server).critique([req("x")]) == ["critique of x"]
    assert [h["x-stainless-retry-count"] for h, _ in server.posts] == ["0", "1", "2"]
    assert server.posts[0][0]["user-agent"].startswith("OpenAI/Python")


def test_5xx_until_the_retries_run_out_is_critic_unavailable(server):
    server.script = [("status", 502, {"error": {"message": "bad gateway"}}, {"Retry-After": "0"})] * 9
    with pytest.raises(CriticUnavailable) as info:
        critic(server, retries=3).critique([req()])
    assert not isinstance(info.value, UsageError) and len(server.posts) == 4
    assert "failed 4 times in a row" in str(info.value) and "HTTP 502: bad gateway" in str(info.value)
    one_sentence(str(info.value))


def test_connection_refused_during_critique_is_critic_unavailable():
    c = ServedCritic(f"http://127.0.0.1:{free_port()}/v1", model="m", task="t2i", retries=2)
    with pytest.raises(CriticUnavailable, match="failed 3 times") as info:
        c.critique([req()])
    assert "ConnectError" in str(info.value)
    one_sentence(str(info.value))


@pytest.mark.parametrize("body, says", [
    (b"<html>502 gateway</html>", "not JSON"),
    (json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode(), "null"),
    (b'{"id": "x", "object": "chat.completion"}', "no choices"),
])
def test_an_unusable_200_is_retried_then_critic_unavailable(server, body, says):
    server.script = [("raw", body)] * 9
    with pytest.raises(CriticUnavailable, match=says) as info:
        critic(server, retries=2).critique([req()])
    assert len(server.posts) == 3 and "failed 3 times" in str(info.value)
    one_sentence(str(info.value))


@pytest.mark.parametrize("code, says", [(401, "--api-key-env"), (403, "--api-key-env"), (404, "/v1")])
def test_a_refusal_fails_at_once_for_every_job(server, code, says):
    server.script = [("status", code, {"error": {"message": "no"}})] * 9
    with pytest.raises(CriticRefused, match=says) as info:
        critic(server).critique([req(str(i)) for i in range(3)])
    assert isinstance(info.value, CriticUnavailable) and isinstance(info.value, UsageError)
    assert len(server.posts) <= 3   # never retried: each request tried at most once
    one_sentence(str(info.value))


@pytest.mark.parametrize("action, says", [
    (("models", 200, b"<html>login page</html>"), "not JSON"),
    (("models", 503, {"error": {"message": "loading weights"}}), "HTTP 503: loading weights"),
])
def test_a_model_check_that_gets_no_model_list_is_critic_unavailable(server, action, says):
    server.script = [action]
    with pytest.raises(CriticUnavailable, match=says) as info:
        ServedCritic(server.url, task="t2i").check()
    assert not isinstance(info.value, UsageError) and len(server.gets) == 1   # one attempt only
    one_sentence(str(info.value))


def test_a_request_specific_4xx_stays_a_plain_error(server):
    server.script = [("status", 422, {"error": {"message": "image too large"}})]
    with pytest.raises(GcrError, match="image too large") as info:
        critic(server).critique([req()])
    assert not isinstance(info.value, CriticUnavailable) and len(server.posts) == 1


def test_retry_after_is_honoured_up_to_the_cap(server, monkeypatch):
    monkeypatch.setattr(served, "MAX_DELAY_S", 0.3)
    server.script = [("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": "100"})]
    start = time.monotonic()
    assert critic(server).critique([req("r")]) == ["critique of r"]
    assert 0.3 <= time.monotonic() - start < 5   # waited the cap, not the 100 s asked for


def test_a_retry_after_beyond_the_clients_limit_fails_at_once(server):
    server.script = [("status", 429, {"error": {"message": "quota"}}, {"Retry-After": "3600"})] * 3
    start = time.monotonic()
    with pytest.raises(CriticUnavailable, match="Retry-After: 3600") as info:
        critic(server).critique([req()])
    assert time.monotonic() - start < 2 and len(server.posts) == 1
    one_sentence(str(info.value))


def test_a_hanging_server_is_given_up_within_the_total_timeout(server):
    server.script = [("hang",)] * 20
    c = critic(server, timeout=0.3, retries=10)
    start = time.monotonic()
    with pytest.raises(CriticUnavailable, match=r"no usable answer within 0\.9 s") as info:
        c.critique([req()])
    elapsed = time.monotonic() - start
    assert elapsed < 0.9 + 0.5, elapsed           # 3 x the attempt timeout, whatever the retries
    # How many 0.3 s attempts fit in 0.9 s depends on the machine's load; never more than three.
    assert 1 <= len(server.posts) <= 3 and "no answer within 0.3 s" in str(info.value)
    one_sentence(str(info.value))


def test_a_server_trickling_its_reply_is_abandoned_by_the_watchdog(server, monkeypatch):
    """A read timeout never fires while bytes keep coming; the per-request bound still holds."""
    monkeypatch.setattr(served, "WATCHDOG_GRACE_S", 0.2)
    server.script = [("trickle", 0.05)]
    start = time.monotonic()
    with pytest.raises(CriticUnavailable, match="no complete answer within"):
        critic(server, timeout=0.2, retries=0).critique([req()])
    assert time.monotonic() - start < 0.6 + 0.2 + 0.5


def test_a_slow_server_within_the_timeout_succeeds(server):
    server.delay = 0.4
    assert critic(server, timeout=2).critique([req("s"), req("t")]) == ["critique of s", "critique of t"]
    assert len(server.posts) == 2


def test_ctrl_c_returns_at_once_and_leaves_only_daemon_threads(server):
    """Ctrl-C reaches the waiting thread at once; the request still on the wire cannot keep the
    process alive, because its thread is a daemon."""
    server.script = [("hang",)]
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        critic(server, timeout=30).critique([req()])
    assert time.monotonic() - start < 0.3 + 0.5
    workers = [t for t in threading.enumerate() if t.name.startswith("gcr-critic")]
    assert workers and all(t.daemon for t in workers)


def test_a_closed_critic_reopens_its_connection_pool(server):
    c = critic(server)
    assert c.critique([req("a")]) == ["critique of a"]
    c.close()
    assert c.critique([req("b")]) == ["critique of b"]


def test_non_finite_or_non_positive_timeouts_are_usage_errors():
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(UsageError, match="finite and positive"):
            ServedCritic("http://127.0.0.1:1/v1", task="t2i", timeout=bad)


# -- keys stay home -----------------------------------------------------------------------------------


def test_a_redirect_to_another_origin_is_refused_and_the_key_never_leaves(server, other, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = [("redirect", 307, other.url + "/chat/completions")]
    with pytest.raises(CriticRefused) as info:
        critic(server, api_key_env=KEY_ENV).critique([req()])
    message = str(info.value)
    assert server.origin in message and other.origin in message and KEY not in message
    assert other.posts == [] and other.gets == []   # nothing at all reached the other origin
    one_sentence(message)


def test_the_model_check_refuses_a_foreign_redirect_too(server, other, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = [("models", 302, b"", {"Location": other.url + "/models"})]
    with pytest.raises(CriticRefused, match="another origin"):
        ServedCritic(server.url, task="t2i", api_key_env=KEY_ENV).check()
    assert other.gets == []


def test_a_same_origin_redirect_is_followed_with_the_key(server, monkeypatch):
    """Documented choice: the server that redirects already holds the key."""
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = [("redirect", 307, server.url + "/chat/completions")]
    assert critic(server, api_key_env=KEY_ENV).critique([req("r")]) == ["critique of r"]
    assert [h["Authorization"] for h, _ in server.posts] == [f"Bearer {KEY}"] * 2


def test_a_key_echoed_in_a_critique_is_scrubbed_in_every_form(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.answer = lambda body: "echo: " + " | ".join(ESCAPED)
    [text] = critic(server, api_key_env=KEY_ENV).critique([req()])
    assert text == "echo: " + " | ".join(["***"] * 4)


def test_a_key_echoed_in_a_long_error_body_leaves_no_fragment(server, monkeypatch):
    """The message quotes 300 characters: the key is scrubbed before the cut, not after."""
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = [("status", 400, ("x" * 290 + KEY).encode())]
    with pytest.raises(GcrError) as info:
        critic(server, api_key_env=KEY_ENV).critique([req()])
    assert KEY[:6] not in str(info.value) and "***" in str(info.value)


def test_the_openai_clients_own_environment_never_reaches_the_critic(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-openai-key")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-user")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Gateway-Token: hush\nAuthorization: Bearer sk-custom")
    c = ServedCritic(server.url, task="t2i")
    assert c.critique([req("e")]) == ["critique of e"]
    for headers in [server.gets[0]] + [h for h, _ in server.posts]:
        names = {n.lower() for n in headers}
        assert "authorization" not in names and "x-gateway-token" not in names
        assert "openai-organization" not in names


def test_credentials_in_the_url_are_refused():
    with pytest.raises(UsageError, match="--api-key-env"):
        ServedCritic("http://user:pw@127.0.0.1:8000/v1", task="t2i")


def test_importing_the_cli_and_the_critic_does_not_import_openai():
    code = ("import sys, gcr.cli, gcr.critics.served, gcr.batchfile; "
            "bad = [m for m in ('openai', 'httpx', 'httpx2') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- the real CLI on the tiny flux pipeline -----------------------------------------------------------

TINY = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu", "--quiet", "--json"]


def refine(flux, url, runs, *extra, rounds=2, env=None):
    args = ["refine", "a red fox", "-g", str(flux), "--critic-url", url, "--rounds", str(rounds),
            "--patience", "9", "--seed", "1", "--runs-dir", str(runs), *TINY, *map(str, extra)]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200", **(env or {})})


def stderr_sentence(result) -> str:
    """The one line the CLI wrote on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    one_sentence(lines[0])
    return lines[0]


def stored_run(runs, status, n_rounds):
    """The run in the store, with its final status and every round's image readable."""
    run = RunStore(runs).get_run("last")
    assert run.status == status, run.status
    assert [r.index for r in run.rounds] == list(range(1, n_rounds + 1))
    for r in run.rounds:
        for c in r.candidates:
            with Image.open(c.image) as im:
                im.load()
    return run


@pytest.fixture
def flux(tiny_dir):
    return tiny_dir("flux")


@pytest.fixture
def readable(server):
    server.answer = lambda body: READABLE
    return server


def test_cli_5xx_until_retries_run_out_fails_the_run_and_keeps_its_images(flux, readable, tmp_path):
    readable.script = [("status", 503, {"error": {"message": "engine dead"}}, {"Retry-After": "0"})] * 9
    result = refine(flux, readable.url, tmp_path)
    assert result.exit_code == 1
    line = stderr_sentence(result)
    assert "failed 5 times in a row" in line and "HTTP 503: engine dead" in line
    run = stored_run(tmp_path, "failed", 1)
    assert run.rounds[0].error and run.rounds[0].overall is None and "engine dead" in run.error


def test_cli_server_failing_after_round_one_keeps_round_one(flux, readable, tmp_path):
    readable.script = [("ok",)] + [("status", 500, {"error": {"message": "out of memory"}},
                                    {"Retry-After": "0"})] * 9
    result = refine(flux, readable.url, tmp_path, rounds=3)
    assert result.exit_code == 1
    assert "out of memory" in stderr_sentence(result)
    run = stored_run(tmp_path, "failed", 2)
    assert run.rounds[0].overall == 2.0 and run.rounds[0].error is None   # round 1 intact, scored
    assert "out of memory" in run.rounds[1].error and "critique failed" in run.error
    assert json.loads(result.stdout)["status"] == "failed"


def test_cli_unreachable_server_is_one_sentence_before_any_run(flux, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = refine(flux, url, tmp_path)
    assert result.exit_code == 1
    assert stderr_sentence(result).startswith(f"error: cannot reach the critic server at {url}")
    assert not (tmp_path / "gcr.sqlite3").exists() or RunStore(tmp_path).list_runs() == []


def test_cli_server_going_away_mid_run_fails_the_run(flux, readable, tmp_path):
    def answer_then_die(body):
        threading.Thread(target=readable.stop).start()   # refuse every connection from now on
        return READABLE

    readable.answer = answer_then_die
    result = refine(flux, readable.url, tmp_path, "--critic-timeout", 2, rounds=3)
    assert result.exit_code == 1
    assert "ConnectError" in stderr_sentence(result)
    stored_run(tmp_path, "failed", 2)


@pytest.mark.parametrize("body, says", [
    (b"Internal error, see logs", "not JSON"),
    (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}).encode(),
     "null"),
    (b'{"object": "chat.completion", "choices": []}', "no choices"),
])
def test_cli_unusable_replies_fail_the_run_after_the_retries(flux, readable, tmp_path, body, says):
    readable.script = [("raw", body)] * 9
    result = refine(flux, readable.url, tmp_path)
    assert result.exit_code == 1
    line = stderr_sentence(result)
    assert says in line and "failed 5 times" in line
    stored_run(tmp_path, "failed", 1)
    assert len(readable.posts) == 5


def test_cli_rejected_key_at_the_model_check_is_a_usage_error(flux, server, tmp_path):
    server.script = [("models", 401, {"error": {"message": "invalid api key"}})]
    result = refine(flux, server.url, tmp_path, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY})
    assert result.exit_code == 2
    line = stderr_sentence(result)
    assert "HTTP 401" in line and "--api-key-env" in line
    assert KEY not in result.output and KEY not in result.stderr


@pytest.mark.parametrize("code", [401, 403])
def test_cli_key_refused_mid_run_fails_the_run_at_once(flux, readable, tmp_path, code):
    readable.script = [("status", code, {"error": {"message": "key revoked"}})] * 9
    result = refine(flux, readable.url, tmp_path, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY})
    assert result.exit_code == 1
    assert f"HTTP {code}" in stderr_sentence(result)
    stored_run(tmp_path, "failed", 1)
    assert len(readable.posts) == 1   # not retried


def test_cli_wrong_path_is_a_usage_error_naming_the_v1_base(flux, server, tmp_path):
    result = refine(flux, server.origin + "/api", tmp_path)
    assert result.exit_code == 2
    assert "/v1" in stderr_sentence(result)


def test_cli_429_with_retry_after_waits_and_completes(flux, readable, tmp_path):
    readable.script = [("status", 429, {"error": {"message": "busy"}}, {"Retry-After": "0.3"})]
    start = time.monotonic()
    result = refine(flux, readable.url, tmp_path, rounds=1)
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start >= 0.3
    assert result.stderr.strip() == ""
    assert stored_run(tmp_path, "completed", 1).rounds[0].overall == 2.0


def test_cli_hanging_server_fails_within_the_critic_timeout(flux, server, tmp_path):
    server.script = [("hang",)] * 20
    start = time.monotonic()
    result = refine(flux, server.url, tmp_path, "--critic-timeout", 0.4)
    assert result.exit_code == 1
    assert time.monotonic() - start < 15
    assert "no usable answer within 1.2 s" in stderr_sentence(result)
    stored_run(tmp_path, "failed", 1)


def test_cli_slow_server_within_the_timeout_succeeds(flux, readable, tmp_path):
    readable.delay = 0.5
    result = refine(flux, readable.url, tmp_path, "--critic-timeout", 5, rounds=1)
    assert result.exit_code == 0, result.output
    assert stored_run(tmp_path, "completed", 1).rounds[0].overall == 2.0


def test_cli_critic_timeout_out_of_range_is_a_usage_error(flux, server, tmp_path):
    for bad in ("0", "-3", "1e9"):
        result = refine(flux, server.url, tmp_path, "--critic-timeout", bad)
        assert result.exit_code == 2 and "--critic-timeout" in result.stderr
        assert "Traceback" not in result.output
    assert server.posts == []


def test_cli_foreign_redirect_fails_the_run_and_the_other_origin_sees_nothing(flux, readable, other, tmp_path):
    readable.script = [("redirect", 308, other.url + "/chat/completions")]
    result = refine(flux, readable.url, tmp_path, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY})
    assert result.exit_code == 1
    line = stderr_sentence(result)
    assert readable.origin in line and other.origin in line and KEY not in line
    assert other.posts == [] and other.gets == []
    stored_run(tmp_path, "failed", 1)


def every_stored_byte(runs: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file())


def test_cli_key_echoed_in_a_critique_is_never_stored_or_printed(flux, server, tmp_path):
    server.answer = lambda body: critique_text(2.0, 2.0, refined=f"a red fox, token {KEY}") + \
        "\n" + " ".join(ESCAPED)
    result = refine(flux, server.url, tmp_path, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY})
    assert result.exit_code == 0, result.output
    run = stored_run(tmp_path, "completed", 2)
    assert run.rounds[1].prompt == "a red fox, token ***"    # the refined request, scrubbed
    shown = CliRunner().invoke(app, ["show", "last", "--json", "--runs-dir", str(tmp_path)])
    for text in (result.stdout, result.stderr, shown.stdout):
        assert not any(form in text for form in ESCAPED)
    stored = every_stored_byte(tmp_path)
    assert not any(form.encode() in stored for form in ESCAPED)
    assert b"token ***" in stored   # the scan did see the rounds' text


def test_cli_key_echoed_in_an_error_is_never_stored_or_printed(flux, server, tmp_path):
    server.script = [("status", 400, {"error": {"message": f"bad header Authorization: Bearer {KEY}"}})]
    result = refine(flux, server.url, tmp_path, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY})
    assert result.exit_code == 1
    assert "Bearer ***" in stderr_sentence(result)
    stored_run(tmp_path, "failed", 1)
    for text in (result.stdout, result.stderr):
        assert not any(form in text for form in ESCAPED)
    assert not any(form.encode() in every_stored_byte(tmp_path) for form in ESCAPED)


def test_cli_batch_whose_critic_fails_records_every_job_failed(flux, server, tmp_path):
    server.script = [("hang",)] * 30
    file = tmp_path / "jobs.yaml"
    file.write_text(yaml.safe_dump({
        "defaults": {"generator": str(flux), "critic_url": server.url, "critic_timeout": 0.3, "steps": 2,
                     "width": 32, "height": 32, "device": "cpu", "rounds": 2, "seed": 1},
        "jobs": [{"id": f"job{i}", "prompt": f"a fox number {i}"} for i in range(3)]}))
    runs = tmp_path / "runs"
    start = time.monotonic()
    result = CliRunner().invoke(app, ["batch", str(file), "--runs-dir", str(runs), "--quiet"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert time.monotonic() - start < 30
    assert "Traceback" not in result.output
    store = RunStore(runs)
    [batch] = store.db.execute("SELECT id, status FROM batches").fetchall()
    assert batch["status"] == "failed"
    for i in range(3):
        assert f"failed job{i}:" in result.stdout   # the failed jobs are listed
    for job in store.get_batch(batch["id"])["jobs"]:
        run = store.get_run(job["run_id"])
        assert run.status == "failed" and "no usable answer within 0.9 s" in run.error
        assert [r.index for r in run.rounds] == [1] and Path(run.rounds[0].image).is_file()


def test_ctrl_c_during_a_hanging_request_exits_at_once_and_marks_the_run_interrupted(flux, tmp_path):
    """A real process: worker threads must not keep it alive after Ctrl-C."""
    srv = FakeServer().start()
    srv.answer = lambda body: READABLE
    srv.script = [("ok",)] + [("hang",)] * 5
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "gcr.cli", "refine", "a red fox", "-g", str(flux), "--critic-url", srv.url,
           "--critic-timeout", "60", "--rounds", "3", "--patience", "9", *TINY, "--runs-dir", str(runs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while len(srv.posts) < 2:   # round 1 answered, round 2 on the wire, hanging
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the round 2 critique never started"
            time.sleep(0.05)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    assert proc.returncode == 130, stderr
    assert took < 2.0, f"the process lingered {took:.1f} s after Ctrl-C"
    assert "Traceback" not in stderr and "completed rounds are kept" in stderr
    run = stored_run(runs, "interrupted", 1)
    assert run.rounds[0].overall == 2.0
