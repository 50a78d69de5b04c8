"""`vlmscope tiny-model`: write a random tiny model that loads offline."""

from __future__ import annotations

import argparse
from typing import Any

from vlmscope.models.tiny import ARCHS


def register(sub: Any) -> None:
    parser = sub.add_parser("tiny-model", help="write a random tiny model (tokenizer, processor, template)")
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmscope.errors import InputError
    from vlmscope.models.tiny import save_tiny

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; name a folder for the model")

    out = save_tiny(args.arch, args.out, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0
