"""Write the crafted AMBER parity inputs into tests/data/parity/amber/ (deterministic, seeded).

- ``responses.json``: a few hundred responses in the reference's format covering every branch of its scorer:
  descriptions with truth objects, association words ("ground" for grass), hallucination targets and their
  association words, global safe words, plurals, sentence-initial capitals (lost by the un-lower-cased path),
  words outside the vocabulary, the typo entries, repeats and empty descriptions; answers "Yes", "No",
  "yes", "no", "No.", "Yes, there is ...", "", "I cannot tell", " No" on every question type.
- ``responses_lenient.json``: the same with each answer replaced by what `vlmscope.eval.amber`'s lenient
  parser reads ("Yes"/"No"; unparsed answers kept as written) — how HALVA-style users normalise before
  running the reference, so the reference scoring these equals vlmscope's lenient parser on the raw ones.
- ``similarity_table.json``: ``[word1, word2, similarity]`` for the spaCy stand-in: 1.0 for every vocabulary
  word with itself (as spaCy's identical-text shortcut) plus seeded pairs around the 0.8 threshold
  (including exactly 0.8, which is not above it) between nouns the descriptions use and their images' words.

Usage: python tools/parity/amber/make_inputs.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from vlmscope.eval.amber import load_amber_data, parse_answer

ANSWERS = ["Yes", "No", "yes", "no", "No.", "Yes, there is one.", "No, there is not.", "", "I cannot tell.", " No",
           "Yes.", "NO", "Not really.", "I don't know."]
PLURAL = {"tree": "trees", "dog": "dogs", "person": "people", "man": "men", "woman": "women", "leaf": "leaves",
          "child": "children", "cloud": "clouds", "bird": "birds", "car": "cars", "boat": "boats", "chair": "chairs"}
TEMPLATES = ["There is a {} near the {}.", "A {} and a {} are visible.", "The {} stands beside some {}.",
             "{} can be seen with a {}.", "In the picture, a {} is next to the {}."]


def _words(obj: str, data) -> list[str]:
    return [obj, *data.association[obj]]


def description(rng: random.Random, ann, data, vocab: list[str]) -> tuple[str, list[str]]:
    truth, hallu = ann["truth"], ann["hallu"]
    pool = []
    pool += rng.sample([w for o in truth for w in _words(o, data)], k=min(3, len(truth)))
    pool += rng.sample([w for o in hallu for w in _words(o, data)], k=rng.randint(0, 2))
    pool += rng.sample(sorted(data.safe_words), k=rng.randint(0, 1))
    pool += rng.sample(vocab, k=rng.randint(0, 2))  # likely hallucinations, some similar via the table
    pool += rng.sample(["sky", "picture", "scene", "view", "color"], k=1)  # mostly outside the vocabulary
    rng.shuffle(pool)
    used = list(pool)
    sentences = []
    while pool:
        a = pool.pop()
        b = pool.pop() if pool else rng.choice(truth)
        if rng.random() < 0.3:
            a = PLURAL.get(a, a + "s")
        template = rng.choice(TEMPLATES)
        text = template.format(a, b)
        sentences.append(text[0].upper() + text[1:])
    if rng.random() < 0.2:
        sentences.append(f"{truth[0].capitalize()} again: the {truth[0]} and the {truth[0]}.")
    return " ".join(sentences), used


def main(out: Path) -> None:
    rng = random.Random(20)
    data = load_amber_data()
    vocab = sorted(data.vocabulary)
    generative = [a for a in data.annotations if a["type"] == "generative"]
    chosen = sorted(rng.sample(generative, k=120), key=lambda a: a["id"])
    responses = []
    used: dict[int, list[str]] = {}
    for k, ann in enumerate(chosen):
        if k % 25 == 0:
            text = ""
        elif k % 25 == 1:
            text = "The TV shows earrings, chopsticks and slippers; leaves, a seegull, a rpoe and a cann lie there."
        elif k % 25 == 2:
            text = "Trees. Dogs. People walk on the grass near the ground and the man and the man again."
        else:
            text, used[ann["id"]] = description(rng, ann, data, vocab)
        responses.append({"id": ann["id"], "response": text})
    by_type: dict[str, list] = {}
    for a in data.annotations:
        if a["type"] != "generative":
            by_type.setdefault(a["type"], []).append(a)
    for kind in sorted(by_type):
        for j, ann in enumerate(sorted(rng.sample(by_type[kind], k=45), key=lambda a: a["id"])):
            # Mostly exact answers (so the figures are not all zero), every other form on every type.
            answer = rng.choice(["Yes", "No"]) if j % 3 else ANSWERS[(j // 3) % len(ANSWERS)]
            responses.append({"id": ann["id"], "response": answer})
    lenient = [{"id": r["id"], "response": r["response"] if data.annotation(r["id"])["type"] == "generative"
                else parse_answer(r["response"], "lenient") or r["response"]} for r in responses]
    pairs = [[w, w, 1.0] for w in vocab]
    seen = {(w, w) for w in vocab}
    for ann in chosen:
        words = [w for o in ann["truth"] + ann["hallu"] for w in _words(o, data)]
        for _ in range(3 if ann["id"] in used else 0):
            a, b = rng.choice(used[ann["id"]]), rng.choice(words)
            if a != b and (a, b) not in seen and (b, a) not in seen:
                seen.add((a, b))
                pairs.append([a, b, rng.choice([0.8, 0.79, 0.81, 0.85, 0.9, 0.95])])
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in (("responses.json", responses), ("responses_lenient.json", lenient),
                          ("similarity_table.json", pairs)):
        (out / name).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"{len(responses)} responses, {len(pairs)} similarity pairs → {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/data/parity/amber"))
