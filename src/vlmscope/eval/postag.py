"""The builtin normaliser's part-of-speech decisions: a small averaged perceptron, only where CHAIR cares.

The reference lemmatises every token by its NLTK tag, but the tag only changes a CHAIR mention for a few
hundred words: those whose noun, verb, adjective and adverb lemmas differ and one of them is a CHAIR
vocabulary word ("tied" → tie as a verb, "seated" → seat → chair, "stove" → "stave" as a verb, "umbrellas"
kept plural as an adjective, "parking" → "park" breaking "parking meter"). For these *sensitive* tokens a
linear model scores the Penn tags NLTK gives them from the word, its suffixes, the surrounding words, their
suffixes and usual tags, and the best tag's WordNet part of speech (noun, verb, adjective, adverb) is used;
every other token is lemmatised as a noun (its lemma never reaches the vocabulary whichever
tag it gets).

The model (``vlmscope/data/builtin_pos_model.json.gz``) is our own: an averaged perceptron fitted by ``tools/fit_builtin_tagger.py`` to
the tags NLTK's tagger gives those tokens in caption text (OPERA's released caption logs, MIT), plus a
lexicon of the most frequent tag of common caption words, used as context features. It holds weights over
words, suffixes and those tags, not NLTK's model. ``benchmarks/bench_chair.py`` measures its agreement with the
exact normaliser on the logs of models it was not fitted on.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache

from vlmscope.eval.lemmatize import lemmatize

__all__ = ["CLASSES", "PosModel", "coarse", "features", "is_sensitive", "load_model", "reference_tags", "train"]

CLASSES = ("n", "v", "a", "r")


def coarse(penn_tag: str) -> str:
    """WordNet part of speech of a Penn tag, as the reference maps it (J→a, V→v, R→r, anything else→n)."""
    return {"J": "a", "V": "v", "R": "r"}.get(penn_tag[:1], "n")


@lru_cache(maxsize=1)
def _vocabulary() -> frozenset[str]:
    from vlmscope.eval.chair import vocabulary_words

    return vocabulary_words()


@lru_cache(maxsize=65536)
def lemmas_by_pos(token: str) -> tuple[str, ...]:
    return tuple(lemmatize(token, pos) for pos in CLASSES)


@lru_cache(maxsize=65536)
def is_sensitive(token: str) -> bool:
    """Whether the part of speech of `token` can change what CHAIR sees (see the module docstring)."""
    if not token.isalpha():
        return False
    lemmas = lemmas_by_pos(token)
    return len(set(lemmas)) > 1 and any(lemma in _vocabulary() for lemma in lemmas)


def _guess_tag(token: str, lexicon: Mapping[str, str]) -> str:
    if token in lexicon:
        return lexicon[token]
    if not token.isalpha():
        return "DIGIT" if token[:1].isdigit() else ("HYPH" if "-" in token else token[:2])
    for suffix, tag in (("ing", "VBG"), ("ed", "VBN"), ("ly", "RB"), ("s", "NNS")):
        if token.endswith(suffix):
            return tag
    return "NN"


def features(tokens: Sequence[str], i: int, lexicon: Mapping[str, str]) -> list[str]:
    """Features of token i: the word, its suffixes, the words around it and their usual tags."""

    def at(j: int) -> str:
        return tokens[j] if 0 <= j < len(tokens) else ("<s>" if j < 0 else "</s>")

    def tag(j: int) -> str:
        return _guess_tag(tokens[j], lexicon) if 0 <= j < len(tokens) else ("<s>" if j < 0 else "</s>")

    w = tokens[i]
    p1, p2, n1, n2 = at(i - 1), at(i - 2), at(i + 1), at(i + 2)
    t1, t2, u1, u2 = tag(i - 1), tag(i - 2), tag(i + 1), tag(i + 2)
    # The neighbours' suffixes generalise the neighbouring words to ones not seen in the fit.
    return [
        "bias", f"w={w}", f"s3={w[-3:]}", f"s2={w[-2:]}",
        f"p1={p1}", f"p2={p2}", f"n1={n1}", f"n2={n2}", f"ps3={p1[-3:]}", f"ns3={n1[-3:]}",
        f"t1={t1}", f"t2={t2}", f"u1={u1}", f"u2={u2}",
        f"t2,t1={t2},{t1}", f"t1,u1={t1},{u1}", f"u1,u2={u1},{u2}",
        f"w,t1={w},{t1}", f"w,u1={w},{u1}", f"w,p1={w},{p1}", f"w,n1={w},{n1}",
        f"s3,t1={w[-3:]},{t1}", f"s3,u1={w[-3:]},{u1}",
    ]  # fmt: skip


class PosModel:
    """Linear scores per Penn tag; ``predict`` returns the best tag (ties: alphabetical), ``tag`` its WordNet
    part of speech. Scoring the fine tags, as NLTK's tagger does, rather than the four parts of speech keeps
    each class's decision linear in the features (a part of speech is the union of several tags)."""

    def __init__(self, weights: Mapping[str, Mapping[str, float]], lexicon: Mapping[str, str]) -> None:
        self.weights = weights
        self.lexicon = lexicon
        self.classes = tuple(sorted({cls for per_class in weights.values() for cls in per_class})) or ("NN",)

    def predict(self, feats: Iterable[str]) -> str:
        totals = dict.fromkeys(self.classes, 0.0)
        for f in feats:
            for cls, w in self.weights.get(f, {}).items():
                totals[cls] += w
        return max(self.classes, key=lambda c: totals[c])

    def tag(self, tokens: Sequence[str]) -> list[str]:
        """WordNet part of speech per token: the model's for sensitive tokens, noun for the others."""
        return [
            coarse(self.predict(features(tokens, i, self.lexicon))) if is_sensitive(t) else "n"
            for i, t in enumerate(tokens)
        ]


