"""The Ray side of a scale-out batch: the cluster, its workers, and who runs which group.

- A local cluster (`--workers N`) or a running one (`--ray-address auto|ADDR`, any number of nodes).
  Ray is imported only here, and only once a command asks for it.
- One worker actor per GPU (Ray gives each its own CUDA_VISIBLE_DEVICES), or per share of the CPUs
  when there are no GPUs or the jobs run on the CPU. A worker keeps its models between groups.
- Dynamic assignment: groups wait in one queue and a worker that finishes takes the next one,
  preferring a group that uses the models it has loaded; no static shards, so a slow group never
  idles the other workers.
- Faults: a worker that dies (kill -9, out of memory, a lost node) is replaced, and what its group
  had not committed goes back to the front of the queue (`Work.remaining`, read from the run
  store). A group whose worker died MAX_LOSSES times is given up (it is probably what kills them);
  a worker slot that died MAX_DEATHS times is retired.
- Leaving (done, Ctrl-C, an error): every worker actor is killed, which cancels what it runs, and a
  local cluster is shut down with all its processes.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from gcr.devices import first_line
from gcr.errors import GcrError, UsageError
from gcr.distributed.work import CRASHED, HELLO, LOG, STATUS, Group, Work, Worker

MAX_LOSSES = 3          # workers a group may take down with it before it is given up
MAX_DEATHS = 3          # deaths after which a worker slot is not replaced again
START_TIMEOUT_S = 600   # no worker up for this long, nothing running: the cluster has no room
POLL_S = 0.5            # how long one wait lasts: Ctrl-C is handled between waits
PROBE_TIMEOUT_S = 10    # a cluster's address must answer within this


@dataclass(frozen=True)
class ClusterOptions:
    """Where a batch runs when it runs on Ray."""

    workers: int | None = None   # None: one per GPU of the cluster (one per node without GPUs)
    address: str | None = None   # None: start a local cluster; "auto" or host:port: join a running one

    def flags(self) -> str:
        """The command-line flags that ask for this again (for the resume command)."""
        import shlex

        return (f" --workers {self.workers}" if self.workers else "") + (
            f" --ray-address {shlex.quote(self.address)}" if self.address else "")


def require_ray(options: ClusterOptions) -> None:
    """One sentence, before anything runs, when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        flag = "--ray-address" if options.address and not options.workers else "--workers"
        raise UsageError(f"{flag} runs the batch on Ray, which is not installed: pip install 'gcr[ray]' "
                         f"(or drop {flag} to run the batch in this process).") from None


@dataclass
class _Slot:
    """One worker: its actor, and the group it runs."""

    name: str
    actor: Any = None
    starting: Any = None        # ObjectRef of actor.ready() until the worker is up
    stream: Any = None          # ObjectRefGenerator of the group it runs
    group: Group | None = None
    began: bool = False         # the worker said hello for this group (it took it up)
    key: str | None = None      # the models of its last group
    deaths: int = 0
    where: str = ""             # "pid N on host", once known
    retired: bool = False


