"""`vlmscope shapes-eval`: captions and POPE questions on fresh shapes scenes, scored against the ground truth."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlmscope.cli._common import add_json_arg, add_method_args, emit_json, human_stream, min_int
from vlmscope.errors import InputError

METRIC_KEYS = ("object_recall", "pope_accuracy", "CHAIR_S", "CHAIR_I")


def register(sub: Any) -> None:
    parser = sub.add_parser("shapes-eval", help="evaluate a model on fresh scenes of the shapes world")
    parser.add_argument("--n", type=min_int(1), default=50, help="number of scenes (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out scene stream")
    parser.add_argument("--model", default="shapes", help="model (default: the embedded shapes model)")
    add_method_args(parser)
    parser.add_argument("--show", type=min_int(0), default=None,
                        help="scenes whose captions and answers are printed (default: all, at most 20)")
    add_json_arg(parser, "print only the metrics as one JSON object on stdout (scenes go to stderr)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.models.loading import builtin_names
    from vlmscope.registry import spec_string
    from vlmscope.shapes.evaluate import evaluate, heldout_scenes

    if args.n < 1:
        raise InputError(f"--n must be at least 1 (got {args.n})")
    if args.show is not None and args.show < 0:
        raise InputError("--show must be >= 0")
    if args.model == "shapes" and "shapes" not in builtin_names():
        raise InputError("the embedded shapes model is missing: train it with python -m vlmscope.shapes.train")
    vlm = vlmscope.load(args.model, device="cpu")
    # Parse the method specs before the long part, so a typo fails at once.
    decoding = vlm.resolve_decoding(args.decoding)
    interventions = vlm.resolve_interventions(args.intervention)

    def progress(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    result = evaluate(vlm, args.n, args.seed, args.decoding, args.intervention, progress=progress,
                      keep_outputs=True)
    scenes = heldout_scenes(args.n, args.seed)
    show = min(args.n, 20) if args.show is None else min(args.show, args.n)
    text = human_stream(args)
    answers: dict[int, list[dict[str, Any]]] = {}
    for a in result.pop("answers"):
        answers.setdefault(int(a["image"]), []).append(a)
    captions = result.pop("captions")
    for i in range(show):
        truth = ", ".join(o.name for o in scenes[i].ordered())
        print(f"scene {i}: [{truth}]", file=text)
        print(f"  caption: {captions[i]}", file=text)
        for a in answers.get(i, []):
            mark = "ok" if a["answer"].split(" ")[0] == a["label"] else "WRONG"
            print(f"  {a['split']:<11} {a['text']} -> {a['answer']} ({mark})", file=text)
    desc = args.decoding + "".join(f" + {i}" for i in args.intervention)
    print(f"{desc} on {args.n} scenes (seed {args.seed}): "
          + ", ".join(f"{k} {result[k]:.1f}" for k in METRIC_KEYS) + " (percent)", file=text)
    if args.json:
        emit_json({"model": args.model, "n": args.n, "seed": args.seed, "decoding": spec_string(decoding),
                   "interventions": [spec_string(i) for i in interventions], **result})
    return 0
