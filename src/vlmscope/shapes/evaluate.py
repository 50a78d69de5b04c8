"""Held-out evaluation of a model on the shapes world: object recall, CHAIR, POPE, pointing-game targets.

CHAIR and POPE are the evaluation package's own code (`vlmscope.eval.chair.chair_scores`,
`vlmscope.eval.pope.build_pope` / `pope_scores`), run unchanged on the world's ground truth: the only
shapes-specific piece is the synonym table (`chair_vocabulary`), built from `vocab.SYNONYMS`. Generation goes
through `VLM.generate`, so any decoding method and intervention can be evaluated. The pointing game is
`vlmscope.explain.pointing`'s, on targets built from the scenes' objects and boxes.

    python -m vlmscope.shapes.evaluate --n 200 --seed 0 [--model DIR] [--decoding SPEC] [--intervention SPEC]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

from vlmscope.eval.chair import ChairResult, ChairVocabulary, chair_scores
from vlmscope.eval.pope import SPLITS, build_pope, pope_scores
from vlmscope.explain.pointing import PointingTarget
from vlmscope.explain.pointing import pointing_game as explain_pointing_game
from vlmscope.shapes.vocab import COLOURS, SYNONYMS, word_to_category
from vlmscope.shapes.world import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_WORLD,
    Scene,
    existence_question,
    sample_scenes,
)

CAPTION_TOKENS = 40  # the longest reference caption (4 objects) is 19 words + EOS
ANSWER_TOKENS = 3  # "yes . </s>"
Progress = Callable[[str], None]


def heldout_scenes(n: int, seed: int) -> list[Scene]:
    """`n` held-out scenes: the "test" stream of the world, which never repeats the training stream."""
    return sample_scenes(n, seed, split="test")


# ----------------------------------------------------------------------------------------------------------
# CHAIR and POPE on the world's ground truth


@lru_cache(maxsize=1)
def chair_vocabulary() -> ChairVocabulary:
    """The shapes world as a CHAIR synonym list: every name of a category maps to the category."""
    return ChairVocabulary("shapes", frozenset(SYNONYMS), dict(SYNONYMS), {}, 2)


def chair_of(captions: Sequence[str], scenes: Sequence[Scene]) -> ChairResult:
    """`chair_scores` of captions against the scenes' object categories (image id = index in `scenes`)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    records = [{"image_id": i, "caption": c} for i, c in enumerate(captions)]
    gt = {i: sorted(s.categories) for i, s in enumerate(scenes)}
    return chair_scores(records, gt, vocabulary=chair_vocabulary(), normaliser="builtin")


def pope_question_set(scenes: Sequence[Scene], seed: int, splits: Sequence[str] = SPLITS) -> list[dict[str, Any]]:
    """POPE questions built by `build_pope` from the scenes' objects: one yes and one no question per scene
    and split. The positive is the first object of a seeded shuffle of the scene's categories (POPE takes
    objects in annotation order, and the drawing order would favour half-hidden co-occurrence partners)."""
    rng = random.Random(f"shapes:pope:{seed}")
    objects = {}
    for i, s in enumerate(scenes):
        cats = sorted(s.categories)
        rng.shuffle(cats)
        objects[str(i)] = cats
    sets = build_pope(objects, splits=list(splits), num_images=len(scenes), num_questions=1, seed=seed)
    return [{**q, "split": split} for split in splits for q in sets[split]]


# ----------------------------------------------------------------------------------------------------------
# Attribute accuracy (not part of CHAIR: a wrong colour is an attribute error, not a hallucinated object)


def mentioned_objects(caption: str) -> list[tuple[str, str | None]]:
    """(category, colour or None) for each object a caption names, first mention only, in order. A colour
    counts when it is the word right before the category word ("a red circle")."""
    words = caption.lower().replace(",", " , ").replace(".", " . ").split()
    seen: dict[str, str | None] = {}
    for i, w in enumerate(words):
        cat = word_to_category(w)
        if cat is None or cat in seen:
            continue
        prev = words[i - 1] if i > 0 else None
        seen[cat] = prev if prev in COLOURS else None
    return list(seen.items())


def colour_accuracy(captions: Sequence[str], scenes: Sequence[Scene]) -> float:
    """Percent of correctly named objects whose colour is named right."""
    named = right = 0
    for cap, scene in zip(captions, scenes):
        truth = {o.category: o.colour for o in scene.objects}
        for cat, colour in mentioned_objects(cap):
            if cat in truth and colour is not None:
                named += 1
                right += colour == truth[cat]
    return 100.0 * right / named if named else 0.0