class Cluster:
    """A Ray cluster with workers, for one batch (use it as a context manager)."""

    def __init__(self, options: ClusterOptions, *, gpus: bool = True, progress=None, log=lambda msg: None):
        self.options, self.want_gpus, self.progress, self.log = options, gpus, progress, log
        self.slots: list[_Slot] = []
        self.owned = False          # this process started or joined Ray: it shuts it down / leaves
        self.gpu_workers = False
        self.last_death = ""        # why the last worker that died died
        self._quiet = contextlib.ExitStack()

    # -- lifetime ----------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        require_ray(self.options)
        # Ray prints what its processes report (a worker that died ...) on stdout: keep stdout for
        # results (`--json`), and show those reports on stderr with the rest of the progress.
        self._quiet.enter_context(contextlib.redirect_stdout(sys.stderr))
        try:
            self._connect()
            self._start_workers()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray

        try:
            for slot in self.slots:
                _kill(slot.actor)
            if self.owned:
                ray.shutdown()  # a local cluster stops with every process it started
        finally:
            self._quiet.close()

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():  # the caller's own Ray (a library user, a test): use it, leave it up
            return
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if self.progress:
            self.progress.update("joining the Ray cluster" if self.options.address else "starting a local Ray cluster")
        self.owned = True  # from here on, whatever Ray started is shut down on the way out
        if self.options.address:
            try:
                _probe(self.options.address)
                ray.init(address=self.options.address, **quiet)
            except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
                raise UsageError(f"Could not join the Ray cluster at {self.options.address} ({first_line(e)}): "
                                 "start one with `ray start --head`, or drop --ray-address to run on a local "
                                 "cluster.") from None
        else:
            try:
                ray.init(address="local", **quiet)
            except Exception as e:  # noqa: BLE001 - ports, /tmp, shared memory ...
                raise GcrError(f"Could not start a local Ray cluster ({first_line(e)}): see Ray's logs under "
                               "/tmp/ray, or drop --workers to run the batch in this process.") from None

    def _start_workers(self) -> None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        gpus = sum(int(r.get("GPU", 0)) for r in nodes)
        cpus = sum(int(r.get("CPU", 0)) for r in nodes)
        where = "the Ray cluster" if self.options.address else "this machine"
        self.gpu_workers = bool(self.want_gpus and gpus)
        if self.gpu_workers:
            n = self.options.workers or gpus
            if n > gpus:
                raise UsageError(f"--workers {n} asks for one GPU per worker, but {where} has {gpus}: pass "
                                 f"--workers {gpus} or fewer.")
        else:
            n = self.options.workers or len(nodes)
            if n > cpus:
                raise UsageError(f"--workers {n} asks for a CPU per worker, but {where} has {cpus}: pass "
                                 f"--workers {cpus} or fewer.")
        each = _cpus_each(nodes, n, self.gpu_workers)
        self.actor_class = ray.remote(num_cpus=each, num_gpus=1 if self.gpu_workers else 0,
                                      max_restarts=0, max_task_retries=0)(Worker)
        self.slots = [_Slot(f"worker {i + 1}") for i in range(n)]
        for slot in self.slots:
            self._spawn(slot)
        unit = "1 GPU" if self.gpu_workers else f"{each} CPU{'s' if each > 1 else ''}"
        self.log(f"Ray: {n} worker{'s' if n > 1 else ''} ({unit} each) on {len(nodes)} "
                 f"node{'s' if len(nodes) > 1 else ''}")
        if self.progress:
            self.progress.update(f"{n} Ray worker{'s' if n > 1 else ''}")

    def _spawn(self, slot: _Slot) -> None:
        slot.actor = self.actor_class.remote(slot.name)
        slot.starting, slot.where, slot.stream, slot.group = slot.actor.ready.remote(), "", None, None
        self._show(slot, "starting")

    # -- running work ------------------------------------------------------------------------------

    def run(self, work: Work) -> None:
        """Run every group of `work` on the workers; returns when each has ended (done or given up)."""
        import ray

        queue: deque = deque(work.groups())
        waiting_since = time.monotonic()
        while True:
            for slot in self.slots:
                while slot.actor is not None and slot.starting is None and slot.stream is None and queue:
                    group = work.start(_take(queue, slot.key))
                    if group is not None:
                        self._dispatch(slot, group)
            busy = [s for s in self.slots if s.stream is not None]
            starting = [s for s in self.slots if s.starting is not None]
            if not busy and not queue:
                return
            if not busy and not starting:  # every worker retired
                _give_up(work, queue, f"every Ray worker died {MAX_DEATHS} times (the last: {self.last_death}); "
                                      "see the workers' logs under Ray's session directory")
                return
            if busy:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > START_TIMEOUT_S:
                _give_up(work, queue, f"no Ray worker could start within {START_TIMEOUT_S} s: the cluster has "
                                      "no room for them (see `ray status`)")
                return
            ready, _ = ray.wait([s.stream for s in busy] + [s.starting for s in starting], num_returns=1,
                                timeout=POLL_S)
            for ref in ready:
                stream = next((s for s in busy if s.stream is ref), None)
                if stream is not None:
                    self._next_event(stream, work, queue)
                else:
                    self._started(next(s for s in starting if s.starting == ref))

    def _dispatch(self, slot: _Slot, group: Group) -> None:
        slot.group, slot.began, slot.key = group, False, group.key
        slot.stream = slot.actor.run.options(num_returns="streaming").remote(group.kind, group.payload)
        self._show(slot, group.label)

    def _started(self, slot: _Slot) -> None:
        import ray

        try:
            info = ray.get(slot.starting)
        except ray.exceptions.RayError as e:
            slot.starting = None
            self._lost(slot, None, None, e)
            return
        slot.starting, slot.where = None, f"pid {info['pid']} on {info['host']}"
        self._show(slot, "ready")

    def _next_event(self, slot: _Slot, work: Work, queue: deque) -> None:
        import ray

        group = slot.group
        try:
            event = ray.get(next(slot.stream))
        except StopIteration:
            slot.stream, slot.group = None, None
            self._show(slot, "idle")
            return
        except ray.exceptions.RayTaskError as e:  # Worker.run itself failed: a bug, not a lost worker
            slot.stream, slot.group = None, None
            work.abandon(group, f"the Ray worker failed ({first_line(e)})")
            return
        except ray.exceptions.RayError as e:      # the worker is gone (killed, out of memory, lost node)
            self._lost(slot, work, queue, e)
            return
        kind = event[0]
        if kind == HELLO:
            slot.began, slot.where = True, f"pid {event[1]['pid']} on {event[1]['host']}"
        elif kind == STATUS:
            self._show(slot, event[1])
        elif kind == LOG:
            self.log(f"{slot.name}: {event[1]}")
        elif kind == CRASHED:
            work.abandon(group, event[1])
        else:
            work.handle(group, event, slot.name)

    def _lost(self, slot: _Slot, work: Work | None, queue: deque | None, error: Exception) -> None:
        """The worker died: replace it, and hand what its group left undone to the next free worker."""
        group, took_it = slot.group, slot.began
        slot.stream = slot.group = None
        self.last_death = _why(error)
        slot.deaths += 1
        who = f"{slot.name} ({slot.where})" if slot.where else slot.name
        _kill(slot.actor)
        if group is not None and work is not None:
            left = work.remaining(group)
            if left is not None:
                left = replace(left, losses=group.losses + took_it)  # it never started there: not its fault
                if left.losses >= MAX_LOSSES:
                    work.abandon(left, f"the Ray worker running it died {left.losses} times (killed, out of "
                                       "memory or lost)")
                else:
                    queue.appendleft(left)
            self.log(f"{who} died ({self.last_death}); its unfinished jobs "
                     f"{'go to the next free worker' if left is not None else 'were all committed'}")
        else:
            self.log(f"{who} died while starting ({self.last_death})")
        if slot.deaths >= MAX_DEATHS:
            slot.actor, slot.retired = None, True
            self._show(slot, f"retired after {slot.deaths} deaths")
        else:
            self._spawn(slot)

    def _show(self, slot: _Slot, status: str) -> None:
        if self.progress and hasattr(self.progress, "worker"):
            self.progress.worker(slot.name, " · ".join(s for s in (slot.where, status) if s))


