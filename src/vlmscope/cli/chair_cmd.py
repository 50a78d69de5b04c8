"""``vlmscope chair``: score captions with CHAIR; ``vlmscope chair cache-gt``: write the ground-truth cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmscope.cli._common import add_json_arg, emit_json, human_stream
from vlmscope.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chair",
        help="CHAIR object-hallucination metrics of image captions",
        description="Score captions (JSON lines or a JSON list) with CHAIR_S, CHAIR_I, Recall, Len, Precision, F1. "
        "Ground truth: the bundled COCO-2014 cache unless --coco-annotations or --gt-objects is given.",
    )
    p.add_argument("--captions", type=Path, help="captions file, .jsonl or .json")
    gt = p.add_mutually_exclusive_group()
    gt.add_argument("--coco-annotations", type=Path, help="folder with instances_*2014.json and captions_*2014.json")
    gt.add_argument("--gt-objects", type=Path, help="{image_id: [objects]} JSON (optionally .gz), e.g. from cache-gt")
    p.add_argument("--image-id-key", default="image_id", help="key of the image id in each record (default image_id)")
    p.add_argument("--caption-key", default="caption", help="key of the caption in each record (default caption)")
    p.add_argument("--normaliser", choices=("builtin", "nltk"), default="builtin", help="text normaliser (default builtin)")
    p.add_argument("--synonyms", choices=("legacy", "fixed"), default="legacy", help="synonym list variant (default legacy)")
    p.add_argument("--missing", choices=("error", "skip", "empty"), default="error", help="image ids absent from the ground truth")
    p.add_argument("--truncate-incomplete", action="store_true", help="drop text after the last period (64-token protocol)")
    add_json_arg(p, "print only the metrics as one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--save", type=Path, help="write metrics, counts, settings and per-caption details as JSON")
    p.set_defaults(func=_score)

    sub = p.add_subparsers(dest="chair_command", metavar="SUBCOMMAND")
    c = sub.add_parser("cache-gt", help="build the ground truth from COCO annotations and write it as JSON")
    c.add_argument("--coco-annotations", type=Path, required=True, help="folder with the COCO 2014 annotation files")
    c.add_argument("--out", type=Path, required=True, help="output .json or .json.gz")
    c.add_argument("--normaliser", choices=("builtin", "nltk"), default="builtin")
    c.add_argument("--synonyms", choices=("legacy", "fixed"), default="legacy")
    c.set_defaults(func=_cache_gt)


def _score(args: argparse.Namespace) -> int:
    from vlmscope.eval.chair import METRIC_KEYS, chair_scores, load_captions, load_gt_objects

    if args.captions is None:
        raise InputError("no captions given; pass --captions FILE.jsonl")
    captions = load_captions(args.captions, args.image_id_key, args.caption_key)
    if not captions:
        raise InputError(f"no captions in {args.captions}; CHAIR of nothing is undefined (not 0.0)")
    ids = [c["image_id"] for c in captions]
    if len(set(map(str, ids))) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if str(i) in seen or seen.add(str(i)))
        raise InputError(f"image {dup} has several captions in {args.captions}; keep one caption per image")
    if args.save is not None and args.save.is_dir():
        raise InputError(f"--save {args.save} is a folder; name a .json file")
    source = args.coco_annotations or args.gt_objects
    if args.coco_annotations is not None and not args.coco_annotations.is_dir():
        raise InputError(f"COCO annotation folder not found: {args.coco_annotations}; pass an existing folder")
    ids = [c["image_id"] for c in captions] if args.coco_annotations is not None else None
    gt = load_gt_objects(source, args.synonyms, args.normaliser, image_ids=_int_ids(ids))
    result = chair_scores(
        captions,
        gt,
        vocabulary=args.synonyms,
        normaliser=args.normaliser,
        missing=args.missing,
        truncate_incomplete=args.truncate_incomplete,
    )
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    s = result.settings
    text = human_stream(args)
    print(f"CHAIR on {result.counts['captions']} captions ({s['normaliser']} normaliser, {s['synonyms']} synonyms)",
          file=text)
    for key in METRIC_KEYS:
        print(f"  {key:<10} {result.metrics[key]:6.1f}", file=text)
    c = result.counts
    print(f"  {c['hallucinated_mentions']} of {c['mentions']} mentions hallucinated in {c['hallucinated_captions']} "
          "captions", file=text)
    if args.save is not None:
        print(f"  details: {args.save}", file=text)
    if args.json:
        emit_json({k: result.metrics[k] for k in METRIC_KEYS})
    return 0


def _int_ids(ids: list | None) -> list[int] | None:
    if ids is None:
        return None
    out = []
    for i in ids:
        try:
            out.append(int(i))
        except (TypeError, ValueError):
            raise InputError(f"image id {i!r} is not an integer; use COCO integer ids") from None
    return out


def _cache_gt(args: argparse.Namespace) -> int:
    from vlmscope.eval.chair import build_gt_from_coco, write_gt_cache

    gt = build_gt_from_coco(args.coco_annotations, args.synonyms, args.normaliser, progress=True)
    out = write_gt_cache(gt, args.out)
    print(f"wrote ground truth for {len(gt)} images to {out}")
    return 0
