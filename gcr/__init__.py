"""gcr: Generate-Critique-Refine for frozen image generators, judged by the RationalRewards critic.

The public library API is small and import-light (no torch until a model loads):
    from gcr import parse_critique
    c = parse_critique(text, task="t2i")   # or "edit"
"""
from .parse import DIMENSIONS, Critique, parse_critique

__all__ = ["parse_critique", "Critique", "DIMENSIONS", "__version__"]
__version__ = "0.1.0"
