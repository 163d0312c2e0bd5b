"""A critic behind an OpenAI-compatible server (vLLM's `/v1/chat/completions`), via the official client.

The authors serve RationalRewards this way (`vllm serve TIGER-Lab/RationalRewards-8B-T2I --port 8000`);
the server batches concurrent requests itself, so this client only keeps `concurrency` requests in
flight. The `openai` client does the HTTP: connection pooling, timeouts, and its retry loop for
connection errors, timeouts, 408/409/429 and 5xx (honouring `Retry-After`). gcr paces that loop
itself (through the client's own retry hooks, see `_paced_client_class`) so that:

- waits are bounded: each attempt may take `timeout` seconds (`--critic-timeout`), and one request
  all its attempts and pauses together `total_timeout` seconds (3 x `timeout` unless set);
- pauses follow `backoff` (doubling, at most `MAX_DELAY_S`, or the server's Retry-After, also capped),
  and stop at once when another request of the same batch has failed for good;
- a 200 that is not a usable completion (not JSON, no choices, `content: null`) is retried too,
  within the same attempt budget.

What cannot be helped by retrying fails at once: 401/403 (the key), 404 (the URL or the model) and a
redirect to another origin raise `CriticRefused`; a server that stays unreachable or keeps failing
raises `CriticUnavailable`; both make the loop fail every job waiting on the critic at once. Any
other 4xx concerns one request and stays a plain `GcrError`.

Keys stay home: the API key is read from an environment variable, sent only as a Bearer header to
the origin of `--critic-url` (a redirect to another origin is refused; a same-origin redirect is
followed, since that server already holds the key), and scrubbed from everything the server sends
back before it is returned, stored or printed. The client's own environment variables
(`OPENAI_API_KEY`, `OPENAI_ORG_ID`, `OPENAI_CUSTOM_HEADERS`, ...) never reach the critic server.

Requests run on daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's
threads at exit, so a request hanging on the wire would keep a Ctrl-C'd process alive for the rest
of its timeout. `openai` is imported on first use, never at import time.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
import time
import urllib.parse
from typing import Callable, Sequence

from gcr.critics.base import RETRY_SAMPLING, RETRY_SEED
from gcr.errors import CriticUnavailable, GcrError, UsageError
from gcr.prompts import build_openai_messages
from gcr.records import TASKS, CritiqueRequest

# Seconds one attempt may take. The reply is not streamed, so this covers a whole critique: 2048
# tokens (the default --max-new-tokens) at ~17 tok/s, several times what an 8B critic on vLLM
# writes even when the server is busy with a batch, yet a dead server is noticed in 2 minutes,
# not the 5 the client defaults to (10 for the openai client).
DEFAULT_TIMEOUT_S = 120.0
TOTAL_TIMEOUT_FACTOR = 3   # one request, every attempt and pause included: 3 x the attempt timeout
CRITIC_TIMEOUT_HELP = ("Served critic: seconds one request may take to answer; with its retries a request "
                       f"gives up after {TOTAL_TIMEOUT_FACTOR}x this.")
RETRIES = 4                # extra attempts per request after a transient failure
BACKOFF_S = 1.0            # first pause between attempts, doubled each time (1+2+4+8 s for 4 retries)
MAX_DELAY_S = 60.0         # longest pause between attempts, whatever backoff or Retry-After say
CHECK_TIMEOUT_S = 30.0     # the health check answers fast or not at all
CONNECT_TIMEOUT_S = 10.0   # a server that does not accept a connection in 10 s is not there
WATCHDOG_GRACE_S = 2.0     # past its total timeout, a request still on the wire is abandoned
_MESSAGE_CHARS = 300       # how much of a server's error message to quote
_NO_KEY = "gcr-no-key"     # satisfies the client's credentials check; the request hook never sends it
# Headers an OpenAI-compatible server gets; anything else the client adds from its environment
# (organization, project, OPENAI_CUSTOM_HEADERS) is dropped. x-stainless-* are the client's own.
_SENT_HEADERS = frozenset({"host", "accept", "accept-encoding", "connection", "content-type",
                           "content-length", "transfer-encoding", "user-agent", "idempotency-key"})


class CriticRefused(CriticUnavailable, UsageError):
    """The server refuses every request as configured (the key, the URL, the model, a redirect
    elsewhere): the settings need fixing, and every job waiting on the critic fails the same way."""


class _Cancelled(GcrError):
    """A request stopped because another request of the same batch failed."""


class _OutOfTime(Exception):
    """A request's total time ran out before its next attempt."""