def cooccurrence_share(chair: ChairResult, scenes: Sequence[Scene]) -> float:
    """Percent of hallucinated mentions that are the co-occurrence partner of an object in the scene."""
    hallucinated = partner = 0
    for rec in chair.per_caption:
        partners = {DEFAULT_WORLD.partner(c) for c in scenes[rec["image_id"]].categories}
        for _word, node in rec["mscoco_hallucinated_words"]:
            hallucinated += 1
            partner += node in partners
    return 100.0 * partner / hallucinated if hallucinated else 0.0


# ----------------------------------------------------------------------------------------------------------
# Running a model


def generate_texts(vlm: Any, images: Sequence[Any], prompts: Sequence[str], max_new_tokens: int,
                   decoding: Any = "greedy", interventions: Any = None, batch_size: int = 64) -> list[str]:
    """`vlm.generate` over paired images and prompts, in batches."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        results = vlm.generate(list(images[i : i + batch_size]), list(prompts[i : i + batch_size]),
                               max_new_tokens=max_new_tokens, decoding=decoding, interventions=interventions)
        out += [r.text for r in results]
    return out


def evaluate(vlm: Any, n: int = 100, seed: int = 0, decoding: Any = "greedy", interventions: Any = None,
             splits: Sequence[str] = SPLITS, batch_size: int = 64, progress: Progress | None = None,
             keep_outputs: bool = False) -> dict[str, Any]:
    """Captions and POPE answers for `n` held-out scenes with one decoding method (+ interventions).

    Returns percentages: `object_recall` (CHAIR's Recall: ground-truth objects named), `CHAIR_S`, `CHAIR_I`,
    `pope_accuracy` (mean accuracy over `splits`), plus `pope_f1`, `pope_yes_ratio`, per-split accuracy,
    `colour_accuracy`, `cooccurrence_share` of the hallucinations, and `seconds`.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    start = time.perf_counter()
    scenes = heldout_scenes(n, seed)
    images = [s.image() for s in scenes]
    if progress:
        progress(f"captions for {n} scenes")
    captions = generate_texts(vlm, images, [DEFAULT_CAPTION_PROMPT] * n, CAPTION_TOKENS, decoding, interventions,
                              batch_size)
    chair = chair_of(captions, scenes)
    questions = pope_question_set(scenes, seed, splits)
    if progress:
        progress(f"{len(questions)} POPE questions")
    answers = generate_texts(vlm, [images[int(q["image"])] for q in questions], [q["text"] for q in questions],
                             ANSWER_TOKENS, decoding, interventions, batch_size)
    pope = pope_scores(answers, questions)
    result: dict[str, Any] = {
        "n": n,
        "seed": seed,
        "object_recall": chair.metrics["Recall"],
        "pope_accuracy": pope["mean"]["Accuracy"],
        "CHAIR_S": chair.metrics["CHAIR_S"],
        "CHAIR_I": chair.metrics["CHAIR_I"],
        "precision": chair.metrics["Precision"],
        "pope_f1": pope["mean"]["F1"],
        "pope_yes_ratio": pope["mean"]["Yes_ratio"],
        **{f"pope_{s}": pope["splits"][s]["Accuracy"] for s in splits},
        "colour_accuracy": colour_accuracy(captions, scenes),
        "cooccurrence_share": cooccurrence_share(chair, scenes),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if keep_outputs:
        result["captions"] = captions
        result["answers"] = [{**q, "answer": a} for q, a in zip(questions, answers)]
    return result


# ----------------------------------------------------------------------------------------------------------
# Pointing game


def pointing_targets(scene: Scene) -> list[PointingTarget]:
    """One pointing target per object: the category word of "Is there a {category} in the image?" and the
    object's box."""
    return [PointingTarget(o.category, existence_question(o.category), o.box) for o in scene.objects]


def pointing_game(vlm: Any, scenes: Sequence[Scene], layer_heads: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """`vlmscope.explain.pointing.pointing_game` over every object of `scenes`: how often the peak of the
    category word's map falls inside the object's box, per (layer, head)."""
    return explain_pointing_game(vlm, [(s.image(), pointing_targets(s)) for s in scenes], layer_heads)


def evaluate_model(model_dir: Any, n: int = 100, seed: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Load a saved model directory (or name) on CPU and `evaluate` it."""
    import vlmscope

    return evaluate(vlmscope.load(str(model_dir), device="cpu"), n, seed, **kwargs)


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(description="Evaluate a model on held-out shapes scenes.")
    ap.add_argument("--model", default="shapes", help="model directory or name (default: the shipped model)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--decoding", default="greedy")
    ap.add_argument("--intervention", action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(json.dumps(evaluate_model(args.model, args.n, args.seed, decoding=args.decoding,
                                    interventions=args.intervention)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