def build_lexicon(sentences: Sequence[tuple[Sequence[str], Sequence[str]]], min_count: int = 3) -> dict[str, str]:
    """Most frequent Penn tag of every word seen at least `min_count` times (ties: alphabetical tag)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for tokens, tags in sentences:
        for tok, tag in zip(tokens, tags):
            counts[tok][tag] += 1
    return {
        w: min(c, key=lambda t: (-c[t], t)) for w, c in counts.items() if sum(c.values()) >= min_count
    }


def _slot(token: str) -> str:
    # Substitutes keep the inflection of the word they replace, so the sentence stays plausible.
    return next((s for s in ("ing", "ed", "s") if token.endswith(s)), "")


def augment(
    sentences: Sequence[tuple[Sequence[str], Sequence[str]]],
    tag_tokens: Callable[[Sequence[str]], list[str]],
    per_sentence: int = 4,
    substitutes: int = 6,
    seed: int = 0,
) -> list[tuple[list[str], int, str]]:
    """More labelled contexts: put other sensitive words of the fitting sentences into their noun, verb and
    adjective slots and let the reference tagger (`tag_tokens`, e.g. NLTK's) tag them.

    Returns ``(tokens, position, penn_tag)`` triples. The tagger sees a window of the sentence (8 tokens before,
    2 after), which is what its decision at the position depends on in practice."""
    rng = random.Random(seed)
    words: dict[str, list[str]] = defaultdict(list)
    for tokens, _ in sentences:
        for tok in tokens:
            if is_sensitive(tok) and tok not in words[_slot(tok)]:
                words[_slot(tok)].append(tok)
    out = []
    for tokens, tags in sentences:
        slots = [i for i, (tok, tag) in enumerate(zip(tokens, tags)) if tok.isalpha() and tag[:1] in "NVJ"]
        for i in rng.sample(slots, min(per_sentence, len(slots))):
            pool = words.get(_slot(tokens[i])) or []
            for word in rng.sample(pool, min(substitutes, len(pool))):
                new = [*tokens[:i], word, *tokens[i + 1 :]]
                start = max(0, i - 8)
                out.append((new, i, tag_tokens(new[start : i + 3])[i - start]))
    return out


def train(
    sentences: Sequence[tuple[Sequence[str], Sequence[str]]],
    iterations: int = 8,
    seed: int = 0,
    min_weight: float = 0.05,
    extra: Sequence[tuple[Sequence[str], int, str]] = (),
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Averaged perceptron on ``(tokens, penn_tags)`` pairs (and `extra` ``(tokens, position, tag)`` examples
    from `augment`), learning the sensitive tokens' Penn tags. Returns ``(weights, lexicon)``;
    deterministic for a seed; averaged weights below `min_weight` in magnitude are dropped."""
    lexicon = build_lexicon(sentences)
    examples = [
        (features(tokens, i, lexicon), tag)
        for tokens, tags in sentences
        for i, (tok, tag) in enumerate(zip(tokens, tags))
        if is_sensitive(tok)
    ]
    examples += [(features(tokens, i, lexicon), tag) for tokens, i, tag in extra]
    weights: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    totals: dict[tuple[str, str], float] = defaultdict(float)
    stamps: dict[tuple[str, str], int] = defaultdict(int)
    step = 0
    rng = random.Random(seed)
    model = PosModel(weights, lexicon)
    model.classes = tuple(sorted({truth for _, truth in examples}))
    for _ in range(iterations):
        rng.shuffle(examples)
        for feats, truth in examples:
            step += 1
            guess = model.predict(feats)
            if guess == truth:
                continue
            for f in feats:
                for cls, delta in ((truth, 1.0), (guess, -1.0)):
                    key = (f, cls)
                    # Lazy averaging: add the weight's value for the steps since it last changed.
                    totals[key] += (step - stamps[key]) * weights[f][cls]
                    stamps[key] = step
                    weights[f][cls] += delta
    averaged: dict[str, dict[str, float]] = {}
    for f, per_class in weights.items():
        for cls, w in per_class.items():
            key = (f, cls)
            avg = (totals[key] + (step - stamps[key]) * w) / max(step, 1)
            if abs(avg) >= min_weight:
                averaged.setdefault(f, {})[cls] = round(avg, 3)
    return averaged, lexicon


def reference_tags(captions: Iterable[str]) -> list[tuple[list[str], list[str]]]:
    """``(tokens, penn_tags)`` of each caption as the exact (NLTK) normaliser tags it; needs NLTK's data."""
    from vlmscope.eval.nltk_backend import nltk_normaliser

    tagged = nltk_normaliser().tagged  # type: ignore[attr-defined]
    return [tagged(c) for c in captions]


@lru_cache(maxsize=1)
def load_model() -> PosModel:
    """The shipped model (``vlmscope/data/builtin_pos_model.json.gz``)."""
    import gzip
    import json
    from importlib import resources

    with resources.files("vlmscope").joinpath("data", "builtin_pos_model.json.gz").open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as fh:
            payload = json.load(fh)
    return PosModel(payload["weights"], payload["lexicon"])
