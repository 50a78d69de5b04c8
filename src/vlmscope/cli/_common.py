"""Helpers shared by CLI subcommands: model and method options, range-checked numbers, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError


def print_json_line(obj: Any) -> None:
    """Print one JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def emit_json(obj: Any) -> None:
    """The one JSON document a `--json` command prints on stdout (everything else goes to stderr)."""
    print_json_line(obj)


def add_json_arg(parser: Any, help: str = "print only JSON on stdout (human text goes to stderr)") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def human_stream(args: argparse.Namespace) -> Any:
    """Where human-readable text goes: stderr when --json asks for pure JSON on stdout."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def min_int(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (no silent fallback to a default for 0 or negatives)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def min_float(minimum: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= `minimum`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text}")
        return value

    parse.__name__ = f"number >= {minimum}"
    return parse


def check_device(device: str | None) -> str | None:
    """Refuse a device this torch cannot use, before any model loads (the same check as `vlmscope.load`)."""
    if device is not None:
        from vlmscope.models.loading import resolve_device

        resolve_device(device)
    return device


def check_out_dir(out: str | Path, owned: Callable[[str], bool], command: str) -> Path:
    """An output folder a command may (re)write: absent, empty, or holding only files it writes itself.

    Checked before any computation; `clear_owned` then removes the previous run's files just before saving,
    so a re-run never leaves stale files (overlays of other steps, say) beside the new ones."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} is a file; name a folder (it is created if missing)")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if not owned(p.name))
        if foreign:
            raise InputError(f"--out {path} holds files vlmscope {command} did not write (first: {foreign[0]}); "
                             "pass an empty or new folder")
    return path


def clear_owned(path: Path, owned: Callable[[str], bool]) -> None:
    if path.is_dir():
        for p in path.iterdir():
            if owned(p.name) and p.is_file():
                p.unlink()


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

    return vlmscope.load(args.model, device=check_device(args.device), dtype=args.dtype)
