"""Tiny random-weight models with the real architectures, built in code (no downloads).

Product code: `gcr selftest` and `gcr bench` run the whole pipeline on them on any CPU, and the tests
use the same builders. They are not test doubles: every component is the real diffusers/transformers class.
"""
from .pipelines import FAMILIES, build_tiny_pipeline


def build_tiny_critic(out_dir):
    """Build the tiny RationalRewards-shaped critic (imported lazily: it lives in gcr.tiny.critic)."""
    from .critic import build_tiny_critic as build

    return build(out_dir)


def build_tiny_clip(out_dir):
    """Build the tiny CLIP the independent judge runs on (gcr.tiny.clip; imported lazily)."""
    from .clip import build_tiny_clip as build

    return build(out_dir)


__all__ = ["FAMILIES", "build_tiny_pipeline", "build_tiny_critic", "build_tiny_clip"]
