"""What a cluster worker is, without Ray: a process that owns its models and runs groups of work.

Work comes in groups of some kind: a kind is a function `run(payload, context)` registered by name
in KINDS (imported only in the worker that runs it), which reports what happens through
`context.emit(event)`. The worker turns those calls into a stream (`Worker.run` is a generator: a
Ray streaming generator once `gcr.distributed.cluster` makes the class an actor), so every result
reaches the driver as soon as it exists, and a worker that dies loses only what it had not sent.

Events are tuples whose first item names them. The cluster handles three itself (`HELLO`: which
process took the group; `STATUS`: what the worker is doing, for the progress display; `LOG`: a line
to show); the rest go to the driver's `Work.handle` for that kind, and `CRASHED` says the kind's
function raised (a bug: the kind should report its own failures).

The driver side of a kind implements `Work`: the groups to run, what to do with each event, what is
left of a group after its worker died (read back from the run store), and how to give a group up.
"""
from __future__ import annotations

import importlib
import os
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

# kind -> "module:function".
KINDS = {"refine": "gcr.distributed.refine:run_group", "score": "gcr.distributed.score:run_group"}

HELLO, STATUS, LOG, CRASHED = "hello", "status", "log", "crashed"


@dataclass(frozen=True)
class Group:
    """A unit of work handed to one worker: jobs that share models and settings."""

    kind: str
    payload: Any
    key: str = ""      # groups with the same key use the same models: a free worker prefers its last key
    label: str = ""    # what the progress display calls it (job ids)
    losses: int = 0    # how many workers died running this work so far


class Work(Protocol):
    """The driver's side of a kind of work (it alone writes the run store)."""

    def groups(self) -> list[Group]: ...

    def start(self, group: Group) -> Group | None:
        """`group` as a worker gets it, built just before it is handed out (from the store as it is
        then); None when nothing in it can run."""
        ...

    def handle(self, group: Group, event: tuple, worker: str) -> None:
        """Commit one event of `group` (a finished round, a finished job ...)."""
        ...

    def remaining(self, group: Group) -> Group | None:
        """After the worker running `group` died: what is left of it, from what was committed (None
        when nothing is)."""
        ...

    def abandon(self, group: Group, reason: str) -> None:
        """`group` cannot be run: end its unfinished work as failed, with `reason`."""
        ...


class Context:
    """What a kind's function gets: the worker's models (a gcr.runner.ModelCache kept for the
    worker's lifetime) and `emit` for its events."""

    def __init__(self, cache, emit: Callable[[tuple], None], worker: str):
        self.cache, self.emit, self.worker = cache, emit, worker

    def log(self, message) -> None:
        self.emit((LOG, str(message)))

    def status(self, message: str) -> None:
        self.emit((STATUS, message))


_END = object()


class Worker:
    """One worker process: owns its models, runs one group at a time, streams its events."""

    def __init__(self, name: str):
        self.name = name
        self._cache = None
        # Every group runs on this one thread, so a model's CUDA graphs and compiled code are
        # always used from the thread that made them.
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="gcr-worker", daemon=True).start()

    def ready(self) -> dict:
        """Which process this is (once the worker is up)."""
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def run(self, kind: str, payload) -> Iterator[tuple]:
        """Run one group of `kind`, yielding its events as they happen."""
        events: queue.Queue = queue.Queue()
        yield (HELLO, self.ready())
        self._jobs.put((kind, payload, events.put))
        while (event := events.get()) is not _END:
            yield event

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    def _serve(self) -> None:
        while True:
            kind, payload, emit = self._jobs.get()
            try:
                run_kind(kind, payload, Context(self._models(), emit, self.name))
            except BaseException as e:  # noqa: BLE001 - reported to the driver, which gives the group up
                from gcr.runner import unexpected

                emit((CRASHED, unexpected(e)))
            finally:
                emit(_END)

    def _models(self):
        if self._cache is None:
            from gcr.runner import ModelCache

            # A worker has no runs home: it never looks for critic engines kept warm there.
            self._cache = ModelCache(warm_engines=False)
        return self._cache


def run_kind(kind: str, payload, context: Context) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of work {kind!r} (known: {', '.join(KINDS)})")
    module, _, function = KINDS[kind].partition(":")
    getattr(importlib.import_module(module), function)(payload, context)
