"""The served critic against a real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions
format and misbehaves on cue: slow, dropped, 5xx, 429, malformed replies, auth."""
import base64
import io
import json
import time

import pytest
from PIL import Image

from gcr import prompts
from gcr.critics import Critic
from gcr.records import CritiqueRequest
from gcr.errors import GcrError, UsageError
from gcr.critics.served import ServedCritic
from tests.critic_server import FakeServer, free_port

KEY = "sk-test-s3cret-value"


@pytest.fixture
def server():
    srv = FakeServer().start()
    yield srv
    srv.stop()


def critic(server, **kw):
    kw.setdefault("task", "t2i")
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5)
    return ServedCritic(server.url, **kw)


def req(text, size=(32, 24), color="red", source=None):
    return CritiqueRequest(text, Image.new("RGB", size, color), source_image=source)


def decode_png(url):
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "PNG"
    return img


# -- happy path -------------------------------------------------------------------------------------


def test_t2i_requests_are_sent_in_the_documented_layout_and_answers_come_back_in_order(server):
    server.delay = 0.02
    c = critic(server, concurrency=3, max_tokens=321)
    assert c.check() == "tiger/critic" and c.id == "tiger/critic"
    assert isinstance(c, Critic)
    texts = [f"request {i} with {{braces}} and <image>" for i in range(7)]
    out = c.critique([req(t, size=(20 + i, 10)) for i, t in enumerate(texts)])
    assert out == [f"critique of {t}" for t in texts]

    assert len(server.posts) == 7
    for headers, body in server.posts:
        assert body["model"] == "tiger/critic"
        assert body["max_tokens"] == 321 and body["temperature"] == 0.0
        system, user = body["messages"]
        assert system == {"role": "system", "content": prompts.load_prompt("t2i_system")}
        assert user["role"] == "user"
        assert [p["type"] for p in user["content"]] == ["text", "image_url", "text"]
        assert "Authorization" not in headers
    sizes = sorted(decode_png(b["messages"][1]["content"][1]["image_url"]["url"]).size for _, b in server.posts)
    assert sizes == sorted((20 + i, 10) for i in range(7))


def test_edit_requests_send_the_source_image_first(server):
    c = critic(server, task="edit")
    source = Image.new("RGB", (40, 30), (0, 0, 255))
    [text] = c.critique([req("make it red", size=(30, 40), color=(255, 0, 0), source=source)])
    assert text == "critique of make it red"
    user = server.posts[0][1]["messages"][1]
    assert [p["type"] for p in user["content"]] == ["text", "image_url", "text", "image_url", "text"]
    first, second = (decode_png(p["image_url"]["url"]) for p in user["content"][1::2])
    assert first.size == (40, 30) and first.convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert second.size == (30, 40) and second.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_large_images_are_downscaled_before_sending(server):
    critic(server).critique([req("big", size=(2000, 1000))])
    img = decode_png(server.posts[0][1]["messages"][1]["content"][1]["image_url"]["url"])
    assert img.size[0] * img.size[1] <= 802_816


def test_concurrency_bounds_the_requests_in_flight(server):
    server.delay = 0.1
    critic(server, concurrency=2).critique([req(str(i)) for i in range(6)])
    assert server.max_in_flight == 2


def test_critique_picks_the_model_itself_when_not_checked_first(server):
    assert critic(server).critique([req("x")]) == ["critique of x"]
    assert len(server.gets) == 1


def test_retry_requests_sample_with_a_fixed_seed(server):
    critic(server, model="tiger/critic").critique([req("x")], retry=True)
    body = server.posts[0][1]
    assert body["temperature"] > 0 and body["seed"] == 0 and 0 < body["top_p"] <= 1


def test_a_bare_host_url_gets_the_v1_base(server):
    host = server.url.removesuffix("/v1")
    assert ServedCritic(host + "/", task="t2i").url == server.url
    assert ServedCritic(host, task="t2i").check() == "tiger/critic"


# -- transient failures are retried -----------------------------------------------------------------


def test_a_slow_reply_times_out_and_the_retry_succeeds(server):
    server.script = [("sleep", 1.0)]
    c = critic(server, model="tiger/critic", timeout=0.3)
    start = time.monotonic()
    assert c.critique([req("slow")]) == ["critique of slow"]
    assert len(server.posts) == 2
    assert time.monotonic() - start < 1.0   # did not wait for the slow answer


def test_a_dropped_connection_is_retried(server):
    server.script = [("drop",), ("drop",)]
    assert critic(server, model="tiger/critic").critique([req("d")]) == ["critique of d"]
    assert len(server.posts) == 3


def test_server_errors_are_retried_until_success(server):
    server.script = [("status", 500, {"error": {"message": "boom"}}), ("status", 503, b"unavailable")]
    assert critic(server, model="tiger/critic").critique([req("e")]) == ["critique of e"]
    assert len(server.posts) == 3


def test_429_waits_as_long_as_retry_after_says(server):
    server.script = [("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"})]
    c = critic(server, model="tiger/critic", backoff=0.01)
    start = time.monotonic()
    assert c.critique([req("r")]) == ["critique of r"]
    assert time.monotonic() - start >= 0.3
    assert len(server.posts) == 2


