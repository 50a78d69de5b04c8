"""Helpers shared by CLI subcommands."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json_line(obj: Any) -> None:
    """Print one JSON object on one line (scripts read the last stdout line)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()
