"""JSON output of explanation results."""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """JSON has no infinity or NaN (an infinite entropy, a 0/0 share): write such floats as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
