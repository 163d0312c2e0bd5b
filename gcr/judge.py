"""The independent judge: a second scorer that gcr reports but never optimizes.

A loop that optimizes one judge's scores can learn to please that judge (reward hacking). So next to
the critic, whose scores steer the loop, gcr can run a judge of another family whose scores it only
records: every candidate of every round (and every image of `gcr score`) gets one number, shown in
`gcr show`, `gcr compare` and the report. The judge never chooses a candidate, a round, a stop or a
prompt: it is applied in the sink, after the loop has made its decisions (`JudgedSink`), and nothing
that decides reads it. Like the critic, it judges the user's ORIGINAL request, never a refined prompt.

The CLIP family, through transformers:
- CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"):
  2.5 * max(cos(E_image, E_text), 0), with any CLIP checkpoint; the `clipscore` preset is their
  ViT-B/32. gcr scores the request as written (no "A photo depicts" prefix, which the paper adds for
  captions), so values run from 0 to 2.5 and are comparable only between runs of the same judge.
- PickScore (Kirstain et al. 2023, Pick-a-Pic): logit_scale.exp() * cos(E_image, E_text), as its
  model card computes it; the `pickscore` preset loads `yuvalkirstain/PickScore_v1` with the
  processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, as the card does.

A judge spec is a preset (`clipscore`, `pickscore`), a hub id or local directory of a CLIP checkpoint
(scored with CLIPScore), or either of those prefixed with the formula: `pickscore:./my-pickscore`.
For an edit, the judge scores the edited image against the instruction: a weak signal for edits,
reported all the same so both tasks have the column.

Weights load as safetensors only, and repository code runs only with --allow-remote-code. Nothing
heavy is imported at module level: `resolve_judge` and `judge_problem` run before torch is imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gcr.errors import ModelLoadError, OutOfMemory, UsageError

CLIPSCORE = "clipscore"
PICKSCORE = "pickscore"
METRICS = (CLIPSCORE, PICKSCORE)
CLIPSCORE_W = 2.5      # Hessel et al.'s rescaling weight
MAX_TEXT_TOKENS = 77   # CLIP's text positions: longer requests are cut here (CLIP cannot read further)


@dataclass(frozen=True)
class JudgeSource:
    """Where a judge spec points and how it scores."""

    id: str                      # the spec as the user wrote it
    model: str                   # hub id or absolute directory of the weights
    processor: str               # hub id or absolute directory of the processor
    metric: str                  # CLIPSCORE or PICKSCORE


def resolve_judge(spec: str) -> JudgeSource:
    """A judge spec (see the module notes) -> where to load it from; UsageError when it cannot be one.
    Reads no weights and imports no torch."""
    from gcr.presets import resolve_judge as resolve_spec

    name = spec.strip()
    metric, location = None, name
    prefix, sep, rest = name.partition(":")
    if sep and prefix in METRICS and rest.strip():
        metric, location = prefix, rest.strip()
    elif not name:
        raise UsageError("The judge is empty: name a preset (clipscore, pickscore), a CLIP directory or a hub id.")
    preset, source, is_local = resolve_spec(location)
    processor = preset.processor if preset and preset.processor else source
    if is_local:
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise UsageError(f"The judge directory {location} has no config.json, so it is not a model: point at "
                             "a CLIP checkpoint saved with save_pretrained, or use clipscore or pickscore.")
        source = processor = str(path.resolve())
    return JudgeSource(id=name, model=source, processor=processor,
                       metric=metric or (preset.metric if preset else CLIPSCORE))


def absolute_spec(spec: str) -> str:
    """`spec` as it is recorded with a run: a local directory made absolute (a resumed run finds it from
    any folder), the formula prefix kept; presets and hub ids as written."""
    source = resolve_judge(spec)
    if Path(source.model).is_absolute() and Path(source.model).is_dir():
        prefix = spec.strip().partition(":")[0]
        return f"{prefix}:{source.model}" if spec.strip().startswith(tuple(f"{m}:" for m in METRICS)) else source.model
    return source.id


def judge_problem(spec) -> str | None:
    """Why `spec` cannot be a judge, as a sentence fragment (batch files list it with its line), or None."""
    if not isinstance(spec, str):
        return f"judge must be a preset name, a directory or a hub id, not {type(spec).__name__}"
    try:
        resolve_judge(spec)
    except UsageError as e:
        text = str(e).rstrip(".")
        return text[:1].lower() + text[1:]
    return None


def load_judge(spec: str, *, device: str = "auto", dtype: str = "auto",
               allow_remote_code: bool = False) -> ClipJudge:
    """Load a judge into this process (safetensors only; remote code only when allowed)."""
    from gcr.devices import quiet_transformers, resolve_device, resolve_dtype

    source = resolve_judge(spec)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)

    import torch
    from transformers import AutoModel, AutoProcessor

    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(source.processor, trust_remote_code=allow_remote_code)
            model = AutoModel.from_pretrained(source.model, dtype=resolved_dtype, use_safetensors=True,
                                              trust_remote_code=allow_remote_code).to(resolved_device)
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(f"the judge {source.id} does not fit in GPU memory: free some, or run it with "
                          "--device cpu.") from exc
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        from gcr.modelspec import load_failure

        raise load_failure("judge", source.id, source.model, exc, "check the name, your network or Hugging Face "
                           "cache, or pass a local CLIP directory saved with safetensors.") from exc
    if not all(hasattr(model, a) for a in ("get_image_features", "get_text_features", "logit_scale")):
        raise ModelLoadError(f"the judge {source.id} is a {type(model).__name__}, not a CLIP model: use a CLIP "
                             "checkpoint (or the clipscore or pickscore preset).")
    model.eval()
    return ClipJudge(source, model, processor)


class ClipJudge:
    """A CLIP-family judge in this process: one number per (request, image) pair."""

    def __init__(self, source: JudgeSource, model, processor):
        self.source, self.model, self.processor = source, model, processor
        self.id, self.metric = source.id, source.metric

    def describe(self) -> dict:
        """What a run or score job records about its judge (JSON-ready)."""
        formula = ("2.5 * max(cos(image, text), 0)" if self.metric == CLIPSCORE
                   else "logit_scale.exp() * cos(image, text)")
        return {"id": self.id, "model": self.source.model, "processor": self.source.processor,
                "metric": self.metric, "formula": formula, "device": str(self.model.device),
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    def score(self, pairs: Sequence[tuple[str, object]]) -> list[float]:
        """The judge's score of each (request, PIL image) pair, in order: one batched forward pass."""
        if not pairs:
            return []
        import torch

        texts = [text for text, _ in pairs]
        images = [image.convert("RGB") for _, image in pairs]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True,
                                max_length=MAX_TEXT_TOKENS)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        try:
            with torch.inference_mode():
                out = self.model(**inputs)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(f"the judge ran out of GPU memory scoring {len(pairs)} images at once: score "
                              "fewer at a time.") from exc
        # The forward pass returns both embeddings; normalized again here so the formula does not
        # depend on whether a checkpoint's class already normalizes them.
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        cos = (image * text).sum(dim=-1)
        if self.metric == PICKSCORE:
            values = self.model.logit_scale.float().exp() * cos
        else:
            values = CLIPSCORE_W * cos.clamp(min=0)
        return [_finite(v) for v in values.tolist()]


