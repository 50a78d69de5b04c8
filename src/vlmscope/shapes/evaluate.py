"""Held-out evaluation of a shapes model: object recall, CHAIR, POPE, and a pointing game.

The metrics are computed against the world's ground truth with a small self-contained matcher (the
package's general CHAIR/POPE code lives elsewhere); decoding is stock `model.generate` (greedy).

    python -m vlmscope.shapes.evaluate --n 200 --seed 0 [--model DIR] [--pointing]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmscope.shapes.vocab import COLOURS, word_to_category
from vlmscope.shapes.world import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_WORLD,
    Question,
    Scene,
    category_frequencies,
    existence_question,
    pope_questions,
    sample_scenes,
)

POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")


def generate_scenes(n: int, seed: int) -> list[Scene]:
    """`n` held-out scenes (the "test" stream, disjoint from the training stream) for a seed."""
    return sample_scenes(n, seed, split="test")


# ----------------------------------------------------------------------------------------------------------
# Pure metrics


def mentioned_objects(caption: str) -> list[tuple[str, str | None]]:
    """(category, colour or None) for each object a caption names, first mention only, in order.
    A colour counts when it is the word right before the category word ("a red circle")."""
    words = caption.lower().replace(",", " , ").replace(".", " . ").split()
    seen: dict[str, str | None] = {}
    for i, w in enumerate(words):
        cat = word_to_category(w)
        if cat is None or cat in seen:
            continue
        prev = words[i - 1] if i > 0 else None
        seen[cat] = prev if prev in COLOURS else None
    return list(seen.items())


def evaluate_captions(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Caption metrics over paired captions and scenes.

    object_recall: ground-truth objects named / ground-truth objects.
    chair_i: named objects that are absent / named objects (CHAIR_I; per caption, each category once).
    chair_s: captions naming at least one absent object / captions (CHAIR_S).
    colour_accuracy: correctly named objects whose colour is right / correctly named objects with a colour.
    name_recall: ground-truth objects named with the right colour / ground-truth objects.
    cooccurrence_share: hallucinated objects that are the co-occurrence partner of a present object /
    hallucinated objects (how much of the hallucination the built-in bias explains).
    """
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    n_gt = n_hit = n_named = n_halluc = n_bad_caps = n_coloured = n_colour_ok = n_cooc = 0
    for cap, scene in zip(captions, scenes):
        gt = {o.category: o.colour for o in scene.objects}
        named = mentioned_objects(cap)
        halluc = [c for c, _ in named if c not in gt]
        n_gt += len(gt)
        n_named += len(named)
        n_halluc += len(halluc)
        n_bad_caps += bool(halluc)
        partners = {DEFAULT_WORLD.partner(c) for c in gt}
        n_cooc += sum(c in partners for c in halluc)
        for c, colour in named:
            if c in gt:
                n_hit += 1
                if colour is not None:
                    n_coloured += 1
                    n_colour_ok += colour == gt[c]
    n = len(captions)
    return {
        "n": n,
        "object_recall": n_hit / n_gt if n_gt else 0.0,
        "object_precision": (n_named - n_halluc) / n_named if n_named else 0.0,
        "chair_i": n_halluc / n_named if n_named else 0.0,
        "chair_s": n_bad_caps / n if n else 0.0,
        "colour_accuracy": n_colour_ok / n_coloured if n_coloured else 0.0,
        "name_recall": n_colour_ok / n_gt if n_gt else 0.0,
        "hallucinated_objects": n_halluc,
        "cooccurrence_share": n_cooc / n_halluc if n_halluc else 0.0,
        "mean_objects_named": n_named / n if n else 0.0,
    }


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer starting with "yes", False for "no", None otherwise."""
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    if not words:
        return None
    if words[0] == "yes":
        return True
    if words[0] == "no":
        return False
    return None


def evaluate_answers(answers: Sequence[str], labels: Sequence[bool]) -> dict[str, float]:
    """POPE metrics: accuracy, precision, recall, F1 (positive = "yes"), yes-ratio; unparseable answers
    count as wrong."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    tp = fp = tn = fn = bad = n_yes = 0
    for a, y in zip(answers, labels):
        p = parse_yes_no(a)
        if p is None:
            bad += 1
            fn += bool(y)
            fp += not y
            continue
        n_yes += p
        if p and y:
            tp += 1
        elif p and not y:
            fp += 1
        elif not p and not y:
            tn += 1
        else:
            fn += 1
    n = len(labels)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "yes_ratio": n_yes / n if n else 0.0,
        "unparseable": bad,
    }


def pope_set(
    scenes: Sequence[Scene], strategy: str, seed: int, popularity: dict[str, float] | None = None
) -> list[tuple[int, Question]]:
    """POPE questions over scenes: (scene index, question) pairs, balanced yes/no per scene."""
    rng = random.Random(f"shapes:pope:{strategy}:{seed}")
    if strategy == "popular" and popularity is None:
        popularity = category_frequencies()
    out = []
    for i, s in enumerate(scenes):
        out += [(i, q) for q in pope_questions(s, rng, strategy=strategy, popularity=popularity)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Running a model


def default_model_dir() -> Path:
    """Where the shipped shapes model lives inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "models" / "shapes"


def load_model(model_dir: str | Path | None = None, attn_implementation: str | None = None):
    """(model, processor) from a model directory with stock Auto classes, offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = str(model_dir or default_model_dir())
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kwargs)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, processor


