"""POPE: answer-parsing rules, hand-computed metrics, official files, set construction invariants."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

import vlmscope
from vlmscope.errors import InputError
from vlmscope.eval.pope import (
    build_pope,
    coco_image_objects,
    load_answers,
    load_questions,
    parse_answer,
    pope_scores,
    question_file_info,
    write_questions,
)

# The official question files ship inside the package (vlmscope/data/pope): no shared data, no skip.
PACKAGED = Path(vlmscope.__file__).resolve().parent / "data" / "pope"

# answer → (official, opera, exact); vcd depends on the label and is tested separately.
PARSE_CASES = {
    "Yes": ("yes", "yes", "yes"),
    " yes ": ("yes", "yes", "yes"),
    "Yes, there is a dog in the image.": ("yes", "yes", None),
    "No": ("no", "no", "no"),
    "No.": ("no", "no", None),
    "no, there is not.": ("no", "no", None),
    "NO": ("yes", "no", "no"),  # official rule only knows "No", "no", "not"
    "There isn't a dog.": ("yes", "no", None),  # "n't" only counts for opera
    "I cannot tell.": ("yes", "yes", None),
    "": ("yes", "yes", None),  # empty output is "yes" for the sentence rules
    "Yes. But no dog is visible.": ("yes", "no", None),  # official reads the first sentence only
    "Not really": ("yes", "yes", None),  # capitalised "Not" is no negation word
    "There is no dog": ("no", "no", None),
    "I don't know": ("yes", "no", None),
}


@pytest.mark.parametrize(("answer", "expected"), sorted(PARSE_CASES.items()))
def test_parsing_rules(answer: str, expected: tuple) -> None:
    official, opera, exact = expected
    assert parse_answer(answer, "official") == official
    assert parse_answer(answer, "llava") == official
    assert parse_answer(answer, "opera") == opera
    assert parse_answer(answer, "pai") == opera
    assert parse_answer(answer, "exact") == exact
    assert parse_answer(answer, "lmms-eval") == exact


def test_vcd_substring_rule_depends_on_the_label() -> None:
    # "no" is found inside "not", "know", "cannot"; "yes" must occur for a yes question.
    assert parse_answer("I cannot tell", "vcd", label="no") == "no"
    assert parse_answer("I don't know", "vcd", label="no") == "no"
    assert parse_answer("Yes", "vcd", label="no") == "yes"
    assert parse_answer("YES!", "vcd", label="yes") == "yes"
    assert parse_answer("There is a dog", "vcd", label="yes") == "no"
    assert parse_answer("yes, but no", "vcd", label="yes") == "yes"
    with pytest.raises(InputError, match="unknown answer rule"):
        parse_answer("yes", "strict")


QUESTIONS = [
    {"question_id": i + 1, "image": f"img{i // 2}.jpg", "text": "?", "label": lab, "split": split}
    for i, (lab, split) in enumerate(
        [("yes", "random"), ("no", "random"), ("yes", "random"), ("no", "random"),
         ("yes", "popular"), ("no", "popular"), ("yes", "popular"), ("no", "popular")]
    )
]  # fmt: skip
ANSWERS = ["Yes.", "Yes, it is.", "No", "No.", "Yes", "NO", "Yes", "I cannot see one."]


def test_metrics_by_hand() -> None:
    answers = [{"question_id": q["question_id"], "text": a} for q, a in zip(QUESTIONS, ANSWERS)]
    random.Random(0).shuffle(answers)  # matched by question_id, not position
    out = pope_scores(answers, QUESTIONS, rule="official")
    r, p = out["splits"]["random"], out["splits"]["popular"]
    # random: preds yes yes no no vs labels yes no yes no → TP 1, FP 1, FN 1, TN 1
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 1)
    assert r["Accuracy"] == 50.0 and r["Precision"] == 50.0 and r["Recall"] == 50.0 and r["F1"] == 50.0
    assert r["Yes_ratio"] == 50.0
    # popular: preds yes yes("NO") yes yes vs yes no yes no → TP 2, FP 2
    assert (p["tp"], p["fp"], p["fn"], p["tn"]) == (2, 2, 0, 0)
    assert p["Accuracy"] == 50.0 and p["Precision"] == 50.0 and p["Recall"] == 100.0
    assert p["F1"] == pytest.approx(100 * 2 * 0.5 * 1.0 / 1.5)
    assert p["Yes_ratio"] == 100.0
    assert out["mean"]["F1"] == pytest.approx((50.0 + 200 / 3) / 2)
    assert out["n_questions"] == 8 and out["rule"] == "official"
    # opera reads "NO" as no: popular becomes TP 2, FP 1, TN 1
    p2 = pope_scores(ANSWERS, QUESTIONS, rule="opera")["splits"]["popular"]
    assert (p2["tp"], p2["fp"], p2["tn"]) == (2, 1, 1) and p2["Accuracy"] == 75.0


def test_exact_rule_drops_unparsed_answers_from_precision() -> None:
    out = pope_scores(ANSWERS, QUESTIONS, rule="exact")["splits"]["random"]
    # "Yes." and "Yes, it is." and "No." are unparsed: only "No" (label yes → FN) counts
    assert out["unparsed"] == 3 and (out["tp"], out["fp"], out["fn"], out["tn"]) == (0, 0, 1, 0)
    assert out["Accuracy"] == 0.0 and out["Precision"] == 0.0 and out["Yes_ratio"] == 0.0


def test_answer_matching_errors() -> None:
    with pytest.raises(InputError, match="7 answers for 8 questions"):
        pope_scores(ANSWERS[:7], QUESTIONS)
    with pytest.raises(InputError, match="no answer"):
        pope_scores([{"question_id": 1, "answer": "yes"}], QUESTIONS)


def test_answer_and_question_files(tmp_path: Path) -> None:
    qpath = write_questions(QUESTIONS[:4], tmp_path / "coco_pope_random.jsonl")
    qs = load_questions(qpath)
    assert [q["split"] for q in qs] == ["random"] * 4
    assert set(json.loads(qpath.read_text().splitlines()[0])) == {"question_id", "image", "text", "label"}
    apath = tmp_path / "answers.jsonl"
    apath.write_text("".join(json.dumps({"question_id": i + 1, "answer": a}) + "\n" for i, a in enumerate(ANSWERS[:4])))
    assert pope_scores(load_answers(apath), qs)["splits"]["random"]["Accuracy"] == 50.0
    apath.write_text('{"question_id": 1, "answer": "yes"}\n{"question_id": 2 "answer": "no"}\n')
    with pytest.raises(InputError, match="line 2"):
        load_answers(apath)
    with pytest.raises(InputError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def test_official_question_files() -> None:
    for split in ("random", "popular", "adversarial"):
        path = PACKAGED / f"coco_pope_{split}.jsonl"
        qs = load_questions(path)
        assert len(qs) == 3000 and {q["split"] for q in qs} == {split}
        assert Counter(q["label"] for q in qs) == {"yes": 1500, "no": 1500}
        info = question_file_info(path)
        assert info["first_image"] == "COCO_val2014_000000310196.jpg" and info["id_base"] == 1
        # Perfect and always-yes answerers.
        perfect = pope_scores([q["label"].capitalize() for q in qs], qs)["splits"][split]
        assert perfect["Accuracy"] == 100.0 and perfect["F1"] == 100.0 and perfect["Yes_ratio"] == 50.0
        always = pope_scores(["Yes"] * len(qs), qs)["splits"][split]
        assert always["Precision"] == 50.0 and always["Recall"] == 100.0
        assert always["F1"] == pytest.approx(200 / 3)


CATEGORIES = ["person", "dog", "cat", "car", "apple", "umbrella", "chair", "skis", "bus", "oven", "bird", "cup"]


def _synthetic_instances(n_images: int = 60, seed: int = 1) -> dict:
    """A COCO-format instances file with skewed category frequencies and some correlated pairs."""
    rng = random.Random(seed)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    images, anns = [], []
    weights = [12, 6, 4, 8, 2, 3, 7, 1, 3, 2, 2, 5]
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "file_name": f"COCO_val2014_{img_id:012d}.jpg"})
        k = rng.randint(1, 6)
        chosen = set(rng.choices(range(len(CATEGORIES)), weights=weights, k=k))
        if 1 in chosen:  # dogs come with people
            chosen.add(0)
        for c in chosen:
            for _ in range(rng.randint(1, 2)):  # repeated instances must not repeat objects
                anns.append({"image_id": img_id, "category_id": c + 1})
    rng.shuffle(anns)
    return {"images": images, "annotations": anns, "categories": cats}


def test_image_objects_keep_annotation_order_without_repeats() -> None:
    data = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8}],
        "annotations": [{"image_id": 7, "category_id": 2}, {"image_id": 7, "category_id": 1},
                        {"image_id": 7, "category_id": 2}, {"image_id": 8, "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }  # fmt: skip
    assert coco_image_objects(data) == {"a.jpg": ["dog", "person"], "COCO_val2014_000000000008.jpg": ["person"]}


@pytest.fixture(scope="module")
def objects() -> dict[str, list[str]]:
    return coco_image_objects(_synthetic_instances())


def test_construction_invariants(objects: dict[str, list[str]]) -> None:
    sets = build_pope(objects, "all", num_images=20, num_questions=3, seed=5)
    assert set(sets) == {"random", "popular", "adversarial"}
    images = None
    for qs in sets.values():
        assert len(qs) == 20 * 6
        assert [q["question_id"] for q in qs] == list(range(1, 121))
        assert [q["label"] for q in qs] == ["yes", "no"] * 60  # alternating, balanced
        split_images = list(dict.fromkeys(q["image"] for q in qs))
        assert len(split_images) == 20
        images = images or split_images
        assert split_images == images  # same images in every split
        for img in split_images:
            mine = [q for q in qs if q["image"] == img]
            pos = [q["object"] for q in mine if q["label"] == "yes"]
            neg = [q["object"] for q in mine if q["label"] == "no"]
            assert pos == objects[img][:3]  # first three objects in annotation order
            assert not set(neg) & set(objects[img])  # negatives are absent from the image
            assert len(set(neg)) == 3  # and never repeated for one image
        assert all(len(objects[img]) >= 3 for img in split_images)


def test_popular_and_adversarial_negatives(objects: dict[str, list[str]]) -> None:
    sets = build_pope(objects, ["popular", "adversarial"], num_images=20, seed=5)
    images = list(dict.fromkeys(q["image"] for q in sets["popular"]))
    freq = Counter(o for img in images for o in objects[img])
    co = {o: Counter() for o in freq}
    for img in images:
        for a in objects[img]:
            co[a].update(b for b in objects[img] if b != a)
    for split, qs in sets.items():
        for i in range(0, len(qs), 6):
            img = qs[i]["image"]
            used: set[str] = set()
            for k in range(3):
                pos, neg = qs[i + 2 * k]["object"], qs[i + 2 * k + 1]["object"]
                valid = [o for o in freq if o not in objects[img] and o not in used]
                score = freq if split == "popular" else co[pos]
                best = max((score[o] for o in valid), default=0)
                if best > 0:
                    assert score[neg] == best  # the most frequent / most co-occurring valid object
                used.add(neg)


def test_seeded_reproducibility_and_split_independence(objects: dict[str, list[str]]) -> None:
    a = build_pope(objects, "all", num_images=20, seed=3)
    b = build_pope(objects, "all", num_images=20, seed=3)
    assert a == b
    assert build_pope(objects, "random", num_images=20, seed=3)["random"] == a["random"]
    c = build_pope(objects, "random", num_images=20, seed=4)
    assert c["random"] != a["random"]


def test_question_text_articles_and_plurals() -> None:
    objs = {"x.jpg": ["apple", "skis", "dog"], "y.jpg": ["umbrella", "cat", "oven"]}
    qs = build_pope(objs, "random", num_images=2, num_questions=3, seed=0)["random"]
    texts = {q["object"]: q["text"] for q in qs if q["label"] == "yes"}
    assert texts["apple"] == "Is there an apple in the image?"
    assert texts["umbrella"] == "Is there an umbrella in the image?"
    assert texts["dog"] == "Is there a dog in the image?"
    assert texts["skis"] == "Is there a skis in the image?"  # the reference has no plural handling
    legacy = build_pope(objs, "random", num_images=2, seed=0, legacy_article_bug=True)["random"]
    assert {q["text"] for q in legacy if q["object"] == "apple"} == {"Is there an apple in the imange?"}
    plural = build_pope(objs, "random", num_images=2, seed=0, plural_aware=True)["random"]
    assert {q["text"] for q in plural if q["object"] == "skis"} == {"Are there skis in the image?"}


def test_pool_too_small_and_bad_split(objects: dict[str, list[str]]) -> None:
    with pytest.raises(InputError, match="lower --num-images"):
        build_pope(objects, "random", num_images=10_000)
    with pytest.raises(InputError, match="unknown POPE split"):
        build_pope(objects, "hard", num_images=5)


def test_empty_answers_are_counted_and_read_as_yes() -> None:
    out = pope_scores(["", "  ", "No", None], QUESTIONS[:4])["splits"]["random"]
    assert out["empty"] == 3 and out["unparsed"] == 0
    # labels yes no yes no; predictions yes yes no yes
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (1, 2, 1, 0) and out["Yes_ratio"] == 75.0


# --- scoring refuses or reports, never guesses (issue 12) ----------------------------------------------------

def _keyed(pairs: list[tuple[int | None, str]]) -> list[dict]:
    return [{"question_id": i, "answer": a} for i, a in pairs]


def test_duplicate_ids_are_refused_not_last_wins() -> None:
    """Old main kept the last of two answers to question 1 (here "Yes." then "No")."""
    answers = _keyed([(q["question_id"], a) for q, a in zip(QUESTIONS, ANSWERS)]) + _keyed([(1, "No")])
    with pytest.raises(InputError, match=r"question 1 is answered twice \(again in answer 9\)"):
        pope_scores(answers, QUESTIONS)


def test_answers_to_unknown_questions_are_refused_or_counted() -> None:
    answers = _keyed([(q["question_id"], a) for q, a in zip(QUESTIONS, ANSWERS)]) + _keyed([(99, "yes")])
    with pytest.raises(InputError, match="question 99, which is not in the question file"):
        pope_scores(answers, QUESTIONS)
    lenient = pope_scores(answers, QUESTIONS, extra="ignore")
    assert lenient["extra_answers"] == 1
    assert lenient["splits"] == pope_scores(answers[:-1], QUESTIONS)["splits"]  # the extra answer changes nothing


def test_mixed_id_and_positional_answers_are_refused() -> None:
    """Old main matched a file with some ids missing by position, silently."""
    answers = _keyed([(q["question_id"], a) for q, a in zip(QUESTIONS, ANSWERS)])
    answers[3]["question_id"] = None
    with pytest.raises(InputError, match=r"mix records with and without question_id \(answer 4 has none\)"):
        pope_scores(answers, QUESTIONS)


def test_positional_matching_is_reported_and_empty_inputs_are_errors() -> None:
    assert pope_scores(ANSWERS, QUESTIONS)["matched_by"] == "position"
    keyed = _keyed([(q["question_id"], a) for q, a in zip(QUESTIONS, ANSWERS)])
    assert pope_scores(keyed, QUESTIONS)["matched_by"] == "question_id"
    with pytest.raises(InputError, match="no answers"):
        pope_scores([], QUESTIONS)
    with pytest.raises(InputError, match="no questions"):
        pope_scores(ANSWERS, [])


def test_pope_score_cli_refuses_bad_files_and_prints_pure_json(tmp_path: Path, capsys) -> None:
    from vlmscope.cli import main

    qpath = write_questions(QUESTIONS, tmp_path / "coco_pope_random.jsonl")
    apath = tmp_path / "a.jsonl"

    def score(rows: list[dict], *extra: str) -> int:
        apath.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return main(["pope", "score", "--answers", str(apath), "--questions", str(qpath), *extra])

    good = [{"question_id": q["question_id"], "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]
    for bad in (good + [good[0]], good + [{"question_id": 99, "answer": "yes"}],
                [good[0], *({"answer": r["answer"]} for r in good[1:])], []):
        assert score(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert score(good + [{"question_id": 99, "answer": "yes"}], "--extra-answers", "ignore", "--json") == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # the whole of stdout is one JSON document
    assert doc["extra_answers"] == 1 and doc["matched_by"] == "question_id"
    assert doc["splits"]["random"]["n"] == 8 and "1 answers to other questions ignored" in captured.err
