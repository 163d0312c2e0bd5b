"""A critic behind an OpenAI-compatible server (vLLM's `/v1/chat/completions`), over plain HTTP.

The authors serve RationalRewards this way (`vllm serve TIGER-Lab/RationalRewards-8B-T2I --port 8000`);
the server batches concurrent requests itself, so this client only keeps `concurrency` requests in
flight. Stdlib only: urllib for HTTP, a thread pool for concurrency. Transient failures (connection
errors, timeouts, 5xx, 429, unreadable replies) are retried with exponential backoff; other 4xx fail at
once with the server's own message. The API key is read from an environment variable, sent only as a
Bearer header, and never written into a message, a repr or a record.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Sequence

from gcr.critics.base import RETRY_SAMPLING, RETRY_SEED
from gcr.errors import GcrError, UsageError
from gcr.prompts import build_openai_messages
from gcr.records import TASKS, CritiqueRequest

MAX_DELAY_S = 60.0         # longest pause between attempts, whatever backoff or Retry-After say
CHECK_TIMEOUT_S = 30.0     # the health check answers fast or not at all
_MESSAGE_CHARS = 300       # how much of a server's error message to quote


class _Transient(Exception):
    """A failure worth another attempt; `delay` is the server's Retry-After, when it gave one."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.delay = delay


class _Cancelled(GcrError):
    """A request stopped because another request of the same batch failed."""


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
        timeout: float = 300,         # seconds a socket may stay silent before the attempt counts as failed
        retries: int = 4,             # extra attempts per request after a transient failure
        backoff: float = 1.0,         # first pause between attempts, doubled each time
    ):
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}.")
        if concurrency < 1 or retries < 0 or timeout <= 0 or max_tokens < 1 or backoff < 0:
            raise UsageError("served critic settings must be positive (concurrency, timeout, max_tokens) "
                             "and non-negative (retries, backoff).")
        self.url = _base_url(url)
        self.model = model
        self.task = task
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.api_key_env = api_key_env
        self._api_key = _read_api_key(api_key_env)

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
            "api_key_env": self.api_key_env,
        }

    def check(self) -> str:
        """Ask the server which models it serves; pick the model when none was named. Returns its id."""
        try:
            payload = self._call("GET", "/models", None, timeout=min(self.timeout, CHECK_TIMEOUT_S))
        except _Transient as exc:
            raise GcrError(f"cannot reach the critic server at {self.url} ({exc}): is "
                           "`vllm serve TIGER-Lab/RationalRewards-8B-T2I` (or -Edit) running there?") from None
        served = [m.get("id") for m in payload.get("data", []) if isinstance(m, dict) and m.get("id")]
        if self.model is None:
            if len(served) == 1:
                self.model = served[0]
            elif not served:
                raise GcrError(f"the critic server at {self.url} serves no model: start it with "
                               "`vllm serve <critic model>`.")
            else:
                raise UsageError(f"the critic server at {self.url} serves several models "
                                 f"({', '.join(served)}): name one with --critic-model.")
        elif served and self.model not in served:
            raise UsageError(f"the critic server at {self.url} does not serve {self.model!r} (it serves "
                             f"{', '.join(served)}): fix --critic-model.")
        return self.model

    def critique(self, requests: Sequence[CritiqueRequest], retry: bool = False) -> list[str]:
        """One chat completion per request, `concurrency` at a time; answers come back in order."""
        if not requests:
            return []
        if self.model is None:
            self.check()
        abort = threading.Event()  # set on the first hard failure: the rest stop instead of retrying
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)),
                                  thread_name_prefix="gcr-critic")
        try:
            futures = [pool.submit(self._critique_guarded, r, retry, abort) for r in requests]
            wait(futures, return_when=FIRST_EXCEPTION)
            if abort.is_set():
                for future in futures:
                    future.cancel()
                wait(futures)
                # Report the failure itself, not the requests it cancelled.
                errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
                raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
            return [future.result() for future in futures]
        except BaseException:
            # Ctrl-C or a failure: queued requests are dropped and waiting ones stop retrying; requests
            # already on the wire end on their own (urllib cannot be interrupted from another thread).
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=False)

    def _critique_guarded(self, request: CritiqueRequest, retry: bool, abort: threading.Event) -> str:
        if abort.is_set():
            raise _Cancelled("critique cancelled: another request of the batch failed.")
        try:
            return self._critique_one(request, retry, abort)
        except BaseException:
            abort.set()
            raise

    # -- one request ------------------------------------------------------------------------------

    def _critique_one(self, request: CritiqueRequest, retry: bool, abort: threading.Event) -> str:
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
        data = json.dumps(body).encode("utf-8")

        last = "no attempt was made"
        for attempt in range(self.retries + 1):
            try:
                return _completion_text(self._call("POST", "/chat/completions", data, timeout=self.timeout))
            except _Transient as exc:
                last = str(exc)
                if attempt == self.retries:
                    break
                delay = exc.delay if exc.delay is not None else self.backoff * 2 ** attempt
                if abort.wait(min(delay, MAX_DELAY_S)):
                    raise _Cancelled("critique cancelled: another request of the batch failed.")
        raise GcrError(f"the critic server at {self.url} failed {self.retries + 1} times in a row "
                       f"(last: {last}): check the server's log, or retry later.")

    def _call(self, method: str, path: str, data: bytes | None, *, timeout: float) -> dict:
        """One HTTP exchange returning the JSON reply. Raises _Transient for what may pass on retry and
        GcrError/UsageError for what will not."""
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            self._raise_for_status(exc)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            # Refused, reset, dropped mid-reply, timed out: the server may be restarting or overloaded.
            raise _Transient(self._scrub(_describe_io_error(exc))) from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise _Transient(f"the reply was not JSON: {self._scrub(_snippet(raw))}") from None
        if not isinstance(payload, dict):
            raise _Transient("the reply was JSON but not an object")
        return payload

    def _raise_for_status(self, exc: urllib.error.HTTPError):
        try:
            body = exc.read()
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        message = self._scrub(_server_message(body) or exc.reason or "no message")
        code = exc.code
        if code == 429 or code >= 500:
            raise _Transient(f"HTTP {code}: {message}", delay=_retry_after(exc.headers))
        if code in (401, 403):
            raise UsageError(f"the critic server at {self.url} refused the request (HTTP {code}: {message}): "
                             "check the API key in the variable named by --api-key-env.")
        if code == 404:
            raise UsageError(f"the critic server at {self.url} answered HTTP 404 ({message}): point "
                             "--critic-url at the OpenAI-compatible base, e.g. http://host:8000/v1, and check "
                             "--critic-model.")
        raise GcrError(f"the critic server at {self.url} rejected the request (HTTP {code}: {message}): "
                       "fix the request settings (e.g. max tokens) or the server's limits.")

    def _scrub(self, text: str) -> str:
        """A server (or a proxy) may echo request headers back: never let the key into a message."""
        text = str(text)
        return text.replace(self._api_key, "***") if self._api_key else text


