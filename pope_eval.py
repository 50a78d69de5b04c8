"""POPE answering run with the seed repositories' flags (OPERA / PAI / AAI `pope_eval.py`).

Example: python pope_eval.py --model llava-1.5 --data-path COCO/val2014 --pope-type random --use-attn --alpha 0.2
`--pope-type random|popular|adversarial` picks the split of the shipped question set of `--dataset coco|aokvqa|gqa`
(default coco, the official files; aokvqa and gqa are VCD's, `--data-path` then holds their images: COCO val2014
for aokvqa, GQA's images for gqa); `--questions F` (a file or a set name such as gqa-popular) overrides both.
"""

import argparse
import sys

from vlmscope.cli import main
from vlmscope.eval.seed_flags import add_seed_flags, eval_argv

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_flags(parser)
    parser.add_argument("--pope-type", "--pope_type", dest="pope_type", default="random",
                        choices=["random", "popular", "adversarial"])
    parser.add_argument("--dataset", default="coco", choices=["coco", "aokvqa", "gqa"])
    parser.add_argument("--questions", default=None)
    args, extra = parser.parse_known_args()
    questions = args.questions or f"{args.dataset}-{args.pope_type}"
    sys.exit(main(eval_argv("pope", args, ["--questions", questions, *extra])))
