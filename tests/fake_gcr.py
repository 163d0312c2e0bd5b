"""The real gcr CLI with the test doubles of tests/fakes.py standing in for the models.

`install(setattr)` makes every generator named `fake...` a FakeGenerator and every critic named
`fake...` a scripted critic (other names load for real, so a real loader's failure stays real);
`python -m tests.fake_gcr ARGS` runs the CLI so in a real process, for the kill, concurrency and
storage-fault tests, where the models are beside the point and a round should take milliseconds
(or GCR_FAKE_DELAY seconds). Tests only: the product never ships a fake.

Environment: GCR_FAKE_DELAY (seconds per generator call), GCR_FAKE_FAIL_ON (a prompt whose
generation fails), GCR_FAKE_KILL_ON (a prompt whose generation kills the process with SIGKILL, as
the kernel's OOM killer would), GCR_FAKE_CRITIC_FAIL_ON (a request whose critique fails),
GCR_FAKE_CRITIC_DELAY (seconds per critic call), GCR_FAKE_CRITIC_LOG (a file that gets one line per
critiqued image: the sha256 of its pixels, then the request). With `--workers N` the doubles are
installed in every Ray worker too (GCR_FAKE_WORKER_BROKEN: workers that cannot start).
"""
from __future__ import annotations

import hashlib
import os
import signal
import time

from tests.fakes import FakeGenerator, ScriptedCritic, critique_text


class SlowGenerator(FakeGenerator):
    def generate(self, requests):
        time.sleep(float(os.environ.get("GCR_FAKE_DELAY", "0")))
        kill_on = os.environ.get("GCR_FAKE_KILL_ON")
        if kill_on and any(kill_on in r.prompt for r in requests):
            os.kill(os.getpid(), signal.SIGKILL)
        fail_on = os.environ.get("GCR_FAKE_FAIL_ON")
        if fail_on and any(fail_on in r.prompt for r in requests):
            raise RuntimeError(f"the fake generator cannot draw {fail_on!r}")
        return super().generate(requests)


class SlowCritic(ScriptedCritic):
    """The scripted critic, as slow as GCR_FAKE_CRITIC_DELAY says, logging what it judges; an edit
    critique scores image faithfulness too, as the edit critic does."""

    def critique(self, requests, retry=False):
        time.sleep(float(os.environ.get("GCR_FAKE_CRITIC_DELAY", "0")))
        texts = super().critique(requests, retry)
        log = os.environ.get("GCR_FAKE_CRITIC_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as f:
                for r in requests:
                    f.write(f"{hashlib.sha256(r.image.tobytes()).hexdigest()} {r.request}\n")
        if self.task == "edit":
            texts = [t.replace("2. Physical", "2. Image Faithfulness:\n## Justification: kept.\n## Score: 3.0\n"
                               "3. Physical") for t in texts]
        return texts


def judge(request, call_index, image):
    """Scores and a refined request that depend only on the request and the image (never on the
    call count), so a resumed run gets what an uninterrupted one gets. Always below the target."""
    fail_on = os.environ.get("GCR_FAKE_CRITIC_FAIL_ON")
    if fail_on and fail_on in request:
        raise RuntimeError(f"the fake critic cannot judge {fail_on!r}")
    h = hashlib.sha256(image.tobytes()).digest()
    return critique_text(tf=1.0 + h[0] % 20 / 10, pq=1.0 + h[1] % 20 / 10,
                         refined=f"{request} (take {h[2:6].hex()})")  # never proposed twice: no `converged`


def install(set_attr) -> None:
    """Patch gcr.runner.ModelCache with `set_attr(obj, name, value)` (monkeypatch.setattr or setattr)."""
    from gcr import runner

    real_generator, real_critic = runner.ModelCache.generator, runner.ModelCache.critic

    def generator(self, opts, log, **kw):
        if str(opts.generator).startswith("fake"):
            return SlowGenerator(task=opts.task or "t2i")
        return real_generator(self, opts, log, **kw)

    def critic(self, opts, task, log, **kw):
        if opts.critic is None or str(opts.critic).startswith(("fake", "scripted-critic")):
            return SlowCritic(judge, task=task)
        return real_critic(self, opts, task, log, **kw)

    set_attr(runner.ModelCache, "generator", generator)
    set_attr(runner.ModelCache, "critic", critic)

    # The checks made before loading anything know every real model name; the fakes are not one.
    from gcr import batchfile, modelspec

    real_generator_task, real_critic_task = modelspec.generator_task, modelspec.critic_task

    def generator_task(spec):
        return (None, None) if str(spec).startswith("fake") else real_generator_task(spec)

    def critic_task(spec):
        return (None, None) if str(spec).startswith(("fake", "scripted-critic")) else real_critic_task(spec)

    for module in (modelspec, batchfile):
        set_attr(module, "generator_task" if module is modelspec else "_generator_task", generator_task)
        set_attr(module, "critic_task" if module is modelspec else "_critic_task", critic_task)

    _carry_to_ray_workers(set_attr)


def _carry_to_ray_workers(set_attr) -> None:
    """`gcr batch --workers N` runs the models in Ray worker processes: a cluster this process starts
    or joins makes each of its workers install the same doubles first (Ray's worker_process_setup_hook)."""
    from gcr.distributed import cluster

    real_connect = cluster.Cluster._connect

    def connect(self):
        import ray

        real_init = ray.init

        def init(*args, **kwargs):
            env = {**(kwargs.pop("runtime_env", None) or {}), "worker_process_setup_hook": "tests.fake_gcr.setup_worker"}
            return real_init(*args, runtime_env=env, **kwargs)

        ray.init = init
        try:
            return real_connect(self)
        finally:
            ray.init = real_init

    set_attr(cluster.Cluster, "_connect", connect)


def setup_worker() -> None:
    """Run by Ray in each worker process before it takes work (GCR_FAKE_WORKER_BROKEN: a node where
    gcr cannot start, e.g. not installed there)."""
    if os.environ.get("GCR_FAKE_WORKER_BROKEN"):
        raise ModuleNotFoundError("No module named 'gcr'")
    install(setattr)


if __name__ == "__main__":
    install(setattr)
    from gcr.cli import main

    main()