def connect(url: str, *, task: str, check: bool = True, **options) -> ServedCritic:
    """A served critic, checked against the server's model list (unless `check=False`)."""
    critic = ServedCritic(url, task=task, **options)
    if check:
        critic.check()
    return critic


def _base_url(url: str) -> str:
    """Normalise to the API base ending in /v1 (a bare host:port gets /v1, as vLLM serves it)."""
    url = (url or "").strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"critic server URL {url!r} is not an http(s) URL: use e.g. http://localhost:8000/v1.")
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _read_api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise UsageError(f"environment variable {env_name} is not set: export the critic server's API key "
                         "in it, or drop --api-key-env.")
    return key


def _completion_text(payload: dict) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Transient("the reply had no choices[0].message.content") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise _Transient("the reply's message content was not text")
    return content


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(body: bytes) -> str:
    """The error text an OpenAI-compatible server put in its reply, in any of the usual shapes."""
    try:
        payload = json.loads(body)
    except ValueError:
        return _snippet(body)
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _snippet(error["message"])
        for key in ("message", "detail", "error"):
            if isinstance(payload.get(key), str) and payload[key]:
                return _snippet(payload[key])
    return _snippet(body)


def _describe_io_error(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "no answer within the timeout"
    text = str(reason).strip()
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def _snippet(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(str(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."
