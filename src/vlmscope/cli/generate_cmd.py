"""`vlmscope generate` and `vlmscope methods`."""

from __future__ import annotations

import argparse
from typing import Any

from vlmscope.cli._common import add_method_args, add_model_args, load_vlm, min_int, print_json_line
from vlmscope.errors import InputError


def register(sub: Any) -> None:
    parser = sub.add_parser("generate", help="generate text for an image and a prompt")
    add_model_args(parser)
    parser.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt (one, or one per image)")
    parser.add_argument("--max-new-tokens", type=min_int(1), default=64)
    add_method_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per input (JSON lines)")
    parser.set_defaults(func=run)

    methods = sub.add_parser("methods", help="list decoding methods and interventions with their parameters")
    methods.set_defaults(func=run_methods)


def run(args: argparse.Namespace) -> int:
    if len(args.prompt) not in (1, len(args.image)):
        raise InputError(f"{len(args.prompt)} prompts for {len(args.image)} images; give one prompt, or one per image")
    vlm = load_vlm(args)
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    results = vlm.generate(list(args.image), list(prompts), max_new_tokens=args.max_new_tokens,
                           decoding=args.decoding, interventions=args.intervention)
    for image, result in zip(args.image, results):
        if args.json:
            print_json_line({"image": image, **result.to_json()})
        else:
            print(result.text)
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS

    print("decoding methods:")
    print("  " + DECODINGS.describe().replace("\n", "\n  "))
    print("interventions:")
    print("  " + (INTERVENTIONS.describe() or "(none)").replace("\n", "\n  "))
    return 0
