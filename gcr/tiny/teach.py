"""Teach the tiny critic to write given critiques: a readable critic in seconds, for `gcr demo` and tests.

A random-weight critic writes gibberish, so every round it judges is unscored. Teacher forcing on a
handful of (request, image) -> critique lessons makes the tiny Qwen3-VL answer those prompts with those
critiques under greedy decoding. Each prompt is rendered exactly as the in-process critic renders it
(gcr.prompts + the processor's chat template, generation prompt added), so when gcr loads the saved
checkpoint through its real loader it writes the lesson's critique back. Its scores mean nothing: it has
learnt text, not taste.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

STEPS_PER_LESSON = 40    # ~0.05 s a step on one core; every lesson then ends below ~0.05 loss per token
LEARNING_RATE = 3e-3
SEED = 0


@dataclass(frozen=True)
class Lesson:
    """One prompt the critic must answer with `critique`."""

    task: str
    request: str                 # the ORIGINAL request, as the loop always sends it
    image: Any                   # PIL image judged
    critique: str                # the exact text to write (then end of turn)
    source_image: Any = None     # edit lessons: the image that was edited


def teach_critic(source: Path, out_dir: Path, lessons: Sequence[Lesson], *, steps: int | None = None,
                 min_loss: float = 0.1) -> Path:
    """Load the critic at `source`, teach it `lessons`, save it to `out_dir` (safetensors). Returns out_dir.

    Raises RuntimeError when the loss stays above `min_loss` (the critic would not repeat its lessons).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gcr.devices import quiet_transformers

    with quiet_transformers():   # loaded as gcr loads it: safetensors, fp32, CPU
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, device_map="cpu",
                                                            use_safetensors=True)
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    steps = steps or STEPS_PER_LESSON * len(lessons) + 60

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        examples = [_example(processor, lesson, end_of_turn) for lesson in lessons]
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        for step in range(steps):
            loss = model(**examples[step % len(examples)]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # every lesson learnt, not only the last one seen
            worst = max(model(**example).loss.item() for example in examples)
        model.eval()
    if worst > min_loss:
        raise RuntimeError(f"the tiny critic did not learn its critiques (loss {worst:.3f})")

    out_dir = Path(out_dir)
    with quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
    return out_dir


def render_prompt(processor, lesson: Lesson):
    """The critic prompt for one lesson, as gcr.critics.inprocess renders it (a batch of one)."""
    from gcr.prompts import build_messages

    return processor.apply_chat_template(
        [build_messages(lesson.task, lesson.request, lesson.image, lesson.source_image)],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )


def _example(processor, lesson: Lesson, end_of_turn: int) -> dict:
    """Prompt + critique + <|im_end|> in one sequence; the loss counts only the critique and <|im_end|>."""
    import torch

    inputs = dict(render_prompt(processor, lesson))
    prompt_len = inputs["input_ids"].shape[1]
    target = torch.tensor([processor.tokenizer(lesson.critique, add_special_tokens=False)["input_ids"]
                           + [end_of_turn]])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], target], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(target)], dim=1)
    if "mm_token_type_ids" in inputs:   # 1 at image tokens; the answer has none
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(target)], dim=1)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, prompt_len:] = target
    inputs["labels"] = labels
    return inputs
