"""The acceptance to expect from speculative decoding: critique texts replayed through the drafter.

Each critique is treated as if the critic had written exactly that text in answer to the real prompt
(gcr.prompts' messages for its request, rendered with the chat template): the decoder's own drafter
(`speculate.draft_tokens`) proposes K tokens at every step and the decoder's own commit rule
(`speculate.commit_lengths`) keeps those that match the text. What comes out is how many forward passes
the critic would need, with no model at all: the fraction of drafted tokens accepted and the tokens
written per verify step, for each K.

`gcr bench --speculate-replay DIR` runs it. A directory holds critique texts (`*.txt`) and, optionally,
`requests.json` mapping a file name to {"task": "t2i" | "edit", "request": "..."}; a file it does not
list has its task and request read from the critique's own analysis (`infer_request`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gcr.errors import UsageError
from gcr.records import EDIT, T2I, TASKS

REPLAY_KS = (2, 3, 4, 5, 6, 7, 8)
MANIFEST = "requests.json"
TOKENIZER_NOTE = ("Tokens are counted with gcr's code-built byte-level tokenizer (1,024 BPE tokens learned "
                  "from the critic prompts, so offline runs work); the real Qwen tokenizer (151k tokens) "
                  "writes fewer, longer tokens, so its acceptance and tokens per step come out somewhat "
                  "different.")
_LEAD_INS = ("the user wants", "the user asks for", "the instruction asks for", "the instruction is",
             "the request is", "the request", "the user request", "instruction", "request")
_QUOTED = re.compile(r"[\"“]([^\"”]{8,})[\"”]")


@dataclass(frozen=True)
class ReplaySample:
    """One critique and the request it answers."""

    name: str            # file name
    task: str            # t2i or edit: which prompt (and how many images) it answers
    request: str         # the user's request, as the prompt would carry it
    text: str            # the critique, exactly as stored
    inferred: bool       # True when task and request were read from the critique, not the manifest


def load_corpus(directory) -> list[ReplaySample]:
    """Every `*.txt` critique in `directory`, sorted by name, with its task and request."""
    root = Path(directory)
    files = sorted(root.glob("*.txt")) if root.is_dir() else []
    if not files:
        raise UsageError(f"{root} holds no critique texts (*.txt): point --speculate-replay at a folder "
                         "of critiques, e.g. tests/data/critiques in a gcr checkout.")
    manifest = {}
    if (root / MANIFEST).is_file():
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{root / MANIFEST} is not valid JSON ({exc}): fix it or remove it.") from None
    samples = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        entry = manifest.get(path.name)
        if entry is not None:
            task, request = entry.get("task"), entry.get("request")
            if task not in TASKS or not isinstance(request, str) or not request.strip():
                raise UsageError(f"{root / MANIFEST}: the entry for {path.name} needs a task ({' or '.join(TASKS)}) "
                                 "and a non-empty request.")
            samples.append(ReplaySample(path.name, task, request, text, inferred=False))
        else:
            task, request = infer_request(text)
            samples.append(ReplaySample(path.name, task, request, text, inferred=True))
    return samples


def infer_request(text: str) -> tuple[str, str]:
    """(task, request) read from a critique: edit when it judges Image Faithfulness; the request is the
    quoted instruction in the User Request Analysis, else that section's first sentence without its
    lead-in ("The user wants ...")."""
    task = EDIT if re.search(r"image\s+faithfulness", text, re.IGNORECASE) else T2I
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    analysis: list[str] = []
    started = not any("request analysis" in line.lower() for line in lines)
    for line in lines:
        plain = line.strip("#*`: ").lower()
        if "request analysis" in plain:
            started = True
            continue
        if "detailed judgement" in plain or "detailed judgment" in plain:
            break
        if started and line and not line.startswith(("<", "```", "---")) and not plain.startswith("sure"):
            analysis.append(line)
    if not analysis:
        return task, "an image"
    first = analysis[0]
    for lead in _LEAD_INS:
        if first.lower().startswith(lead):
            first = first[len(lead):].lstrip(" :,")
            break
    quoted = _QUOTED.match(first)  # the instruction itself in quotes: 'Instruction: "Replace ..."'
    if quoted:
        return task, quoted.group(1).strip()
    sentence = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0].rstrip(".")
    return task, sentence.strip() or "an image"


def prompt_ids(processor, sample: ReplaySample) -> list[int]:
    """The critic prompt for the sample's request, as TransformersCritic renders it (generation prompt
    added). The images are small grey placeholders: their tokens never match text, so their number does
    not change what the drafter finds."""
    from PIL import Image

    from gcr.prompts import build_messages

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    source = Image.new("RGB", (64, 64), (96, 96, 96)) if sample.task == EDIT else None
    rendered = processor.apply_chat_template([build_messages(sample.task, sample.request, image, source)],
                                             add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    return rendered["input_ids"][0].tolist()


def answer_ids(tokenizer, text: str, eos_id: int) -> list[int]:
    """The critique as the critic would write it: its tokens up to and including the first end-of-turn
    (appended when the text has none; generation stops there)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids + [eos_id]


