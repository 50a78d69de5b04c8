"""`vlmscope heads`: rank localization heads (Kang et al. 2025) over a directory of images."""

from __future__ import annotations

import argparse

from vlmscope.cli._common import add_json_arg, check_device, emit_json, human_stream, min_int
from vlmscope.cli.explain_cmd import add_model_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("heads", help="rank localization heads by image-attention sum and spatial entropy",
                              description="One prefill per image; per image the top-K heads by the Kang et al. "
                              "2025 criteria, then heads ranked by how often they are selected.")
    add_model_args(p)
    p.add_argument("--images", required=True, help="directory of images (or one image file)")
    p.add_argument("--prompt", required=True, help="e.g. a referring expression or question")
    p.add_argument("--top", type=min_int(1), default=5, help="heads selected per image (default 5)")
    p.add_argument("--min-layer", type=min_int(0), default=2, help="exclude layers below this (default 2: layers 0-1)")
    p.add_argument("--coco-annotations", default=None, metavar="DIR",
                   help="also score the ranked heads by pointing game and IoU against the COCO boxes in DIR "
                   "(instances_*.json; images matched by file name)")
    p.add_argument("--coco-prompt", default="Where is the {word} in the image?",
                   help="prompt per annotated category for --coco-annotations ({word}: the category name)")
    p.add_argument("--out", default=None, help="output directory: the ranking is written to DIR/run.json")
    add_json_arg(p, "print the ranking as JSON on stdout (the table goes to stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.explain.heads import image_files, rank_heads
    from vlmscope.results import check_output_dir

    if args.out:
        check_output_dir(args.out, "heads")
    images = image_files(args.images)  # fail on a bad directory before loading the model
    if args.coco_annotations is not None:
        from vlmscope.errors import InputError
        from vlmscope.explain.coco_heads import instance_files

        instance_files(args.coco_annotations)
        if "{word}" not in args.coco_prompt:
            raise InputError("--coco-prompt needs {word} where the category name goes")
    vlm = vlmscope.load(args.model, device=check_device(args.device), dtype=args.dtype)
    ranking = rank_heads(vlm, images, args.prompt, top_k=args.top, min_layer=args.min_layer)
    text = human_stream(args)
    print(f"{len(images)} image(s), top {args.top} heads per image; heads by selection frequency:", file=text)
    print(ranking.table(), file=text)
    if args.coco_annotations is not None:
        from vlmscope.explain.coco_heads import score_on_coco

        scores = score_on_coco(vlm, images, args.coco_annotations, ranking.heads(), args.coco_prompt)
        # The scores join the ranking's rows, so they are saved and loaded with it.
        for row in ranking.ranking:
            key = (row["layer"], row["head"])
            row.update(coco_pointing=scores["pointing"][key], coco_iou=scores["iou"][key],
                       coco_targets=scores["n"])
        print(f"COCO boxes: {scores['n']} (image, category) targets in {scores['images']} image(s)", file=text)
        for row in ranking.ranking:
            print(f"  L{row['layer']}H{row['head']}: pointing {row['coco_pointing']:.3f}  IoU "
                  f"{row['coco_iou']:.3f}", file=text)
    if args.out:
        print(f"saved {ranking.save(args.out)['run']}", file=text)
    text.flush()
    if args.json:
        from vlmscope.explain._json import json_safe

        emit_json(json_safe(ranking.to_json()))
    return 0
