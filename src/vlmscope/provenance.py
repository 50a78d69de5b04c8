"""Provenance: the record every saved result carries, so a file says what produced it."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from typing import Any

from vlmscope.registry import spec_string


def versions() -> dict[str, str]:
    import torch
    import transformers

    from vlmscope import __version__

    return {"vlmscope": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def provenance(*, model_id: str | None = None, revision: str | None = None, decoding: Any = None,
               interventions: Iterable[Any] = (), seed: int | None = None, device: Any = None,
               dtype: Any = None, wall_seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """One JSON-ready record: versions, model and revision, method specs with all parameters, seed, device,
    dtype, wall time and creation time. Method specs are registry spec strings (`spec_string`)."""
    record: dict[str, Any] = {
        "versions": versions(),
        "model": model_id,
        "revision": revision,
        "decoding": spec_string(decoding) if decoding is not None and not isinstance(decoding, str) else decoding,
        "interventions": [i if isinstance(i, str) else spec_string(i) for i in interventions],
        "seed": seed,
        "device": None if device is None else str(device),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "wall_seconds": wall_seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record.update(extra)
    return record