def replay(prompts: list[list[int]], answers: list[list[int]], k: int, eos_id: int) -> dict:
    """Decode every answer as a batch with K drafts per step, as if the model wrote exactly that text.

    The first token comes from the prefill (no drafts), as in the decoder. Returns totals: verify steps
    (over rows still writing), drafted and accepted tokens, tokens written after the first.
    """
    import torch

    from gcr.critics.speculate import commit_lengths, draft_tokens

    rows = len(prompts)
    width = max(len(p) + len(a) for p, a in zip(prompts, answers)) + k + 1
    seq = torch.full((rows, width), -1, dtype=torch.long)
    for r, (prompt, answer) in enumerate(zip(prompts, answers)):
        seq[r, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
    prompt_len = torch.tensor([len(p) for p in prompts])
    max_new = torch.tensor([len(a) for a in answers])
    valid = seq >= 0
    eos = torch.tensor([eos_id])
    done = torch.ones(rows, dtype=torch.long)
    finished = torch.tensor([len(a) == 1 for a in answers])
    offsets = torch.arange(k + 1)
    steps = accepted = 0
    while not bool((finished | (done >= max_new)).all()):
        end = prompt_len + done
        drafts = draft_tokens(seq, end, valid, k)
        truth = seq.gather(1, (end[:, None] + offsets).clamp(max=width - 1))
        m, first_eos = commit_lengths(drafts, truth, done, finished, eos, max_new)
        active = m > 0
        steps += int(active.sum())
        accepted += int((m - 1).clamp(min=0).sum())
        finished = finished | (active & (first_eos < m))
        done = done + m
    return {"k": k, "verify_steps": steps, "drafted": steps * k, "accepted": accepted,
            "tokens": int((max_new - 1).sum())}


def replay_corpus(samples: list[ReplaySample], processor=None, ks=REPLAY_KS) -> dict:
    """Acceptance and tokens per verify step for each K over the samples (what `gcr bench` reports)."""
    from gcr.critics.speculate import COST_PER_DRAFT, verify_cost

    if processor is None:
        from gcr.tiny.critic import build_critic_processor

        processor = build_critic_processor()
    tokenizer = processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [prompt_ids(processor, s) for s in samples]
    answers = [answer_ids(tokenizer, s.text, eos_id) for s in samples]
    per_k = {}
    for k in ks:
        totals = replay(prompts, answers, k, eos_id)
        per_sample = [replay([p], [a], k, eos_id) for p, a in zip(prompts, answers)]
        tokens_per_step = totals["tokens"] / totals["verify_steps"] if totals["verify_steps"] else 0.0
        per_k[str(k)] = {
            **totals,
            "acceptance": totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0,
            "tokens_per_step": tokens_per_step,
            # Expected decode speed-up over one token per step, under the ASSUMED verify cost
            # (speculate.COST_PER_DRAFT) at batch 1 and 16; `gcr bench --speculate` measures the cost.
            "expected_speedup": {str(b): tokens_per_step / verify_cost(k, b) for b in COST_PER_DRAFT},
            "tokens_per_step_by_sample": {s.name: r["tokens"] / r["verify_steps"] if r["verify_steps"] else 0.0
                                          for s, r in zip(samples, per_sample)},
        }
    return {
        "samples": [{"name": s.name, "task": s.task, "request": s.request, "inferred": s.inferred,
                     "prompt_tokens": len(p), "critique_tokens": len(a)}
                    for s, p, a in zip(samples, prompts, answers)],
        "ks": list(ks),
        "by_k": per_k,
        "cost_model": {"verify_cost_per_draft": {str(b): c for b, c in COST_PER_DRAFT.items()},
                       "note": "ASSUMED verify cost (1 + c*K one-token steps), not measured"},
        "tokenizer": "gcr code-built byte-level BPE (gcr.tiny.critic)",
        "note": TOKENIZER_NOTE,
    }
