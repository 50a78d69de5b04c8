"""Drop-in for the seed repositories' ``chair.py`` (OPERA / PAI / Maxlinn), backed by ``vlmscope.eval.chair``.

    python chair.py --cap_file captions.jsonl [--image_id_key image_id] [--caption_key caption]
                    [--coco_path annotations/ | gt_objects.json] [--save_path out.json]

``--coco_path`` may be the COCO annotation folder (instances/captions 2014) or a ``{image_id: [objects]}``
JSON; without it the bundled COCO-2014 ground truth is used. ``--cache`` is accepted and ignored (the
reference pickled its evaluator; here the ground truth cache is a plain JSON written by
``vlmscope chair cache-gt``). Metrics are printed like the reference, in percent with one decimal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Use the package beside this script (a checkout) in preference to an installed copy.
_SRC = Path(__file__).resolve().parent / "src"
if (_SRC / "vlmscope").is_dir():
    sys.path.insert(0, str(_SRC))

from vlmscope.errors import VlmscopeError  # noqa: E402
from vlmscope.eval.chair import chair_scores, load_captions, load_gt_objects  # noqa: E402

# Reference names of the metrics, in the reference's print order.
PRINT_NAMES = {"CHAIR_S": "CHAIRs", "CHAIR_I": "CHAIRi", "Recall": "Recall", "Len": "Len", "Precision": "Precision", "F1": "F1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap_file", required=True, help="captions, .json (list) or .jsonl")
    parser.add_argument("--image_id_key", default="image_id")
    parser.add_argument("--caption_key", default="caption")
    parser.add_argument("--coco_path", default=None, help="COCO annotation folder or ground-truth JSON")
    parser.add_argument("--save_path", default="", help="write per-caption details and metrics as JSON")
    parser.add_argument("--cache", default=None, help="ignored (kept for command-line compatibility)")
    parser.add_argument("--normaliser", choices=("auto", "nltk", "builtin"), default="auto",
                        help="auto: NLTK exactly as the reference when its data are installed, else the builtin")
    args = parser.parse_args(argv)
    try:
        captions = load_captions(args.cap_file, args.image_id_key, args.caption_key)
        gt = load_gt_objects(args.coco_path, normaliser=args.normaliser)
        result = chair_scores(captions, gt, normaliser=args.normaliser)
    except VlmscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, name in PRINT_NAMES.items():
        print(f"{name:<10}: {result.metrics[key]:.1f}")
    if args.save_path:
        out = result.to_dict()
        # The reference's layout: per-caption records under "sentences", metrics as fractions (its Len is
        # 0.01 x tokens per caption, so it also divides by 100).
        payload = {
            "sentences": out["per_caption"],
            "overall_metrics": {PRINT_NAMES[k]: v / 100 for k, v in result.metrics.items()},
            "settings": out["settings"],
        }
        Path(args.save_path).write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
