"""`vlmscope convert shikra`: write a stock transformers checkpoint from one of the seeds' original ones."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from vlmscope.cli._common import add_json_arg, emit_json, human_stream

DTYPES = ("float32", "float16", "bfloat16")


def register(sub: Any) -> None:
    parser = sub.add_parser("convert", help="convert an original Shikra checkpoint to a stock LLaVA one")
    parser.add_argument("family", choices=("shikra",), help="the original model family")
    parser.add_argument("--checkpoint", required=True, help="the merged original checkpoint folder")
    parser.add_argument("--vision-tower", default=None,
                        help="the CLIP ViT-L/14 folder Shikra loads (default: the config's mm_vision_tower)")
    parser.add_argument("--out", required=True, help="a new (or empty) folder for the stock checkpoint")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")
    parser.add_argument("--image-pad", choices=("white", "none"), default="white",
                        help="white: pad images to a square as Shikra does (default); none: as OPERA/PAI run it")
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmscope.errors import InputError
    from vlmscope.models.convert.shikra import convert_shikra

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise InputError(f"--checkpoint {checkpoint} is not a folder: point to the original checkpoint folder")
    if args.vision_tower is not None and not Path(args.vision_tower).is_dir():
        raise InputError(f"--vision-tower {args.vision_tower} is not a folder: point to the CLIP model folder")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty folder: name a new folder")
    created = not out.exists()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        convert_shikra(checkpoint, out, vision_tower=args.vision_tower, dtype=dtype, image_pad=args.image_pad)
    except BaseException:
        # Nothing half-written stays behind (the folder was new or empty).
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    summary = {"family": args.family, "out": str(out), "class": "LlavaForConditionalGeneration",
               "files": sorted(p.name for p in out.iterdir())}
    if args.json:
        emit_json(summary)
    else:
        print(f"wrote a stock LLaVA checkpoint of {args.family} to {out}", file=human_stream(args))
    return 0
