"""Fit the builtin normaliser's part-of-speech model (``src/vlmscope/data/builtin_pos_model.json.gz``).

Usage (needs NLTK's tagger and WordNet, e.g. ``vlmscope chair setup --from ../shared/data/nltk``):

    PYTHONPATH=src python tools/fit_builtin_tagger.py ../shared/data/chair/*_captions.jsonl

The labels are the Penn tags that the exact (NLTK) normaliser gives the CHAIR-sensitive
tokens of those captions (`vlmscope.eval.postag`). ``benchmarks/bench_chair.py`` measures the agreement on
the logs of models left out of the fit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from vlmscope.eval.chair import load_captions
from vlmscope.eval.nltk_backend import nltk_normaliser
from vlmscope.eval.postag import augment, reference_tags, train

OUT = Path(__file__).resolve().parents[1] / "src" / "vlmscope" / "data" / "builtin_pos_model.json.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", type=Path, nargs="+", help="caption JSON-lines files to fit on")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sentences = []
    for path in sorted(args.captions):
        sentences += reference_tags(r["caption"] for r in load_captions(path))
    extra = augment(sentences, nltk_normaliser().tag_tokens, seed=args.seed)  # type: ignore[attr-defined]
    weights, lexicon = train(sentences, args.iterations, args.seed, extra=extra)
    payload = {
        "about": "Weights of vlmscope's builtin part-of-speech model (tools/fit_builtin_tagger.py; do not edit).",
        "fitted_on": [p.name for p in sorted(args.captions)],
        "iterations": args.iterations,
        "seed": args.seed,
        "weights": weights,
        "lexicon": lexicon,
    }
    with gzip.open(OUT, "wt", encoding="utf-8") as fh:
        json.dump(payload, fh, sort_keys=True, separators=(",", ":"))
    print(f"wrote {OUT}: {len(weights)} features, {len(lexicon)} lexicon words, from {len(sentences)} captions "
          f"and {len(extra)} substituted contexts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