class _Unusable(Exception):
    """A 200 that is not a usable completion; worth another attempt."""


class _Pace:
    """One request's attempts: how many were made, the last failure, the deadline, the pauses."""

    def __init__(self, critic: "ServedCritic", abort: threading.Event, timeout: float, total: float,
                 max_attempts: int):
        self.critic, self.abort, self.timeout, self.total = critic, abort, timeout, total
        self.max_attempts = max_attempts
        self.deadline = time.monotonic() + total
        self.attempts = 0
        self.last = "no attempt was made"

    def start_attempt(self):
        """Count an attempt; return its timeout, cut to the time left."""
        if self.abort.is_set():
            raise _Cancelled("critique cancelled: another request of the batch failed.")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime()
        self.attempts += 1
        seconds = min(self.timeout, left)
        return _openai().Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT_S))

    def pause(self, retry_after: float | None = None) -> None:
        """Wait before the next attempt: the server's Retry-After, else exponential backoff, at most
        MAX_DELAY_S; give up at once when that would leave no time for the attempt."""
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            delay = retry_after
        else:
            delay = self.critic.backoff * 2 ** max(self.attempts - 1, 0)
        delay = min(delay, MAX_DELAY_S)
        if delay + min(self.timeout, 1.0) > self.deadline - time.monotonic():
            raise _OutOfTime()
        if self.abort.wait(delay):
            raise _Cancelled("critique cancelled: another request of the batch failed.")


_local = threading.local()   # the _Pace of the request this thread is making


def _openai():
    import openai

    return openai


@functools.cache
def _paced_client_class():
    """`openai.OpenAI`, paced by gcr through the client's retry hooks: `_prepare_options` runs before
    every attempt (it sets the attempt's timeout from the request's deadline) and `_sleep_for_retry`
    between attempts (gcr's backoff and Retry-After cap, interruptible, bounded by the deadline)."""
    openai = _openai()

    class OpenAI(openai.OpenAI):  # the name is the User-Agent the client sends: keep the usual one
        def _prepare_options(self, options):
            options = super()._prepare_options(options)
            pace = getattr(_local, "pace", None)
            if pace is not None:
                options.timeout = pace.start_attempt()
            return options

        def _sleep_for_retry(self, *, retries_taken, max_retries, options, response):
            pace = getattr(_local, "pace", None)
            if pace is None:
                return super()._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                                options=options, response=response)
            # Called while the client handles the failure: the exception is the one in flight.
            failure = response if response is not None else sys.exc_info()[1]
            pace.last = pace.critic._describe_failure(failure, pace.timeout)
            headers = response.headers if response is not None else None
            pace.pause(self._parse_retry_after_header(headers))

    class RedirectRefused(openai.OpenAIError):
        """Raised by the request hook; an OpenAIError, so the client passes it on untouched."""

    return OpenAI, RedirectRefused


