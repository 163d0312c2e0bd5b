"""Test doubles for the loop: a generator and a critic that need no model. Tests only."""
from __future__ import annotations

import hashlib

from PIL import Image


def critique_text(tf=3.0, pq=3.0, tr="N/A", refined="a refined request", imf=None, summary="ok") -> str:
    """A critique in the RationalRewards output format (edit when imf is given)."""
    dims = [("Text Faithfulness", tf)]
    if imf is not None:
        dims.append(("Image Faithfulness", imf))
    dims += [("Physical and Visual Quality", pq), ("Text Rendering", tr)]
    body = "\n".join(f"{i}. {name}:\n## Justification: because.\n## Score: {score}"
                     for i, (name, score) in enumerate(dims, 1))
    return (f"# User Request Analysis\nThe user wants something.\n# Detailed Judgement\n{body}\n"
            f"# Summary: {summary}\n\n# User Request Refinement:\n## Refinement Comments: more detail\n"
            f"## Refined Request: {refined}")


class FakeGenerator:
    """Solid-colour images whose colour is a pure function of (prompt, seed, source image)."""

    id = "fake-generator"

    def __init__(self, task="t2i", fail_on=None):
        self.task, self.fail_on, self.calls = task, fail_on, []

    def generate(self, requests):
        self.calls.append(list(requests))
        images = []
        for r in requests:
            if self.fail_on and self.fail_on in r.prompt:
                raise RuntimeError(f"cannot draw {self.fail_on}")
            src = r.source_image.tobytes()[:16] if r.source_image is not None else b""
            h = hashlib.sha256(f"{r.prompt}|{r.seed}".encode() + src).digest()
            images.append(Image.new("RGB", (16, 16), tuple(h[:3])))
        return images

    def describe(self):
        return {"source": "fake", "device": "cpu", "settings": {}}


class ScriptedCritic:
    """Answers with `script(request, call_index, image)`; records every batch it is sent."""

    id = "scripted-critic"

    def __init__(self, script, task="t2i"):
        self.script, self.task, self.calls, self.retries = script, task, [], 0

    def critique(self, requests, retry=False):
        self.calls.append(list(requests))
        self.retries += bool(retry)
        return [self.script(r.request, len(self.calls), r.image) for r in requests]


def use_fake_models(monkeypatch, critic, generator=None):
    """Make `gcr refine` and `gcr batch` run on these doubles instead of loading models: everything
    else (checks, the loop, the store, the tables) is the real code."""
    from gcr import runner

    monkeypatch.setattr(runner, "choose_memory_plan", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner.ModelCache, "generator", lambda self, opts, log, **kw: generator or FakeGenerator())
    monkeypatch.setattr(runner.ModelCache, "critic", lambda self, opts, task, log, **kw: critic)
    return critic
