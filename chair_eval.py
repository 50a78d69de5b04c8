"""CHAIR captioning run with the seed repositories' flags (OPERA / PAI / AAI `chair_eval.py`).

Example: python chair_eval.py --model llava-1.5 --data-path COCO/val2014 --beam 5 --scale_factor 50 \
    --threshold 15 --num_attn_candidates 5 --penalty_weights 1
Everything is done by `vlmscope eval chair`; this script only translates the flags.
"""

import argparse
import sys

from vlmscope.cli import main
from vlmscope.eval.seed_flags import add_seed_flags, eval_argv

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_flags(parser)
    args, extra = parser.parse_known_args()
    sys.exit(main(eval_argv("chair", args, extra)))