class ServedCritic:
    """`Critic` backed by an OpenAI-compatible chat-completions server."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key_env: str | None = None,
        *,
        task: str,
        max_tokens: int = 2048,       # longest critique, in tokens
        temperature: float = 0.0,     # 0 = greedy: the same image gets the same critique
        concurrency: int = 8,         # requests in flight at once
        timeout: float = DEFAULT_TIMEOUT_S,   # seconds one attempt may take (the whole reply)
        retries: int | None = None,   # extra attempts after a transient failure; None: RETRIES
        backoff: float | None = None,   # first pause between attempts, doubled; None: BACKOFF_S
        total_timeout: float | None = None,   # seconds per request, all attempts; None: 3 x timeout
    ):
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}.")
        total_timeout = TOTAL_TIMEOUT_FACTOR * timeout if total_timeout is None else total_timeout
        retries = RETRIES if retries is None else retries
        backoff = BACKOFF_S if backoff is None else backoff
        numbers = (timeout, total_timeout, backoff)
        if (concurrency < 1 or retries < 0 or max_tokens < 1 or not all(map(_finite, numbers))
                or timeout <= 0 or total_timeout <= 0 or backoff < 0):
            raise UsageError("served critic settings must be finite and positive (concurrency, timeout, "
                             "total timeout, max_tokens) or non-negative (retries, backoff).")
        self.url = _base_url(url)
        self.model = model
        self.task = task
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.total_timeout = float(total_timeout)
        self.retries = retries
        self.backoff = backoff
        self.api_key_env = api_key_env
        self._api_key = _read_api_key(api_key_env)
        self._origin = _origin(urllib.parse.urlsplit(self.url))
        self._lock = threading.Lock()
        self._clients: dict[int, object] = {}   # openai clients by max_retries, sharing one pool

    @property
    def id(self) -> str:
        return self.model or self.url

    def __repr__(self) -> str:  # no key, ever
        return f"ServedCritic(url={self.url!r}, model={self.model!r}, task={self.task!r})"

    def describe(self) -> dict:
        """What a run records about its critic (JSON-ready; names the key's variable, never the key)."""
        return {
            "id": self.id,
            "backend": "served",
            "url": self.url,
            "model": self.model,
            "task": self.task,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "retry_sampling": {"temperature": RETRY_SAMPLING["temperature"],
                               "top_p": RETRY_SAMPLING["top_p"], "seed": RETRY_SEED},
            "timeout_s": self.timeout,
            "total_timeout_s": self.total_timeout,
            "retries": self.retries,
            "api_key_env": self.api_key_env,
        }

    def close(self) -> None:
        """Close the connection pool; a later request opens a new one."""
        with self._lock:
            client = self._clients.get(self.retries)
            self._clients.clear()
        if client is not None:
            client.close()

    # -- the model list ---------------------------------------------------------------------------

    def check(self) -> str:
        """Ask the server which models it serves; pick the model when none was named. Returns its id.
        One attempt: a server that is not up yet is said so at once."""
        seconds = min(self.timeout, CHECK_TIMEOUT_S)
        pace = _Pace(self, threading.Event(), seconds, seconds, max_attempts=1)
        try:
            raw = self._paced(pace, lambda: self._client(0).models.with_raw_response.list())
            payload = _json_object(raw.http_response.content, self._scrub)
        except _Unusable as exc:
            raise CriticUnavailable(self._scrub(
                f"the critic server at {self.url} did not answer /models as an OpenAI-compatible "
                f"server would ({exc}): point --critic-url at a `vllm serve <critic model>` server.")) from None
        except Exception as exc:  # noqa: BLE001 - every client failure becomes one sentence
            error = self._error(exc, pace)
            if type(error) is CriticUnavailable:  # transient: down, busy or unreachable
                raise CriticUnavailable(self._scrub(
                    f"cannot reach the critic server at {self.url} ({pace.last}): start it there "
                    "(`vllm serve TIGER-Lab/RationalRewards-8B-T2I`, or -Edit) or fix --critic-url.")) from None
            raise error from None
        data = payload.get("data")
        served = [self._scrub(str(m["id"])) for m in (data if isinstance(data, list) else [])
                  if isinstance(m, dict) and m.get("id")]
        if self.model is None:
            if len(served) == 1:
                self.model = served[0]
            elif not served:
                raise CriticUnavailable(f"the critic server at {self.url} serves no model: start it with "
                                        "`vllm serve <critic model>`.")
            else:
                raise UsageError(self._scrub(
                    f"the critic server at {self.url} serves several models ({', '.join(served)}): "
                    "name one with --critic-model."))
        elif served and self.model not in served:
            raise UsageError(self._scrub(
                f"the critic server at {self.url} does not serve {self.model!r} (it serves "
                f"{', '.join(served)}): fix --critic-model."))
        return self.model

    # -- critiques ----------------------------------------------------------------------------------

    def critique(self, requests: Sequence[CritiqueRequest], retry: bool = False) -> list[str]:
        """One chat completion per request, `concurrency` at a time; answers come back in order.
        The first request that fails for good stops the others and is raised."""
        if not requests:
            return []
        if self.model is None:
            self.check()
        abort = threading.Event()
        tasks = [functools.partial(self._critique_one, r, retry, abort) for r in requests]
        overdue = self.total_timeout + WATCHDOG_GRACE_S
        return _in_parallel(tasks, self.concurrency, abort, overdue, lambda: CriticUnavailable(
            f"the critic server at {self.url} sent no complete answer within {overdue:g} s: check the "
            "server's log, raise --critic-timeout, or retry later."))

    def _critique_one(self, request: CritiqueRequest, retry: bool, abort: threading.Event) -> str:
        if abort.is_set():
            raise _Cancelled("critique cancelled: another request of the batch failed.")
        body = {
            "model": self.model,
            "messages": build_openai_messages(self.task, request.request, request.image, request.source_image),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if retry:
            # A greedy critic would repeat the unreadable text; sample instead, seeded to stay repeatable.
            body.update(temperature=RETRY_SAMPLING["temperature"], top_p=RETRY_SAMPLING["top_p"],
                        seed=RETRY_SEED)
        pace = _Pace(self, abort, self.timeout, self.total_timeout, max_attempts=self.retries + 1)
        while True:
            try:
                # The client retries transport and status failures itself, within what is left of
                # this request's attempts; an unusable 200 comes back here and costs one attempt.
                client = self._client(max(self.retries - pace.attempts, 0))
                raw = self._paced(pace, lambda: client.chat.completions.with_raw_response.create(**body))
                return self._scrub(_completion_text(_json_object(raw.http_response.content, self._scrub)))
            except _Unusable as exc:
                pace.last = self._scrub(str(exc))
                if pace.attempts >= pace.max_attempts:
                    raise self._exhausted(pace) from None
                try:
                    pace.pause()
                except _OutOfTime:
                    raise self._exhausted(pace, out_of_time=True) from None
            except _Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - every client failure becomes one sentence
                raise self._error(exc, pace) from None

    # -- the openai client ---------------------------------------------------------------------------

    def _client(self, max_retries: int):
        """The openai client for this server, with the given retry count; all share one connection
        pool, built on first use."""
        with self._lock:
            if not self._clients:
                openai = _openai()
                client_class, _ = _paced_client_class()
                http = openai.DefaultHttpxClient(
                    event_hooks={"request": [self._guard_request]}, follow_redirects=True,
                    timeout=openai.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT_S)))
                self._clients[self.retries] = client_class(
                    base_url=self.url, api_key=self._api_key or _NO_KEY, max_retries=self.retries,
                    timeout=openai.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT_S)),
                    http_client=http)
            if max_retries not in self._clients:
                self._clients[max_retries] = self._clients[self.retries].with_options(max_retries=max_retries)
            return self._clients[max_retries]

    def _guard_request(self, request) -> None:
        """Runs before every request the client sends, redirect hops included: refuse another
        origin, and send only what the server needs, with our key or none."""
        target = _origin(request.url)
        if target != self._origin:
            _, refused = _paced_client_class()
            raise refused(self._scrub(
                f"the critic server at {_show_origin(self._origin)} redirected the request to another "
                f"origin, {_show_origin(target)}, and gcr does not follow it so that the API key is "
                "never sent elsewhere: point --critic-url at the server that answers itself."))
        for name in list(request.headers.keys()):
            low = name.lower()
            if low not in _SENT_HEADERS and not low.startswith("x-stainless-"):
                del request.headers[name]
        if self._api_key:
            request.headers["Authorization"] = f"Bearer {self._api_key}"

    @staticmethod
    def _paced(pace: _Pace, call: Callable):
        _local.pace = pace
        try:
            return call()
        finally:
            _local.pace = None

    # -- failures -----------------------------------------------------------------------------------

    def _error(self, exc: BaseException, pace: _Pace) -> GcrError:
        """The one-sentence error for what the client raised once it stopped retrying."""
        openai = _openai()
        _, refused = _paced_client_class()
        if isinstance(exc, (_Cancelled, GcrError)):
            return exc
        if isinstance(exc, _OutOfTime):
            return self._exhausted(pace, out_of_time=True)
        if isinstance(exc, refused):
            return CriticRefused(str(exc))
        if isinstance(exc, openai.APIStatusError):
            return self._status_error(exc.response, pace)
        if isinstance(exc, openai.APIConnectionError):  # timeouts included
            pace.last = self._describe_failure(exc.__cause__ or exc, pace.timeout)
            return self._exhausted(pace)
        pace.last = self._describe_failure(exc, pace.timeout)
        return CriticUnavailable(self._scrub(
            f"the openai client failed talking to the critic server at {self.url} ({pace.last}): check "
            "--critic-url, or retry later."))

    def _status_error(self, response, pace: _Pace) -> GcrError:
        code = response.status_code
        message = self._server_message(response.content) or response.reason_phrase or "no message"
        pace.last = f"HTTP {code}: {message}"
        if code in (401, 403):
            hint = ("check the API key in the variable named by --api-key-env" if self.api_key_env else
                    "put the server's API key in an environment variable and name it with --api-key-env")
            return CriticRefused(self._scrub(
                f"the critic server at {self.url} refused the request (HTTP {code}: {message}): {hint}."))
        if code == 404:
            return CriticRefused(self._scrub(
                f"the critic server at {self.url} answered HTTP 404 ({message}): point --critic-url at "
                "the OpenAI-compatible base, e.g. http://host:8000/v1, and check --critic-model."))
        if code in (408, 409, 429) or code >= 500:
            if pace.attempts >= pace.max_attempts:
                return self._exhausted(pace)
            # Attempts were left, so the client declined to retry: the server asked for a wait
            # longer than the client allows (openai: 2 min), or said not to retry.
            return CriticUnavailable(self._scrub(
                f"the critic server at {self.url} answered HTTP {code} ({message}) and asked not to be "
                f"retried soon{_wait_hint(response)}: retry later."))
        return GcrError(self._scrub(
            f"the critic server at {self.url} rejected the request (HTTP {code}: {message}): fix the "
            "request settings (e.g. max tokens) or the server's limits."))

    def _exhausted(self, pace: _Pace, out_of_time: bool = False) -> CriticUnavailable:
        if out_of_time:
            return CriticUnavailable(self._scrub(
                f"the critic server at {self.url} gave no usable answer within {pace.total:g} s "
                f"({_times(pace.attempts, 'attempt')}; last: {pace.last}): check the server's log, raise "
                "--critic-timeout, or retry later."))
        return CriticUnavailable(self._scrub(
            f"the critic server at {self.url} failed {_times(pace.attempts)} in a row (last: {pace.last}): "
            "check the server's log, or retry later."))

    def _describe_failure(self, failure, timeout: float) -> str:
        """A short, key-free account of one failed attempt: an HTTP response or an exception."""
        if hasattr(failure, "status_code"):
            message = self._server_message(failure.content) or failure.reason_phrase or "no message"
            return self._scrub(f"HTTP {failure.status_code}: {message}")
        if failure is None:
            return "unknown failure"
        names = {type(c).__name__ for c in _causes(failure)}
        if any("Timeout" in n for n in names) or isinstance(failure, TimeoutError):
            return f"no answer within {timeout:g} s"
        text = _snippet(self._scrub(str(failure).strip()))
        return f"{type(failure).__name__}: {text}" if text else type(failure).__name__

    def _server_message(self, body: bytes) -> str:
        """The error text an OpenAI-compatible server put in its reply, in any of the usual shapes,
        key scrubbed before it is cut short (a cut must not leave half a key)."""
        try:
            payload = json.loads(body)
        except ValueError:
            return _snippet(self._scrub(_text(body)))
        if isinstance(payload, dict):
            error = payload.get("error")
            if isinstance(error, dict) and error.get("message"):
                return _snippet(self._scrub(str(error["message"])))
            for key in ("message", "detail", "error"):
                if isinstance(payload.get(key), str) and payload[key]:
                    return _snippet(self._scrub(payload[key]))
        return _snippet(self._scrub(_text(body)))

    def _scrub(self, text: str) -> str:
        """A server (or a proxy) may echo the key back, in a message or a critique: never let it be
        returned, stored or printed, as itself or in its JSON- or URL-escaped forms."""
        text = str(text)
        if not self._api_key:
            return text
        forms = {self._api_key, json.dumps(self._api_key)[1:-1], urllib.parse.quote(self._api_key, safe=""),
                 urllib.parse.quote_plus(self._api_key)}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "***")
        return text


