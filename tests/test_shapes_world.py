"""Invariants of the shapes world: reproducibility, geometry, text ground truth, co-occurrence bias."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlmscope.eval.chair import chair_scores
from vlmscope.eval.pope import pope_scores
from vlmscope.shapes.evaluate import (
    chair_of,
    chair_vocabulary,
    heldout_scenes,
    mentioned_objects,
    pope_question_set,
)
from vlmscope.shapes.vocab import CATEGORIES, COLOURS, SPECIAL_TOKENS, vocabulary, word_to_category
from vlmscope.shapes.world import (
    DEFAULT_WORLD,
    Scene,
    ShapeObject,
    caption,
    existence_question,
    patch_labels,
    pope_questions,
    render_scene,
    sample_scenes,
    training_question,
)


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(300, seed=7)


def test_seeded_reproducibility():
    a, b = sample_scenes(20, seed=3), sample_scenes(20, seed=3)
    assert a == b
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(render_scene(x)), np.asarray(render_scene(y)))
    assert sample_scenes(20, seed=4) != a
    # Splits are distinct streams.
    assert sample_scenes(20, seed=3, split="train") != a
    assert heldout_scenes(5, 3) == a[:5]


def test_images_and_boxes(scenes):
    s = DEFAULT_WORLD.image_size
    for sc in scenes:
        img = sc.image()
        assert img.size == (s, s) and img.mode == "RGB"
        assert 1 <= len(sc.objects) <= 4
        assert len(sc.categories) == len(sc.objects), "categories are unique within a scene"
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s
            assert o.category in CATEGORIES and o.colour in COLOURS
            assert 0.3 <= o.visible <= 1.0
            assert (DEFAULT_WORLD.tucked_min_visible if o.tucked else DEFAULT_WORLD.min_visible) <= o.visible


def test_object_pixels_have_object_colour(scenes):
    # The centre pixel of a fully visible, unrotated-enough circle/square is its colour.
    checked = 0
    for sc in scenes:
        arr = np.asarray(sc.image(), dtype=np.int32)
        for o in sc.objects:
            if o.category in ("circle", "square") and o.visible == 1.0:
                x, y = (int(v) for v in o.center)
                assert np.abs(arr[y, x] - np.asarray(COLOURS[o.colour])).max() < 40
                checked += 1
    assert checked > 20


def test_patch_labels_follow_the_objects(scenes):
    colours = list(COLOURS)
    for sc in scenes[:100]:
        cats, cols = patch_labels(sc, 8)
        assert cats.shape == (8, 8) and ((cats == 0) == (cols == 0)).all()
        labelled = {CATEGORIES[c - 1] for c in np.unique(cats) if c}
        assert labelled <= sc.categories
        assert labelled == sc.categories
        for o in sc.objects:
            sel = cats == CATEGORIES.index(o.category) + 1
            assert (cols[sel] == colours.index(o.colour) + 1).all()
            # Labelled patches lie in the object's box.
            for r, c in zip(*np.nonzero(sel)):
                x0, y0, x1, y1 = o.box
                assert x0 < (c + 1) * 8 and c * 8 < x1 and y0 < (r + 1) * 8 and r * 8 < y1


def test_caption_names_exactly_the_objects(scenes):
    for sc in scenes:
        cap = caption(sc)
        assert cap.endswith(" .")
        named = mentioned_objects(cap)
        assert {c for c, _ in named} == sc.categories
        assert {f"{col} {c}" for c, col in named} == sc.names
        # Left to right.
        xs = [sc.get(c).box_center[0] for c, _ in named]
        assert xs == sorted(xs)
    m = chair_of([caption(sc) for sc in scenes], scenes).metrics
    assert m["Recall"] == 100.0 and m["CHAIR_I"] == 0.0 and m["CHAIR_S"] == 0.0 and m["Precision"] == 100.0


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_pope_labels_match_ground_truth(scenes, strategy):
    rng = random.Random(0)
    pop = {c: 1.0 / (i + 1) for i, c in enumerate(CATEGORIES)}
    for sc in scenes:
        qs = pope_questions(sc, rng, strategy=strategy, popularity=pop)
        assert sum(q.label for q in qs) == sum(not q.label for q in qs) or len(sc.categories) > 4
        for q in qs:
            assert q.label == (q.category in sc.categories)
            assert q.answer == ("yes ." if q.label else "no .")
            assert word_to_category(q.text.split()[-4]) == q.category
        if strategy == "adversarial":
            partners = {DEFAULT_WORLD.partner(c) for c in sc.categories} - sc.categories - {None}
            negs = {q.category for q in qs if not q.label}
            assert partners <= negs or len(negs) >= len(sc.categories)


def test_training_questions_are_true(scenes):
    rng = random.Random(1)
    kinds = set()
    for sc in scenes:
        for _ in range(5):
            q = training_question(sc, rng)
            kinds.add(q.kind)
            if q.kind in ("exist", "exist_colour"):
                words = q.text.rstrip("?").split()
                colour = words[-5] if words[-5] in COLOURS else None
                truth = any(o.category == q.category and (colour is None or o.colour == colour) for o in sc.objects)
                assert q.label == truth and q.answer == ("yes ." if truth else "no .")
            elif q.kind == "colour":
                assert q.answer == f"{sc.get(q.category).colour} ."
            elif q.kind == "caption":
                assert q.answer == caption(sc)
    assert kinds == {"caption", "exist", "exist_colour", "colour", "where", "count"}


def test_cooccurrence_bias_as_configured():
    scenes = sample_scenes(2000, seed=11, split="stats")
    cfg = DEFAULT_WORLD
    for a, b in cfg.pairs:
        for x, y in ((a, b), (b, a)):
            with_x = [s for s in scenes if x in s.categories and len(s.objects) > 1]
            p_pair = sum(y in s.categories for s in with_x) / len(with_x)
            # Base rate of y next to an unpaired category, for contrast.
            with_circle = [s for s in scenes if "circle" in s.categories and len(s.objects) > 1]
            p_base = sum(y in s.categories for s in with_circle) / len(with_circle)
            assert p_pair >= cfg.p_cooccur * 0.8, (x, y, p_pair)
            assert p_pair > p_base + 0.3, (x, y, p_pair, p_base)
    # Tucked partners exist, are small, partly hidden and sit right behind their anchor.
    tucked = [(s, i) for s in scenes for i, o in enumerate(s.objects) if o.tucked]
    assert len(tucked) > 100
    for s, i in tucked:
        o = s.objects[i]
        assert o.visible <= 0.9 and o.size <= cfg.tucked_size_range[1]
        assert s.objects[i + 1].category == cfg.partner(o.category)


def test_vocabulary_covers_the_text(scenes):
    vocab = vocabulary()
    assert list(vocab)[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    rng = random.Random(2)
    for sc in scenes[:100]:
        for _ in range(5):
            q = training_question(sc, rng)
            for text in (q.text, q.answer):
                for w in text.lower().replace("?", " ?").replace(".", " .").replace(",", " ,").split():
                    assert w in vocab, w


def _obj(category: str, colour: str, x: int, y: int) -> ShapeObject:
    return ShapeObject(category, colour, (x - 8, y - 8, x + 8, y + 8), 1.0, (float(x), float(y)), 16.0, 0.0)


HAND_SCENES = [
    Scene((_obj("circle", "red", 16, 32), _obj("square", "blue", 48, 32)), (), (220, 220, 220), 1),
    Scene((_obj("star", "green", 32, 32),), (), (220, 220, 220), 2),
    Scene((_obj("heart", "red", 12, 12), _obj("diamond", "blue", 32, 40), _obj("cross", "orange", 52, 12)), (),
          (220, 220, 220), 3),
]


def test_chair_of_the_eval_package_on_a_hand_computed_case():
    captions = [
        "a red circle , a blue square and a yellow moon .",  # 3 mentions, moon hallucinated
        "a green star .",  # 1 mention, correct
        "a red heart and two stars .",  # heart correct, stars (-> star) hallucinated; diamond, cross missed
    ]
    result = chair_of(captions, HAND_SCENES)
    # By hand: CHAIR_S = 2/3 captions; CHAIR_I = 2 hallucinated / 6 mentions; Recall = (2 + 1 + 1) / (2 + 1 + 3).
    assert result.metrics["CHAIR_S"] == pytest.approx(100 * 2 / 3)
    assert result.metrics["CHAIR_I"] == pytest.approx(100 * 2 / 6)
    assert result.metrics["Recall"] == pytest.approx(100 * 4 / 6)
    assert [r["mscoco_hallucinated_words"] for r in result.per_caption] == [[["moon", "moon"]], [], [["star", "star"]]]  # lemmatised
    assert result.counts["mentions"] == 6
    # The wrapper is the package's code, unchanged: the same call by hand gives the same result.
    direct = chair_scores([{"image_id": i, "caption": c} for i, c in enumerate(captions)],
                          {i: s.categories for i, s in enumerate(HAND_SCENES)}, vocabulary=chair_vocabulary())
    assert direct.metrics == result.metrics


def test_pope_of_the_eval_package_on_the_world_ground_truth():
    questions = pope_question_set(HAND_SCENES, seed=0)
    assert len(questions) == 3 * 2 * len(HAND_SCENES)  # 3 splits x (yes, no) x scenes
    for q in questions:
        scene = HAND_SCENES[int(q["image"])]
        assert (q["label"] == "yes") == (q["object"] in scene.categories)
        assert q["text"] == existence_question(q["object"])  # the question the model was trained on
    all_yes = pope_scores(["yes ."] * len(questions), questions)
    assert all_yes["mean"]["Accuracy"] == 50.0 and all_yes["mean"]["Yes_ratio"] == 100.0
    right = pope_scores([q["label"] + " ." for q in questions], questions)
    assert right["mean"]["Accuracy"] == 100.0
    # One wrong "no" on a positive of the random split: accuracy 5/6 there, recall 2/3.
    answers = [q["label"] + " ." for q in questions]
    first_yes = next(i for i, q in enumerate(questions) if q["split"] == "random" and q["label"] == "yes")
    answers[first_yes] = "no ."
    split = pope_scores(answers, questions)["splits"]["random"]
    assert split["Accuracy"] == pytest.approx(100 * 5 / 6) and split["Recall"] == pytest.approx(100 * 2 / 3)


def test_caption_colours_are_read():
    assert mentioned_objects("a red circle , a square and a blue moon .") == [
        ("circle", "red"), ("square", None), ("moon", "blue")]
