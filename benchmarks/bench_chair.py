"""CHAIR throughput on 500 captions (OPERA's released LLaVA-1.5 beam-search log, or synthetic ones).

    PYTHONPATH=src python benchmarks/bench_chair.py [--captions FILE.jsonl] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from vlmscope.eval.chair import _lemma, chair_scores, load_captions, load_gt_objects

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chair" / "llava15_beam5_captions.jsonl"
WORDS = "a the dog man woman sitting on table with pizza and two cups near window skiing potted plant".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    gt = load_gt_objects()
    print(f"load bundled ground truth: {time.perf_counter() - t0:.2f} s ({len(gt)} images)")
    if args.captions.exists():
        captions = load_captions(args.captions)
    else:
        rng = random.Random(0)
        ids = sorted(gt)[:500]
        captions = [{"image_id": i, "caption": " ".join(rng.choices(WORDS, k=90)) + "."} for i in ids]
        print(f"{args.captions} not found; using 500 synthetic 90-word captions")
    words = sum(len(c["caption"].split()) for c in captions)
    for run in range(args.repeat):
        if run == 0:
            _lemma.cache_clear()
        t0 = time.perf_counter()
        result = chair_scores(captions, gt)
        dt = time.perf_counter() - t0
        label = "cold lemma cache" if run == 0 else "warm lemma cache"
        print(f"run {run + 1} ({label}): {len(captions) / dt:,.0f} captions/s, {words / dt:,.0f} words/s ({dt:.3f} s)")
    print({k: round(v, 1) for k, v in result.metrics.items()})


if __name__ == "__main__":
    main()
