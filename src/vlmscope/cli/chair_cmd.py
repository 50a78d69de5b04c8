"""``vlmscope chair``: score captions with CHAIR (with bootstrap intervals); ``chair cache-gt``: write the
ground-truth cache; ``chair setup``: install the NLTK data of the exact normaliser."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmscope.cli._common import add_json_arg, emit_json, human_stream, print_json_line
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
    p.add_argument("--normaliser", choices=("auto", "nltk", "builtin"), default="auto",
                   help="text normaliser: auto (default) = NLTK exactly as the reference when its data are installed "
                   "(vlmscope chair setup), else the builtin; nltk = fail without the data")
    p.add_argument("--protocol", help="score as a frozen CHAIR protocol (opera-500, opera-500-64): checks the image "
                   "ids, applies its truncation and records it")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                   help="bootstrap draws for the 95%% intervals, images resampled (default 1000; 0: no intervals)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
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
    c.add_argument("--normaliser", choices=("auto", "nltk", "builtin"), default="auto")
    c.add_argument("--synonyms", choices=("legacy", "fixed"), default="legacy")
    c.set_defaults(func=_cache_gt)

    st = sub.add_parser(
        "setup",
        help="install the NLTK data of the exact normaliser (tagger, WordNet, Punkt)",
        description="Download NLTK's punkt_tab, averaged_perceptron_tagger_eng and wordnet, or copy them from a "
        "folder (an nltk_data checkout, an NLTK_DATA folder or loose .zip/.tgz packages) on offline machines. "
        "The old tagger pickle is converted to the JSON layout that NLTK >= 3.9 reads.",
    )
    st.add_argument("--from", dest="source", type=Path, help="folder holding the NLTK packages (offline install)")
    st.add_argument("--dest", type=Path, help="NLTK data folder to write (default: first of $NLTK_DATA, else ~/nltk_data)")
    st.add_argument("--json", action="store_true", help="print the result as one JSON line")
    st.set_defaults(func=_setup)


def _score(args: argparse.Namespace) -> int:
    from vlmscope.eval.chair import METRIC_KEYS, chair_scores, load_captions, load_gt_objects
    from vlmscope.eval.stats import chair_intervals

    if args.captions is None:
        raise InputError("no captions given; pass --captions FILE.jsonl (or use a subcommand: setup, cache-gt)")
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
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
    truncate = args.truncate_incomplete
    protocol = None
    if args.protocol is not None:
        from vlmscope.eval.protocols import get_protocol, protocol_image_ids

        protocol = get_protocol(args.protocol, "chair")
        expected = set(protocol_image_ids(protocol))
        got = set(_int_ids([c["image_id"] for c in captions]) or [])
        if got != expected:
            raise InputError(f"{args.captions} covers {len(got & expected)} of protocol {protocol.name}'s "
                             f"{len(expected)} images and {len(got - expected)} others; caption exactly its images")
        truncate = truncate or protocol.truncate_incomplete
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
        truncate_incomplete=truncate,
    )
    intervals = chair_intervals(result, args.bootstrap, args.bootstrap_seed) if args.bootstrap else {}
    payload = result.to_dict()
    if protocol is not None:
        payload["settings"]["protocol"] = protocol.record()
    if intervals:
        payload["intervals"] = {k: v.to_dict() for k, v in intervals.items()}
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    # With --json, stdout carries only the JSON.
    s = result.settings
    text = human_stream(args)
    name = f", protocol {protocol.name}" if protocol is not None else ""
    print(f"CHAIR on {result.counts['captions']} captions ({s['normaliser']} normaliser: {s['normaliser_detail']}; "
          f"{s['synonyms']} synonyms{name})", file=text)
    if intervals:
        print(f"  {'metric':<10} {'value':>6}   95% interval ({args.bootstrap} bootstrap draws over images, "
              f"seed {args.bootstrap_seed})", file=text)
    for key in METRIC_KEYS:
        ci = f"   [{intervals[key].low:5.1f}, {intervals[key].high:5.1f}]" if intervals else ""
        print(f"  {key:<10} {result.metrics[key]:6.1f}{ci}", file=text)
    c = result.counts
    print(f"  {c['hallucinated_mentions']} of {c['mentions']} mentions hallucinated in {c['hallucinated_captions']} "
          "captions", file=text)
    if args.save is not None:
        print(f"  details: {args.save}", file=text)
    if args.json:
        record = {k: result.metrics[k] for k in METRIC_KEYS}
        if intervals:
            record["intervals"] = {k: [v.low, v.high] for k, v in intervals.items()}
        record["normaliser"] = s["normaliser"]
        if protocol is not None:
            record["protocol"] = protocol.name
        emit_json(record)
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


def _setup(args: argparse.Namespace) -> int:
    from vlmscope.eval.nltk_backend import install_data

    report = install_data(args.source, args.dest)
    status = report["status"]
    out = sys.stderr if args.json else sys.stdout
    print(f"installed {', '.join(report['installed'])} into {report['dest']}", file=out)
    if not report["on_nltk_path"]:
        print(f"NLTK does not search {report['dest']} by default: export NLTK_DATA={report['dest']}", file=out)
    if status.available:
        print(f"exact CHAIR normaliser ready: {status.describe()}", file=out)
    else:
        print(f"still missing: {', '.join(status.missing)}", file=out)
    if args.json:
        print_json_line({"dest": report["dest"], "installed": report["installed"], "on_nltk_path": report["on_nltk_path"],
                         "available": status.available, "sentence_splitter": status.sentence_splitter})
    return 0 if status.available else 2
