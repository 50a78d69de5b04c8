"""`vlmscope convert shikra|minigpt4`: write a stock transformers checkpoint from one of the seeds' original ones."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from vlmscope.cli._common import add_json_arg, emit_json, human_stream, min_int

DTYPES = ("float32", "float16", "bfloat16")


def register(sub: Any) -> None:
    parser = sub.add_parser("convert", help="convert an original Shikra / MiniGPT-4 checkpoint to a stock one")
    parser.add_argument("family", choices=("shikra", "minigpt4"), help="the original model family")
    parser.add_argument("--checkpoint", required=True,
                        help="shikra: the merged checkpoint folder; minigpt4: pretrained_minigpt4*.pth")
    parser.add_argument("--llm", default=None, help="minigpt4: the Vicuna v0 folder")
    parser.add_argument("--blip2", default=None, help="minigpt4: blip2_pretrained_flant5xxl.pth (Q-Former, ln_vision)")
    parser.add_argument("--eva-vit", default=None, help="minigpt4: eva_vit_g.pth, when --blip2 holds no ViT")
    parser.add_argument("--vision-heads", type=min_int(1), default=16, help="minigpt4: ViT heads (EVA ViT-g: 16)")
    parser.add_argument("--image-size", type=min_int(1), default=224, help="minigpt4: input resolution (224)")
    parser.add_argument("--qformer-heads", type=min_int(1), default=12, help="minigpt4: Q-Former heads (12)")
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
    if args.family == "shikra" and not checkpoint.is_dir():
        raise InputError(f"--checkpoint {checkpoint} is not a folder: point to the original checkpoint folder")
    if args.family == "minigpt4":
        if not checkpoint.exists():
            raise InputError(f"--checkpoint {checkpoint} does not exist: point to pretrained_minigpt4*.pth")
        if args.llm is None or not Path(args.llm).is_dir():
            raise InputError("minigpt4 needs --llm DIR: the Vicuna v0 folder MiniGPT-4 was trained with")
        for flag, value in (("--blip2", args.blip2), ("--eva-vit", args.eva_vit)):
            if value is not None and not Path(value).exists():
                raise InputError(f"{flag} {value} does not exist")
    if args.vision_tower is not None and not Path(args.vision_tower).is_dir():
        raise InputError(f"--vision-tower {args.vision_tower} is not a folder: point to the CLIP model folder")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty folder: name a new folder")
    created = not out.exists()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.family == "shikra":
            convert_shikra(checkpoint, out, vision_tower=args.vision_tower, dtype=dtype, image_pad=args.image_pad)
        else:
            from vlmscope.models.convert.minigpt4 import convert_minigpt4

            convert_minigpt4(checkpoint, args.llm, out, blip2=args.blip2, eva_vit=args.eva_vit, dtype=dtype,
                             vision_heads=args.vision_heads, qformer_heads=args.qformer_heads,
                             image_size=args.image_size)
    except BaseException:
        # Nothing half-written stays behind (the folder was new or empty).
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    stock = "LlavaForConditionalGeneration" if args.family == "shikra" else "Blip2ForConditionalGeneration"
    summary = {"family": args.family, "out": str(out), "class": stock,
               "files": sorted(p.name for p in out.iterdir())}
    if args.json:
        emit_json(summary)
    else:
        print(f"wrote a stock {stock} checkpoint of {args.family} to {out}", file=human_stream(args))
    return 0
