"""Helpers shared by CLI subcommands."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json_line(obj: Any) -> None:
    """Print one JSON object on one line (scripts read the last stdout line)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def add_model_args(parser: Any, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="hub id, local directory, or built-in name")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the model's)")


def add_method_args(parser: Any) -> None:
    parser.add_argument("--decoding", default="greedy",
                        help="decoding method, e.g. greedy, beam:num_beams=5, opera:scale_factor=50")
    parser.add_argument("--intervention", action="append", default=[], metavar="SPEC",
                        help="intervention, e.g. pai:alpha=0.2 (repeatable; applied in order)")


def load_vlm(args: Any) -> Any:
    import vlmscope

    return vlmscope.load(args.model, device=args.device, dtype=args.dtype)