def _take(queue: deque, key: str | None) -> Group:
    """The next group, preferring one that uses the models the worker already holds."""
    for i, group in enumerate(queue):
        if key is not None and group.key == key:
            del queue[i]
            return group
    return queue.popleft()


def _give_up(work: Work, queue: deque, reason: str) -> None:
    while queue:
        work.abandon(queue.popleft(), reason)


def _cpus_each(nodes: list[dict], n: int, gpu: bool) -> int:
    """The most CPUs each of n workers can have with every worker placed (Ray sets the worker's
    thread count, OMP_NUM_THREADS, to it)."""
    most = max((int(r.get("CPU", 0)) for r in nodes), default=1)
    for each in range(max(most, 1), 0, -1):
        fits = sum(min(int(r.get("GPU", 0)), int(r.get("CPU", 0)) // each) if gpu else int(r.get("CPU", 0)) // each
                   for r in nodes)
        if fits >= n:
            return each
    return 1


def _probe(address: str) -> None:
    """Fail in seconds where nothing answers at the cluster's address (Ray itself retries for minutes)."""
    import socket

    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        address = canonicalize_bootstrap_address_or_die(address)  # "auto": the cluster this machine runs
    except ImportError:  # another Ray version: let ray.init find it
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError):
        raise ConnectionError(f"nothing answers at {address}") from None


def _kill(actor) -> None:
    if actor is None:
        return
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone, or Ray is shutting down
        pass


def _why(error: Exception) -> str:
    """Why a worker died, in a few words (Ray's own message is a page long)."""
    message = str(error)
    if "creation task" in message:  # it never started: e.g. gcr is not installed on that node
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1] if lines else "")
        return f"it could not start: {cause}"
    name = type(error).__name__
    return {"ActorDiedError": "killed, out of memory or crashed", "ActorUnavailableError": "unreachable",
            "NodeDiedError": "its node was lost", "OwnerDiedError": "its node was lost"}.get(name, name)
