"""The models `gcr demo` runs: a tiny random Flux pipeline and a tiny critic taught a few critiques.

Built once into a cache folder under the runs home and reused. The generator is random, so it draws
noise; the critic has learnt one critique per demo request (whatever the image), so every round is
scored and its Refined Request becomes the next prompt. That is enough to watch the loop work end to
end offline, and nothing more: the scores mean nothing.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

DEMO_VERSION = 1        # bump when the lessons or the models change: the cache is rebuilt
IMAGE_SIZE = 64
STEPS = 2
SEED = 7
MAX_NEW_TOKENS = 400    # the taught critiques are ~250 tokens of the tiny byte-level vocabulary


@dataclass(frozen=True)
class DemoCritique:
    request: str
    text_faithfulness: float
    physical_quality: float
    text_rendering: float | None        # None: N/A, nothing to read in the request
    problem: str                        # what the critic "saw"
    refined_request: str


CRITIQUES = (
    DemoCritique("a fox reading a newspaper", 2.5, 3.0, None,
                 "the fox is there but the newspaper is hard to make out",
                 "a red fox sitting on a park bench, holding an open newspaper in both paws, soft morning light"),
    DemoCritique("a lighthouse at night", 3.0, 3.25, None,
                 "the night sky is there but the lighthouse has no visible beam",
                 "a white lighthouse on a rocky cliff at night, its bright beam sweeping over a calm sea"),
    DemoCritique("a shop sign that reads OPEN", 2.75, 3.5, 2.0,
                 "there is a sign but its letters are not legible",
                 'a wooden shop sign above a door, painted with the word "OPEN" in large white capital letters'),
)


def critique_text(c: DemoCritique) -> str:
    """The critique in the RationalRewards output format."""
    rendering = "N/A" if c.text_rendering is None else f"{c.text_rendering}"
    why_rendering = ("No text was requested." if c.text_rendering is None
                     else "The requested word is not readable.")
    return (f"# User Request Analysis\nThe user asks for {c.request}.\n"
            f"# Detailed Judgement\n1. Text Faithfulness:\n## Justification: {c.problem[0].upper()}{c.problem[1:]}.\n"
            f"## Score: {c.text_faithfulness}\n"
            f"2. Physical and Visual Quality:\n## Justification: Plausible shapes and light.\n"
            f"## Score: {c.physical_quality}\n"
            f"3. Text Rendering:\n## Justification: {why_rendering}\n## Score: {rendering}\n"
            f"# Summary: Close, but {c.problem}.\n\n# User Request Refinement:\n"
            f"## Refinement Comments: Say exactly what should be seen.\n"
            f"## Refined Request: {c.refined_request}")


@dataclass(frozen=True)
class DemoModels:
    generator: Path
    critic: Path


def demo_models(cache: Path, log=lambda msg: None) -> DemoModels:
    """The demo's models under `cache`, built on first use (about 20 s on two cores), then reused."""
    home = Path(cache).resolve() / f"demo-v{DEMO_VERSION}"
    models = DemoModels(home / "flux", home / "critic")
    if (home / "ready").is_file():
        return models
    from gcr.tiny import build_tiny_critic, build_tiny_pipeline
    from gcr.tiny.teach import Lesson, teach_critic

    # Built in a scratch folder and renamed into place: a crash never leaves a half-built cache.
    scratch = home.with_name(home.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    log("building a tiny random Flux pipeline and a tiny Qwen3-VL critic")
    build_tiny_pipeline("flux", scratch / "flux")
    build_tiny_critic(scratch / "critic-random")
    log(f"teaching the critic {len(CRITIQUES)} critiques (once; about 15 s)")
    lessons = [Lesson("t2i", c.request, image, critique_text(c))
               for c in CRITIQUES for image in _training_images()]
    teach_critic(scratch / "critic-random", scratch / "critic", lessons)
    shutil.rmtree(scratch / "critic-random")
    (scratch / "ready").write_text(f"gcr demo models v{DEMO_VERSION}\n")
    shutil.rmtree(home, ignore_errors=True)
    scratch.rename(home)
    return models


def _training_images():
    """A solid colour and noise: the critique must not depend on the image (the generator draws noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    noise = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (90, 120, 160)), Image.fromarray(noise)]