@pytest.mark.parametrize("bad", [b"not json at all", b'{"choices": []}', b'{"object": "error"}', b"[1, 2]"])
def test_malformed_replies_are_retried(server, bad):
    server.script = [("raw", bad)]
    assert critic(server, model="tiger/critic").critique([req("m")]) == ["critique of m"]
    assert len(server.posts) == 2


# -- failures that stay ------------------------------------------------------------------------------


def test_persistent_server_errors_fail_after_the_retries_with_one_clear_sentence(server):
    server.script = [("status", 500, {"error": {"message": "CUDA out of memory"}})] * 10
    with pytest.raises(GcrError) as info:
        critic(server, model="tiger/critic", retries=2).critique([req("p")])
    message = str(info.value)
    assert len(server.posts) == 3
    assert server.url in message and "3 times" in message and "HTTP 500" in message
    assert "CUDA out of memory" in message and "\n" not in message


def test_persistent_malformed_replies_fail_as_gcr_errors(server):
    server.script = [("raw", b"<html>gateway</html>")] * 10
    with pytest.raises(GcrError, match="not JSON"):
        critic(server, model="tiger/critic", retries=1).critique([req("p")])
    assert len(server.posts) == 2


def test_a_client_error_fails_at_once_with_the_servers_message(server):
    server.script = [("status", 400, {"error": {"message": "max_tokens is too large: 9999 > 4096"}})]
    with pytest.raises(GcrError, match="max_tokens is too large") as info:
        critic(server, model="tiger/critic").critique([req("c")])
    assert not isinstance(info.value, UsageError) and len(server.posts) == 1


def test_one_failed_request_fails_the_batch(server):
    server.script = [("status", 400, {"error": {"message": "bad image"}})]
    with pytest.raises(GcrError, match="bad image"):
        critic(server, model="tiger/critic", concurrency=1).critique([req(str(i)) for i in range(4)])
    assert len(server.posts) == 1   # the queued ones were cancelled


def test_an_unreachable_server_is_one_clear_sentence_from_check():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(GcrError) as info:
        ServedCritic(url, task="t2i").check()
    message = str(info.value)
    assert message.startswith(f"cannot reach the critic server at {url}")
    assert "vllm serve" in message and "\n" not in message


def test_an_unreachable_server_fails_critique_after_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    c = ServedCritic(url, model="m", task="t2i", retries=2, backoff=0.01)
    with pytest.raises(GcrError, match="failed 3 times"):
        c.critique([req("x")])


@pytest.mark.parametrize("models, model, match", [
    (["a", "b"], None, "several models"),
    (["a"], "b", "does not serve 'b'"),
])
def test_check_rejects_ambiguous_or_missing_models(server, models, model, match):
    server.models = models
    with pytest.raises(UsageError, match=match):
        critic(server, model=model).check()


def test_a_wrong_path_is_a_usage_error_that_names_the_v1_base(server):
    with pytest.raises(UsageError, match="/v1"):
        ServedCritic(server.url.removesuffix("/v1") + "/api", task="t2i").check()


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host/v1", ""])
def test_non_http_urls_are_usage_errors(url):
    with pytest.raises(UsageError, match="http"):
        ServedCritic(url, task="t2i")


# -- the API key -------------------------------------------------------------------------------------


def test_the_api_key_is_sent_as_a_bearer_header_from_the_named_variable(server, monkeypatch):
    monkeypatch.setenv("GCR_TEST_KEY", KEY)
    c = critic(server, api_key_env="GCR_TEST_KEY")
    assert c.critique([req("k")]) == ["critique of k"]
    assert server.gets[0]["Authorization"] == f"Bearer {KEY}"
    assert server.posts[0][0]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(c) and KEY not in json.dumps(c.describe())


def test_the_api_key_never_appears_in_error_messages(server, monkeypatch):
    monkeypatch.setenv("GCR_TEST_KEY", KEY)
    echo = {"error": {"message": f"upstream rejected Authorization: Bearer {KEY}"}}
    server.script = [("status", 502, echo)] * 3 + [("status", 400, echo)]
    with pytest.raises(GcrError) as retried:
        critic(server, model="tiger/critic", api_key_env="GCR_TEST_KEY", retries=2).critique([req("a")])
    with pytest.raises(GcrError) as at_once:
        critic(server, model="tiger/critic", api_key_env="GCR_TEST_KEY").critique([req("b")])
    for info in (retried, at_once):
        assert KEY not in str(info.value) and "***" in str(info.value)


def test_a_rejected_key_is_a_usage_error(server, monkeypatch):
    monkeypatch.setenv("GCR_TEST_KEY", KEY)
    server.script = [("models", 401, {"error": {"message": "invalid api key"}})]
    with pytest.raises(UsageError, match="API key") as info:
        critic(server, api_key_env="GCR_TEST_KEY").check()
    assert KEY not in str(info.value)


def test_an_unset_key_variable_is_a_usage_error_naming_it(monkeypatch):
    monkeypatch.delenv("GCR_TEST_KEY", raising=False)
    with pytest.raises(UsageError, match="GCR_TEST_KEY is not set"):
        ServedCritic("http://127.0.0.1:1/v1", api_key_env="GCR_TEST_KEY", task="t2i")
