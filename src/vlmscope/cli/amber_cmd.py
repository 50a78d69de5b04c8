"""``vlmscope amber score RESPONSES.json``: AMBER's scores of a response file in the reference's format."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmscope.cli._common import add_json_arg, emit_json, human_stream


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlmscope.eval.amber import PARSERS, TASKS

    p = subparsers.add_parser("amber", help="AMBER hallucination benchmark: score a response file")
    sub = p.add_subparsers(dest="amber_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("score", help="CHAIR, Cover, Hal, Cog, Accuracy/Precision/Recall/F1 and AMBER Score, as "
                       "the reference inference.py computes them")
    s.add_argument("responses", type=Path, help='JSON list of {"id", "response"} (the reference\'s format)')
    s.add_argument("--task", choices=TASKS, default="all", help="blocks to report (default all)")
    s.add_argument("--parser", choices=tuple(PARSERS), default="reference",
                   help="yes/no parsing: reference (exact 'Yes'/'No', default), lenient, halva")
    s.add_argument("--similarity", default="auto", metavar="auto|spacy|skip|TABLE.json",
                   help="word-similarity step (default auto: spaCy en_core_web_lg if installed, else skipped)")
    s.add_argument("--out", type=Path, default=None,
                   help="also write metrics.json and amber_details.json into this folder")
    s.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                   help="bootstrap draws for the 95%% intervals, images resampled (default 1000; 0: none)")
    s.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    add_json_arg(s, "print only the metrics as one JSON object on stdout (the summary goes to stderr)")
    s.set_defaults(func=_score)


def _score(args: argparse.Namespace) -> int:
    import json

    from vlmscope.errors import InputError
    from vlmscope.eval.amber import amber_payload, amber_scores, load_responses, summary_line
    from vlmscope.eval.runner import metrics_markdown

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; name a folder")
    result = amber_scores(load_responses(args.responses), args.task, args.parser, args.similarity)
    payload = amber_payload(result, results_file=args.responses.name, bootstrap=args.bootstrap,
                            bootstrap_seed=args.bootstrap_seed)
    text = human_stream(args)
    print(metrics_markdown([(args.responses.name, payload["metrics"])]), end="", file=text)
    print(summary_line(result.settings, result.metrics), file=text)
    if args.out is not None:
        from vlmscope.eval.runner import write_metrics

        write_metrics(args.out, payload)
        (args.out / "amber_details.json").write_text(
            json.dumps({"settings": result.settings, "items": result.items}, indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8")
    if args.json:
        emit_json(payload)
    return 0