def _finite(v: float) -> float | None:
    return round(v, 6) if math.isfinite(v) else None


DISAGREE = "critic and judge disagree"
DISAGREE_NOTE = (f"! {DISAGREE}: the critic's overall went up from round 1 to the best round while the "
                 "judge's score went down")


def judge_name(run) -> str | None:
    """The judge a run was scored by (its spec as recorded), or None."""
    judge = run.settings.get("judge") if isinstance(run.settings, dict) else None
    return str(judge.get("id")) if isinstance(judge, dict) and judge.get("id") is not None else None


def disagree(gain, judge_first, judge_best) -> bool | None:
    """Critic up (a positive `gain`, best round over round 1) while the judge went down; None when
    either cannot be told (no judge, an unscored round)."""
    if gain is None or judge_first is None or judge_best is None:
        return None
    return gain > 0 and judge_best < judge_first


class JudgedSink:
    """A loop sink that adds the judge's score to every candidate of a round, then hands the round on.

    The loop has chosen the round's candidate and its next prompt before `round_done` is called, and
    its stop rules read only the critic's fields: so the judge is recorded, never optimized."""

    def __init__(self, sink, judge):
        self.sink, self.judge = sink, judge

    def stage(self, round_index, stage, jobs):
        self.sink.stage(round_index, stage, jobs)

    def round_done(self, job, round_, images):
        return self.sink.round_done(job, judge_round(self.judge, job.request, round_, images), images)

    def job_done(self, job):
        self.sink.job_done(job)


def judge_round(judge, request: str, round_, images: list):
    """`round_` with each candidate's `judge` score (against the ORIGINAL request) filled in."""
    from dataclasses import replace

    if judge is None or not images or not round_.candidates:
        return round_
    scores = judge.score([(request, image) for image in images[:len(round_.candidates)]])
    candidates = tuple(replace(c, judge=s) for c, s in zip(round_.candidates, scores))
    return replace(round_, candidates=candidates + round_.candidates[len(candidates):])
