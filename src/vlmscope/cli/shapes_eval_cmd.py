"""`vlmscope shapes-eval`: captions and POPE questions on fresh shapes scenes, scored against the ground truth."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlmscope.cli._common import add_method_args, print_json_line
from vlmscope.errors import InputError

METRIC_KEYS = ("object_recall", "pope_accuracy", "CHAIR_S", "CHAIR_I")


def register(sub: Any) -> None:
    parser = sub.add_parser("shapes-eval", help="evaluate a model on fresh scenes of the shapes world")
    parser.add_argument("--n", type=int, default=50, help="number of scenes (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out scene stream")
    parser.add_argument("--model", default="shapes", help="model (default: the embedded shapes model)")
    add_method_args(parser)
    parser.add_argument("--show", type=int, default=None,
                        help="scenes whose captions and answers are printed (default: all, at most 20)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of metrics")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.models.loading import builtin_names
    from vlmscope.shapes.evaluate import evaluate, heldout_scenes

    if args.n < 1:
        raise InputError(f"--n must be at least 1 (got {args.n})")
    if args.show is not None and args.show < 0:
        raise InputError("--show must be >= 0")
    if args.model == "shapes" and "shapes" not in builtin_names():
        raise InputError("the embedded shapes model is missing: train it with python -m vlmscope.shapes.train")
    vlm = vlmscope.load(args.model, device="cpu")
    # Parse the method specs before the long part, so a typo fails at once.
    vlm.resolve_decoding(args.decoding)
    vlm.resolve_interventions(args.intervention)

    def progress(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    result = evaluate(vlm, args.n, args.seed, args.decoding, args.intervention, progress=progress,
                      keep_outputs=True)
    scenes = heldout_scenes(args.n, args.seed)
    show = min(args.n, 20) if args.show is None else min(args.show, args.n)
    answers: dict[int, list[dict[str, Any]]] = {}
    for a in result.pop("answers"):
        answers.setdefault(int(a["image"]), []).append(a)
    captions = result.pop("captions")
    for i in range(show):
        truth = ", ".join(o.name for o in scenes[i].ordered())
        print(f"scene {i}: [{truth}]")
        print(f"  caption: {captions[i]}")
        for a in answers.get(i, []):
            mark = "ok" if a["answer"].split(" ")[0] == a["label"] else "WRONG"
            print(f"  {a['split']:<11} {a['text']} -> {a['answer']} ({mark})")
    desc = args.decoding + "".join(f" + {i}" for i in args.intervention)
    print(f"{desc} on {args.n} scenes (seed {args.seed}): "
          + ", ".join(f"{k} {result[k]:.1f}" for k in METRIC_KEYS) + " (percent)")
    if args.json:
        print_json_line({"model": args.model, "decoding": args.decoding, "interventions": args.intervention,
                         **result})
    return 0