def connect(url: str, *, task: str, check: bool = True, **options) -> ServedCritic:
    """A served critic, checked against the server's model list (unless `check=False`)."""
    critic = ServedCritic(url, task=task, **options)
    if check:
        critic.check()
    return critic


def _in_parallel(tasks: list[Callable], limit: int, abort: threading.Event, overdue_s: float,
                 overdue_error: Callable[[], Exception]) -> list:
    """Run `tasks` on at most `limit` daemon threads; return their results in order, or raise the
    first failure (after setting `abort`, so the others stop instead of retrying). A task running
    longer than `overdue_s` counts as failed. Ctrl-C returns at once: the threads are daemons, so a
    request still on the wire does not keep the process alive."""
    n = len(tasks)
    results: list = [None] * n
    failures: list = []                  # exceptions, in the order they happened
    running: dict[int, float] = {}       # index -> start time
    pending = iter(range(n))
    state = {"done": 0}
    cond = threading.Condition()

    def work():
        while True:
            with cond:
                index = None if abort.is_set() else next(pending, None)
                if index is None:
                    return
                running[index] = time.monotonic()
            try:
                value, error = tasks[index](), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                value, error = None, exc
            with cond:
                running.pop(index, None)
                if error is None:
                    results[index] = value
                    state["done"] += 1
                else:
                    failures.append(error)
                    abort.set()
                cond.notify_all()

    for k in range(min(limit, n)):
        threading.Thread(target=work, name=f"gcr-critic-{k}", daemon=True).start()
    try:
        with cond:
            while state["done"] < n and not failures:
                cond.wait(0.25)
                now = time.monotonic()
                if any(now - start > overdue_s for start in running.values()):
                    failures.append(overdue_error())
                    abort.set()
    except BaseException:
        abort.set()   # Ctrl-C: queued requests are dropped, waiting ones stop
        raise
    if failures:
        # Report the failure itself, not the requests it cancelled.
        raise next((e for e in failures if not isinstance(e, _Cancelled)), failures[0])
    return results


