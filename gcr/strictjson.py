"""Strict JSON for everything gcr prints or writes for scripts: never NaN or Infinity.

Python's json writes NaN and Infinity by default, which is not JSON: jq, JavaScript and most other
parsers refuse it. `dumps` first replaces every non-finite float with null (a time budget of inf
means "none", a rate over zero seconds means "unknown"), then serializes with allow_nan=False, so a
non-finite value that slipped through fails here, loudly, instead of reaching a script.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None; dicts, lists and tuples are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = 2, **kwargs) -> str:
    """json.dumps for output: strict JSON (see the module docstring)."""
    return json.dumps(finite(value), indent=indent, allow_nan=False, **kwargs)