def build_prompt(processor, text: str) -> str:
    """One user turn, image first then text, with the generation prompt (the project's convention)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def generate(
    model, processor, images: Sequence, prompts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers (stock `generate`) for paired images and prompt texts."""
    import torch

    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [build_prompt(processor, p) for p in prompts[i : i + batch_size]]
        batch = processor(images=list(images[i : i + batch_size]), text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        new = seq[:, batch["input_ids"].shape[1] :]
        outs += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outs


def evaluate_model(
    model_dir: str | Path | None = None,
    n: int = 200,
    seed: int = 0,
    strategies: Sequence[str] = POPE_STRATEGIES,
    model_and_processor: tuple | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Captions and POPE on `n` held-out scenes. Returns the caption metrics, POPE metrics per strategy,
    and `pope_accuracy` (the mean accuracy over strategies)."""
    model, processor = model_and_processor or load_model(model_dir)
    scenes = generate_scenes(n, seed)
    images = [s.image() for s in scenes]
    captions = generate(model, processor, images, [DEFAULT_CAPTION_PROMPT] * n, batch_size)
    result: dict[str, Any] = {"seed": seed, "n_scenes": n, "captions": evaluate_captions(captions, scenes)}
    popularity = category_frequencies() if "popular" in strategies else None
    accs = []
    for strategy in strategies:
        qs = pope_set(scenes, strategy, seed, popularity)
        answers = generate(model, processor, [images[i] for i, _ in qs], [q.text for _, q in qs], batch_size, 4)
        m = evaluate_answers(answers, [bool(q.label) for _, q in qs])
        result[f"pope_{strategy}"] = m
        accs.append(m["accuracy"])
    result["object_recall"] = result["captions"]["object_recall"]
    result["chair_s"] = result["captions"]["chair_s"]
    result["chair_i"] = result["captions"]["chair_i"]
    result["pope_accuracy"] = sum(accs) / len(accs) if accs else 0.0
    return result


def pointing_game(
    model, processor, scenes: Sequence[Scene], query: str = "object", batch_size: int = 16
) -> dict[str, Any]:
    """For every (layer, head): how often the peak of the attention from a text token to the image grid
    falls inside the box of the object asked about, over "Is there a {category} in the image?" for every
    present object. `query` is "object" (the category word's token) or "last" (the last prompt token).
    The model must run eager attention (load with attn_implementation="eager"). Returns the best head and
    the full hit-rate table [layer][head]."""
    import torch

    cfg = model.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    patch = cfg.vision_config.patch_size
    items = [(s, o) for s in scenes for o in s.objects]
    hits = None
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        texts = [build_prompt(processor, existence_question(o.category)) for _, o in chunk]
        batch = processor(images=[s.image() for s, _ in chunk], text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
        att = torch.stack(out.attentions, 1)  # batch, layer, head, query, key
        ids = batch["input_ids"]
        for b, (_s, o) in enumerate(chunk):
            # Per row: left padding shifts where the image tokens sit.
            img_pos = (ids[b] == cfg.image_token_id).nonzero().flatten()
            if query == "last":
                qpos = ids.shape[1] - 1
            else:
                cat_id = processor.tokenizer.convert_tokens_to_ids(o.category)
                qpos = int((ids[b] == cat_id).nonzero().flatten()[-1])
            a = att[b, :, :, qpos][..., img_pos]  # layer, head, grid*grid (row-major patches)
            peak = a.argmax(-1)
            r, c = peak // grid, peak % grid
            px, py = (c.float() + 0.5) * patch, (r.float() + 0.5) * patch
            x0, y0, x1, y1 = o.box
            inside = ((px >= x0) & (px < x1) & (py >= y0) & (py < y1)).float()
            hits = inside if hits is None else hits + inside
    assert hits is not None, "no objects to point at"
    rate = hits / len(items)
    best = int(rate.argmax())
    n_heads = rate.shape[1]
    return {
        "query": query,
        "n": len(items),
        "best_layer": best // n_heads,
        "best_head": best % n_heads,
        "best_hit_rate": float(rate.max()),
        "hit_rate": [[round(float(v), 3) for v in row] for row in rate],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate a shapes model on held-out scenes.")
    ap.add_argument("--model", default=None, help="model directory (default: the shipped shapes model)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pointing", action="store_true", help="also run the attention pointing game")
    args = ap.parse_args(argv)
    mp = load_model(args.model, attn_implementation="eager" if args.pointing else None)
    result = evaluate_model(n=args.n, seed=args.seed, model_and_processor=mp)
    if args.pointing:
        scenes = generate_scenes(min(args.n, 100), args.seed)
        result["pointing_object"] = pointing_game(*mp, scenes, query="object")
        result["pointing_last"] = pointing_game(*mp, scenes, query="last")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
