"""CHAIR: exact figures on OPERA's 12 released logs, the builtin normaliser's agreement, throughput.

    PYTHONPATH=src NLTK_DATA=.nltk_data python benchmarks/bench_chair.py [--chair-dir DIR] [--no-refit]

1. The exact (NLTK) normaliser on the 12 logs next to the reference table (../shared/data/README.md).
2. The builtin normaliser against the exact one, per caption (same object mentions, in order) and per log
   (CHAIR_S / CHAIR_I gap): with the shipped model (fitted on all 12 logs), and, unless --no-refit, fitted
   leave-one-model-out: on the three other models' 9 logs, measured on the held-out model's 3 logs (captions it
   was not fitted on; about two minutes per model).
3. Throughput of both normalisers on one log.
Needs NLTK's tagger and WordNet (``vlmscope chair setup --from ../shared/data/nltk --dest .nltk_data``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlmscope.eval.chair import (
    builtin_normaliser,
    caption_to_objects,
    chair_scores,
    load_captions,
    load_gt_objects,
)
from vlmscope.eval.lemmatize import lemmatize
from vlmscope.eval.nltk_backend import nltk_normaliser, nltk_status
from vlmscope.eval.postag import PosModel, augment, train
from vlmscope.eval.tokenize import word_tokenize

CHAIR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chair"
MODELS = ("llava15", "instructblip", "minigpt4", "shikra")
DECODINGS = ("greedy", "beam5", "opera")
REFERENCE = {  # ../shared/data/README.md (reference chair.py with real NLTK)
    "llava15": ((45.0, 12.7), (48.8, 13.9), (44.6, 12.8)),
    "instructblip": ((58.8, 23.7), (55.6, 15.8), (46.4, 14.2)),
    "minigpt4": ((31.8, 9.9), (30.6, 9.5), (26.2, 9.5)),
    "shikra": ((55.8, 15.4), (50.4, 13.3), (36.2, 12.1)),
}


def _normaliser(model: PosModel):
    def normalise(caption: str) -> tuple[list[str], list[str]]:
        tokens = word_tokenize(caption.lower())
        return tokens, [lemmatize(t, p) for t, p in zip(tokens, model.tag(tokens))]

    normalise.name = "builtin-refit"  # type: ignore[attr-defined]
    return normalise


def _agreement(logs: dict, reference: dict, norm) -> tuple[int, int]:
    same = total = 0
    for key, captions in logs.items():
        for cap, ref in zip(captions, reference[key]):
            total += 1
            same += caption_to_objects(cap["caption"], "legacy", norm).node_words == ref
    return same, total


def _gaps(logs: dict, gt: dict, exact: dict, norm) -> dict:
    out = {}
    for key, captions in logs.items():
        m = chair_scores(captions, gt, normaliser=norm).metrics
        out[key] = (m["CHAIR_S"] - exact[key][0], m["CHAIR_I"] - exact[key][1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chair-dir", type=Path, default=CHAIR_DIR)
    parser.add_argument("--no-refit", action="store_true", help="skip the leave-one-model-out fits")
    args = parser.parse_args()
    status = nltk_status()
    if not status.available:
        raise SystemExit(f"needs NLTK data ({', '.join(status.missing)}): vlmscope chair setup --from ../shared/data/nltk")
    exact_norm = nltk_normaliser()
    gt = load_gt_objects()
    logs = {(m, d): load_captions(args.chair_dir / f"{m}_{d}_captions.jsonl") for m in MODELS for d in DECODINGS}

    print(f"1. exact normaliser ({exact_norm.detail}) vs the reference table (CHAIR_S / CHAIR_I)")  # type: ignore[attr-defined]
    exact, worst = {}, 0.0
    for m in MODELS:
        cells = []
        for d, ref in zip(DECODINGS, REFERENCE[m]):
            r = chair_scores(logs[m, d], gt, normaliser=exact_norm).metrics
            exact[m, d] = (r["CHAIR_S"], r["CHAIR_I"])
            worst = max(worst, abs(round(r["CHAIR_S"], 1) - ref[0]), abs(round(r["CHAIR_I"], 1) - ref[1]))
            cells.append(f"{d} {r['CHAIR_S']:.1f}/{r['CHAIR_I']:.1f} (ref {ref[0]}/{ref[1]})")
        print(f"  {m:<13} " + "  ".join(cells))
    print(f"  largest difference from the table: {worst:.1f} points")

    tagged = {key: [exact_norm.tagged(c["caption"]) for c in caps] for key, caps in logs.items()}  # type: ignore[attr-defined]
    reference = {key: [caption_to_objects(c["caption"], "legacy", exact_norm).node_words for c in caps]
                 for key, caps in logs.items()}

    print("2a. builtin (shipped model, fitted on all 12 logs) vs exact")
    same, total = _agreement(logs, reference, builtin_normaliser)
    gaps = _gaps(logs, gt, exact, builtin_normaliser)
    worst_key = max(gaps, key=lambda k: max(map(abs, gaps[k])))
    print(f"  per-caption agreement {100 * same / total:.2f} % ({same} of {total}); worst CHAIR gap "
          f"{'_'.join(worst_key)}: CHAIR_S {gaps[worst_key][0]:+.1f}, CHAIR_I {gaps[worst_key][1]:+.1f}")

    if args.no_refit:
        return
    print("2b. builtin fitted leave-one-model-out, measured on the held-out model's 3 logs")
    all_same = all_total = 0
    worst_gap, worst_at = 0.0, None
    for held in MODELS:
        t0 = time.perf_counter()
        fit = [s for (m, _), sents in tagged.items() if m != held for s in sents]
        extra = augment(fit, exact_norm.tag_tokens)  # type: ignore[attr-defined]
        model = PosModel(*train(fit, extra=extra))
        norm = _normaliser(model)
        held_logs = {k: v for k, v in logs.items() if k[0] == held}
        same, total = _agreement(held_logs, reference, norm)
        gaps = _gaps(held_logs, gt, exact, norm)
        all_same, all_total = all_same + same, all_total + total
        for key, gap in gaps.items():
            if max(map(abs, gap)) > worst_gap:
                worst_gap, worst_at = max(map(abs, gap)), (key, gap)
        cells = "  ".join(f"{k[1]} {g[0]:+.1f}/{g[1]:+.1f}" for k, g in gaps.items())
        print(f"  held out {held:<13} agreement {100 * same / total:.2f} %  CHAIR_S/CHAIR_I gaps {cells}  "
              f"({time.perf_counter() - t0:.0f} s)")
    key, gap = worst_at  # type: ignore[misc]
    print(f"  pooled held-out agreement {100 * all_same / all_total:.2f} % ({all_same} of {all_total}); worst gap "
          f"{'_'.join(key)}: CHAIR_S {gap[0]:+.1f}, CHAIR_I {gap[1]:+.1f}")

    print("3. throughput on llava15_beam5 (500 captions)")
    for name, norm in (("builtin", builtin_normaliser), ("nltk", exact_norm)):
        t0 = time.perf_counter()
        chair_scores(logs["llava15", "beam5"], gt, normaliser=norm)
        dt = time.perf_counter() - t0
        print(f"  {name:<8} {500 / dt:,.0f} captions/s")


if __name__ == "__main__":
    main()
