"""``vlmscope pope score`` (metrics of answers) and ``vlmscope pope build`` (question sets from COCO)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmscope.cli._common import add_json_arg, emit_json, human_stream, min_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pope", help="POPE object-probing questions: score answers or build question sets")
    sub = p.add_subparsers(dest="pope_command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser("score", help="accuracy, precision, recall, F1 and yes-ratio of model answers")
    s.add_argument("--answers", type=Path, required=True, help="answers, JSON lines with question_id and answer/text")
    s.add_argument(
        "--questions", required=True, action="append",
        help="question file(s) (JSON lines or array) or shipped sets by name (coco-random, aokvqa-popular, "
        "gqa-adversarial, ..., or coco / aokvqa / gqa for three splits); repeat for several splits",
    )  # fmt: skip
    s.add_argument(
        "--rule", default="official",
        choices=("official", "pope", "llava", "opera", "pai", "vcd", "exact", "lmms-eval"),
        help="answer-parsing rule (default official)",
    )  # fmt: skip
    s.add_argument("--extra-answers", choices=("error", "ignore"), default="error",
                   help="answers to questions not in the question files: an error (default), or counted and skipped")
    add_json_arg(s, "print only the metrics as one JSON object on stdout (the table goes to stderr)")
    s.add_argument("--protocol", help="check the questions are a frozen POPE protocol's (pope-random, pope-popular, "
                   "pope-adversarial, pope-coco, pope-random-llava-2910, pope-aokvqa[-SPLIT], pope-gqa[-SPLIT]) "
                   "and record it")
    s.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                   help="bootstrap draws for the 95%% intervals, images resampled (default 1000; 0: no intervals)")
    s.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    s.set_defaults(func=_score)

    b = sub.add_parser("build", help="build POPE question files from a COCO instances file")
    b.add_argument("--instances", type=Path, required=True, help="COCO instances JSON, e.g. instances_val2014.json")
    b.add_argument("--split", choices=("random", "popular", "adversarial", "all"), default="all")
    b.add_argument("--out", type=Path, required=True, help="output folder")
    b.add_argument("--num-images", type=min_int(1), default=500)
    b.add_argument("--num-questions", type=min_int(1), default=3, help="yes/no pairs per image (default 3)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--legacy-article-bug", action="store_true", help='reproduce "an ... in the imange?"')
    b.add_argument("--plural-aware", action="store_true", help='"Are there skis ..." instead of "Is there a skis ..."')
    b.set_defaults(func=_build)


def _score(args: argparse.Namespace) -> int:
    from vlmscope.errors import InputError
    from vlmscope.eval.pope import (
        DATASET_TITLES,
        METRIC_NAMES,
        dataset_groups,
        load_answers,
        load_question_sets,
        pope_scores,
    )
    from vlmscope.eval.stats import pope_intervals

    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    questions = load_question_sets(args.questions)
    protocol = None
    if args.protocol is not None:
        from vlmscope.eval.protocols import check_pope_questions, get_protocol

        protocol = get_protocol(args.protocol, "pope")
        by_split: dict[str, list] = {}
        for q in questions:
            by_split.setdefault(q["split"], []).append(q)
        check_pope_questions(protocol, by_split)
    answers = load_answers(args.answers)
    out = pope_scores(answers, questions, rule=args.rule, extra=args.extra_answers)
    ci = pope_intervals(out["items"], args.bootstrap, args.bootstrap_seed) if args.bootstrap else {}
    text = human_stream(args)
    name = f", protocol {protocol.name}" if protocol is not None else ""
    print(f"POPE, {out['n_questions']} questions, rule {out['rule']}{name}, answers matched by {out['matched_by']}"
          + (f", {out['extra_answers']} answers to other questions ignored" if out["extra_answers"] else ""),
          file=text)
    # With A-OKVQA / GQA splits each row names its dataset, each dataset gets its own mean, none is taken across.
    groups = dataset_groups(out["items"])
    means = ([(f"{DATASET_TITLES.get(d, d)} mean", out["datasets"][d]["mean"], f"{d}/") for d in groups
              if len(groups[d]) > 1] if groups else [("mean", out["mean"], "")] if len(out["splits"]) > 1 else [])
    width = max([12, *(len(s) + 1 for s in out["splits"]), *(len(n) + 1 for n, _, _ in means)])
    lead = (lambda title: f"  {title:<9}") if groups else (lambda title: "  ")
    header = lead("dataset") + f"{'split':<{width}}" + "".join(f"{m:>10}" for m in METRIC_NAMES) + f"{'unparsed':>10}"
    print(header, file=text)
    for split, m in out["splits"].items():
        title = DATASET_TITLES.get(m.get("dataset") or "", m.get("dataset") or "unnamed")
        print(lead(title) + f"{split:<{width}}" + "".join(f"{m[k]:10.1f}" for k in METRIC_NAMES)
              + f"{m['unparsed']:10d}", file=text)
        if ci:
            print(lead("") + f"{'  95% CI':<{width}}" + "".join(f"{_span(ci[f'{split}/{k}']):>10}" for k in METRIC_NAMES),
                  file=text)
    for name, mean, prefix in means:
        print(lead(name.rsplit(" ", 1)[0] if groups else "") + f"{'mean' if groups else name:<{width}}"
              + "".join(f"{mean[k]:10.1f}" for k in METRIC_NAMES), file=text)
        if ci:
            print(lead("") + f"{'  95% CI':<{width}}" + "".join(f"{_span(ci[prefix + k]):>10}" for k in METRIC_NAMES),
                  file=text)
    if ci:
        print(f"  (intervals: {args.bootstrap} bootstrap draws over images, seed {args.bootstrap_seed})", file=text)
    if args.json:
        record = {
            "rule": out["rule"],
            "n_questions": out["n_questions"],
            "matched_by": out["matched_by"],
            "extra_answers": out["extra_answers"],
            "splits": {s: {k: m[k] for k in (*METRIC_NAMES, "n", "unparsed", "empty", "dataset") if k in m}
                       for s, m in out["splits"].items()},
        }
        if groups:
            record["datasets"] = {d: out["datasets"][d] for d in groups}
        else:
            record["mean"] = out["mean"]
        if ci:
            record["intervals"] = {k: [v.low, v.high] for k, v in ci.items()}
        if protocol is not None:
            record["protocol"] = protocol.name
        emit_json(record)
    return 0


def _span(interval) -> str:
    return f"{interval.low:.1f}-{interval.high:.1f}"


def _build(args: argparse.Namespace) -> int:
    from vlmscope.eval.pope import build_pope, coco_image_objects, write_questions

    objects = coco_image_objects(args.instances)
    sets = build_pope(
        objects,
        args.split,
        num_images=args.num_images,
        num_questions=args.num_questions,
        seed=args.seed,
        legacy_article_bug=args.legacy_article_bug,
        plural_aware=args.plural_aware,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for split, questions in sets.items():
        path = write_questions(questions, args.out / f"coco_pope_{split}.jsonl")
        print(f"wrote {len(questions)} questions to {path}")
    images = list(dict.fromkeys(q["image"] for q in next(iter(sets.values()))))
    info = {
        "instances": str(args.instances),
        "seed": args.seed,
        "num_images": args.num_images,
        "num_questions": args.num_questions,
        "legacy_article_bug": args.legacy_article_bug,
        "plural_aware": args.plural_aware,
        "images": images,
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return 0
