"""POPE answering run with the seed repositories' flags (OPERA / PAI / AAI `pope_eval.py`).

Example: python pope_eval.py --model llava-1.5 --data-path COCO/val2014 --pope-type random --use-attn --alpha 0.2
`--pope-type random|popular|adversarial` picks the shipped official COCO question file; `--questions F` overrides.
"""

import argparse
import sys
from pathlib import Path

from vlmscope.cli import main
from vlmscope.eval.seed_flags import add_seed_flags, eval_argv

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_flags(parser)
    parser.add_argument("--pope-type", "--pope_type", dest="pope_type", default="random",
                        choices=["random", "popular", "adversarial"])
    parser.add_argument("--questions", default=None)
    args, extra = parser.parse_known_args()
    questions = args.questions or str(Path(__file__).resolve().parent / "src" / "vlmscope" / "data" / "pope"
                                      / f"coco_pope_{args.pope_type}.jsonl")
    sys.exit(main(eval_argv("pope", args, ["--questions", questions, *extra])))