def _base_url(url: str) -> str:
    """Normalise to the API base ending in /v1 (a bare host:port gets /v1, as vLLM serves it)."""
    url = (url or "").strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"critic server URL {url!r} is not an http(s) URL: use e.g. http://localhost:8000/v1.")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would be stored with the run and shown in every message.
        raise UsageError("the critic server URL carries credentials: drop them from --critic-url and put "
                         "the key in an environment variable named with --api-key-env.")
    try:
        parts.port
    except ValueError:
        raise UsageError(f"critic server URL {url!r} has an invalid port: use e.g. "
                         "http://localhost:8000/v1.") from None
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _origin(url) -> tuple:
    """(scheme, host, port) of a urllib SplitResult or an httpx URL, default ports filled in."""
    scheme = url.scheme.lower()
    host = (url.hostname if hasattr(url, "hostname") else url.host) or ""
    port = url.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, host.lower(), port


def _show_origin(origin: tuple) -> str:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


def _read_api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise UsageError(f"environment variable {env_name} is not set: export the critic server's API key "
                         "in it, or drop --api-key-env.")
    return key


def _json_object(raw: bytes, scrub: Callable[[str], str]) -> dict:
    try:
        payload = json.loads(raw)
    except ValueError:
        raise _Unusable(f"the reply was not JSON: {_snippet(scrub(_text(raw)))}") from None
    if not isinstance(payload, dict):
        raise _Unusable("the reply was JSON but not an object")
    return payload


def _completion_text(payload: dict) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Unusable("the reply had no choices[0].message.content") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise _Unusable("the reply's message content was not text" if content is not None
                        else "the reply's message content was null")
    return content


def _wait_hint(response) -> str:
    value = response.headers.get("retry-after")
    return f" (Retry-After: {_snippet(value)[:40]})" if value else ""


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _times(n: int, word: str = "time") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _text(raw) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


def _snippet(text) -> str:
    text = " ".join(_text(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."
