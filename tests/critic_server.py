"""A scripted OpenAI-compatible critic server on 127.0.0.1, for the served-critic tests. Tests only.

`script` holds one action per POST /v1/chat/completions, in arrival order; when it runs out every
POST succeeds with `answer(body)` (default: `critique of <the request>`). Actions:

    ("ok",)                         answer normally
    ("sleep", seconds)              answer "late", but only after `seconds`
    ("hang",)                       never answer (until the server stops)
    ("drop",)                       close the connection without a word
    ("status", code, payload[, headers])
    ("raw", bytes)                  a 200 whose body is exactly these bytes
    ("redirect", code, location)    a redirect, Location as given
    ("trickle", seconds_per_byte)   a 200 whose body arrives one byte at a time

GET /v1/models lists `models`, unless the script's next action is ("models", code, payload[, headers]).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.models = ["tiger/critic"]
        self.script = []
        self.posts = []         # (headers, body) per POST, in arrival order
        self.gets = []          # headers per GET
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0        # seconds every successful POST takes
        self.answer = lambda body: f"critique of {request_of(body)}"
        self.stopping = threading.Event()   # releases hanging handlers

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_action(self):
        with self.lock:
            return self.script.pop(0) if self.script else ("ok",)

    def start(self):
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        self.stopping.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.server.gets.append(dict(self.headers))
        if self.path != "/v1/models":
            return self.reply(404, {"error": {"message": f"no route {self.path}"}})
        script = self.server.script
        action = self.server.next_action() if script and script[0][0] == "models" else None
        if action:
            return self.reply(action[1], action[2], action[3] if len(action) > 3 else {})
        self.reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.posts.append((dict(self.headers), body))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            self.act(server.next_action(), body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first: that is what the test wanted
        finally:
            with server.lock:
                server.in_flight -= 1

    def act(self, action, body):
        kind = action[0]
        if kind == "sleep":
            time.sleep(action[1])
            return self.reply(200, completion("late"))
        if kind == "hang":
            self.server.stopping.wait(120)
            self.close_connection = True
            return
        if kind == "drop":
            self.close_connection = True
            return
        if kind == "status":
            return self.reply(action[1], action[2], action[3] if len(action) > 3 else {})
        if kind == "raw":
            return self.reply(200, action[1])
        if kind == "redirect":
            return self.reply(action[1], b"", {"Location": action[2]})
        if kind == "trickle":
            data = json.dumps(completion("slow")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                if self.server.stopping.wait(action[1]):
                    return
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            return
        time.sleep(self.server.delay)
        self.reply(200, completion(self.server.answer(body)))

    def reply(self, code, payload, headers=None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def completion(text):
    return {"id": "x", "object": "chat.completion", "model": "tiger/critic",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}


def request_of(body):
    """The user's request, read back out of the first text part of the user message."""
    first = body["messages"][1]["content"][0]["text"]
    return first.split("User Instruction: ", 1)[1].split("\nYou are provided", 1)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
