"""JSON output of explanation results: `json_safe` now lives in `vlmscope.results` (kept here for importers)."""

from __future__ import annotations

from vlmscope.results import json_safe

__all__ = ["json_safe"]
