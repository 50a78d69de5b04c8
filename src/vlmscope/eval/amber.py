"""AMBER (Wang et al. 2023, junyangwang0410/AMBER): its generative and discriminative scores, as its
``inference.py`` computes them.

The official annotation and query files ship in ``vlmscope/data/amber`` (Apache-2.0; no images). A response
file is the reference's: a JSON list of ``{"id", "response"}``, ``id`` indexing the annotations (1–1004
descriptions, 1005–15220 yes/no questions).

Generative (CHAIR, Cover, Hal, Cog): nouns come from NLTK's ``word_tokenize`` → ``pos_tag`` → tags ``NN*`` →
WordNet noun lemma, on the text as written (AMBER does not lower-case; `vlmscope.eval.nltk_backend`), and only
the words of ``relation.json`` are kept. Per kept noun, in the reference's order: a global safe word is never
a hallucination; an exact match with a truth object or one of its association words covers that object; an
exact match with a hallucination target (or its association words) marks it as mentioned and *falls
through*; then, if the similarity step runs, the first hallucination word with similarity > 0.8 is marked
and the first truth word with similarity > 0.8 covers its object; a noun nothing covered is a hallucination.

The similarity step is the reference's spaCy ``en_core_web_lg`` ``Doc.similarity``. It runs when spaCy and
that model are installed (each word's Doc is built once, which gives the same numbers), or from a table of
word-pair similarities; otherwise it is skipped and the metrics say so (``similarity``) — exact matching only,
which raises CHAIR and Hal and lowers Cover and Cog.

Discriminative: the reference counts only the exact strings ``"Yes"`` and ``"No"``; the positive class is
"No"; P, R and F1 come from the counters the reference keeps (starting at 0.001) and F1 from the rounded
percentages, with the reference's epsilons. `PARSERS` adds the common lenient readings; the parser is always
recorded. Figures are rounded to one decimal as the reference prints them; AMBER Score = (100 − CHAIR + F1)/2.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

__all__ = [
    "GROUPS",
    "PARSERS",
    "SIMILARITY_THRESHOLD",
    "TASKS",
    "AmberData",
    "AmberResult",
    "Similarity",
    "amber_intervals",
    "amber_queries",
    "amber_scores",
    "load_amber_data",
    "load_responses",
    "parse_answer",
    "resolve_similarity",
]

SIMILARITY_THRESHOLD = 0.8
SPACY_MODEL = "en_core_web_lg"
NOUNS_NLTK = "nltk word_tokenize + pos_tag NN* + WordNet noun lemma, not lower-cased"
NOT_INSTALLED = f"skipped (spaCy {SPACY_MODEL} not installed)"
# Task → the official query files it asks (the per-task files: query_all.json differs from them at id 13193,
# where it asks about "computer" while the annotation's hallucination target and the task file say "chair").
QUERY_FILES = {
    "generative": ("query_generative.json.gz",),
    "existence": ("query_discriminative-existence.json.gz",),
    "attribute": ("query_discriminative-attribute.json.gz",),
    "relation": ("query_discriminative-relation.json.gz",),
}
TASKS = ("all", "generative", "discriminative", "existence", "attribute", "relation")
DISCRIMINATIVE_TASKS = ("existence", "attribute", "relation")
# Annotation type → (group, the reference's counter prefix). Anything else falls into relation, as there.
TYPE_GROUP = {
    "discriminative-attribute-state": ("state", "as_qa"),
    "discriminative-attribute-number": ("number", "an_qa"),
    "discriminative-attribute-action": ("action", "aa_qa"),
    "discriminative-hallucination": ("existence", "ha_qa"),
}
GROUPS = ("existence", "attribute", "state", "number", "action", "relation")


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class AmberData:
    """The official AMBER files: annotations (``annotations[i]["id"] == i + 1``), word associations, global
    safe words and the reference's counter start values (metrics.txt)."""

    annotations: tuple[Mapping[str, Any], ...]
    association: Mapping[str, tuple[str, ...]]
    safe_words: frozenset[str]
    start_values: Mapping[str, float]

    @property
    def vocabulary(self) -> frozenset[str]:
        """The words a noun must be to count: relation.json's keys and their association words."""
        return frozenset(w for key, words in self.association.items() for w in (key, *words))

    def annotation(self, item_id: int) -> Mapping[str, Any]:
        if not 1 <= item_id <= len(self.annotations):
            raise InputError(f"AMBER id {item_id} is out of range 1..{len(self.annotations)}; use the official ids")
        return self.annotations[item_id - 1]


def _data_path(name: str) -> Any:
    return resources.files("vlmscope").joinpath("data", "amber", name)


def _read_json(name: str) -> Any:
    raw = _data_path(name).read_bytes()
    return json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)


def _number(text: str) -> float:
    return float(text) if "." in text else int(text)


@lru_cache(maxsize=1)
def load_amber_data() -> AmberData:
    """The shipped official files (read once)."""
    annotations = tuple(_read_json("annotations.json.gz"))
    association = {k: tuple(v) for k, v in _read_json("relation.json").items()}
    # safe_words.txt has no trailing newline; the reference keeps every line as written.
    safe = frozenset(_data_path("safe_words.txt").read_text(encoding="utf-8").split("\n"))
    start: dict[str, float] = {}
    for line in _data_path("metrics.txt").read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("=")
        if len(parts) == 2:
            start[parts[0].strip()] = _number(parts[1].strip())
    return AmberData(annotations, association, safe, start)


def amber_queries(task: str = "all") -> list[dict[str, Any]]:
    """The official queries ``{"id", "image", "query"}`` of a task, in id order."""
    if task not in TASKS:
        raise InputError(f"unknown AMBER task {task!r}; use one of {', '.join(TASKS)}")
    names = {"all": ("generative", *DISCRIMINATIVE_TASKS), "discriminative": DISCRIMINATIVE_TASKS}.get(task, (task,))
    rows = [q for name in names for f in QUERY_FILES[name] for q in _read_json(f)]
    return sorted(rows, key=lambda q: q["id"])


def task_of(annotation_type: str) -> str:
    """The task an annotation type belongs to."""
    if annotation_type == "generative":
        return "generative"
    group = TYPE_GROUP.get(annotation_type, ("relation",))[0]
    return "attribute" if group in ("state", "number", "action") else group


def load_responses(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A response file in the reference's format (JSON list of ``{"id", "response"}``); JSON lines also work."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"responses file not found: {p}; pass a JSON list of {{\"id\", \"response\"}}")
    text = p.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            data = json.loads(text)
        else:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: invalid JSON at line {exc.lineno}: {exc.msg}; fix the file") from None
    return _check_responses(data, str(p))


def _check_responses(data: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(data, list) or not data:
        raise InputError(f"{where}: expected a non-empty JSON list of {{\"id\", \"response\"}} records")
    n = len(load_amber_data().annotations)
    seen: set[int] = set()
    out = []
    for pos, rec in enumerate(data, 1):
        if not isinstance(rec, Mapping) or "id" not in rec or "response" not in rec:
            raise InputError(f"{where}: record {pos} lacks 'id' or 'response'; give every record both")
        item_id, response = rec["id"], rec["response"]
        if isinstance(item_id, bool) or not isinstance(item_id, int) or not 1 <= item_id <= n:
            raise InputError(f"{where}: record {pos} has id {item_id!r}; ids are integers 1..{n}")
        if not isinstance(response, str):
            raise InputError(f"{where}: record {pos} (id {item_id}) has a non-string response; write the text")
        if item_id in seen:
            raise InputError(f"{where}: id {item_id} is answered twice (again in record {pos}); keep one response")
        seen.add(item_id)
        out.append({"id": item_id, "response": response})
    return out


# ---------------------------------------------------------------------------------------------------------
# Discriminative answer parsing: "Yes", "No" or None (neither; counts as wrong and as no "No" answer).


def _parse_reference(response: str) -> str | None:
    return response if response in ("Yes", "No") else None


def _parse_lenient(response: str) -> str | None:
    # lmms-eval amber_g: substring "yes" first, then "no" (which also matches "not", "cannot", "know").
    text = response.lower()
    return "Yes" if "yes" in text else "No" if "no" in text else None


def _parse_halva(response: str) -> str | None:
    # pritamqu/HALVA's loader: "Yes" if "yes" occurs in the lower-cased output, otherwise "No".
    return "Yes" if "yes" in response.lower() else "No"


PARSERS: dict[str, Callable[[str], str | None]] = {
    "reference": _parse_reference,
    "lenient": _parse_lenient,
    "halva": _parse_halva,
}


def parse_answer(response: str, parser: str = "reference") -> str | None:
    """``"Yes"``, ``"No"`` or None under one of `PARSERS`."""
    if parser not in PARSERS:
        raise InputError(f"unknown AMBER parser {parser!r}; use one of {', '.join(PARSERS)}")
    return PARSERS[parser](response)


# ---------------------------------------------------------------------------------------------------------
# The similarity step


class Similarity:
    """Word-pair similarity for the reference's step (d)/(e); `describe` goes into the metrics."""

    def __call__(self, word1: str, word2: str) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class TableSimilarity(Similarity):
    """Similarities from a table of word pairs (symmetric; a pair not in it: 0.0)."""

    def __init__(self, pairs: Iterable[Sequence[Any]], source: str = "table") -> None:
        self.table: dict[tuple[str, str], float] = {}
        for pair in pairs:
            if len(pair) != 3 or not all(isinstance(w, str) for w in pair[:2]):
                raise InputError(f"similarity table entry {list(pair)!r} is not [word1, word2, similarity]")
            self.table[(pair[0], pair[1])] = self.table[(pair[1], pair[0])] = float(pair[2])
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TableSimilarity:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"similarity table not found: {p}; pass a JSON list of [word1, word2, similarity]")
        raw = p.read_bytes()
        try:
            pairs = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: invalid JSON ({exc.msg}); pass a list of [word1, word2, similarity]") from None
        if not isinstance(pairs, list):
            raise InputError(f"{p}: expected a JSON list of [word1, word2, similarity]")
        return cls(pairs, f"table {p.name} sha256:{hashlib.sha256(raw).hexdigest()[:16]}")

    def __call__(self, word1: str, word2: str) -> float:
        return self.table.get((word1, word2), 0.0)

    def describe(self) -> str:
        return self.source


class SpacySimilarity(Similarity):
    """spaCy's ``nlp(w1).similarity(nlp(w2))`` as the reference calls it, each word's Doc built once."""

    def __init__(self, model: str = SPACY_MODEL) -> None:
        import spacy

        self.nlp = spacy.load(model)
        self.model = model
        self.version = getattr(spacy, "__version__", "?")
        self._docs: dict[str, Any] = {}
        self._pairs: dict[tuple[str, str], float] = {}

    def _doc(self, word: str) -> Any:
        doc = self._docs.get(word)
        if doc is None:
            doc = self._docs[word] = self.nlp(word)
        return doc

    def __call__(self, word1: str, word2: str) -> float:
        key = (word1, word2)
        if key not in self._pairs:
            import warnings

            with warnings.catch_warnings():  # W008 (a word without a vector), hidden by the reference too
                warnings.simplefilter("ignore", UserWarning)
                self._pairs[key] = float(self._doc(word1).similarity(self._doc(word2)))
        return self._pairs[key]

    def describe(self) -> str:
        return f"spaCy {self.version} {self.model}"


def spacy_available(model: str = SPACY_MODEL) -> bool:
    import importlib.util

    return importlib.util.find_spec("spacy") is not None and importlib.util.find_spec(model) is not None


@lru_cache(maxsize=1)
def _spacy_similarity() -> SpacySimilarity:
    # One loaded model (and one cache of Docs and pairs) per process: the checks before a run and its scoring.
    return SpacySimilarity()


def resolve_similarity(similarity: str | Similarity | None = "auto") -> Similarity | None:
    """``"auto"`` (spaCy's en_core_web_lg if installed, else none), ``"spacy"`` (required), ``"skip"``, a path to
    a JSON table, or a `Similarity`. None means the step is skipped."""
    if similarity is None or isinstance(similarity, Similarity):
        return similarity
    if similarity == "skip":
        return None
    if similarity in ("auto", "spacy"):
        if spacy_available():
            return _spacy_similarity()
        if similarity == "spacy":
            raise InputError(f"--amber-similarity spacy needs spaCy and {SPACY_MODEL}: pip install spacy && "
                             f"python -m spacy download {SPACY_MODEL} (or use --amber-similarity skip)")
        return None
    return TableSimilarity.from_file(similarity)


def similarity_note(similarity: str | Similarity | None, resolved: Similarity | None,
                    threshold: float = SIMILARITY_THRESHOLD) -> str:
    """What the metrics record under ``similarity``: never a step that did not run."""
    if resolved is not None:
        return f"{resolved.describe()} (> {threshold})"
    if similarity is None or similarity == "skip":
        return "skipped (--amber-similarity skip)"
    return NOT_INSTALLED


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _round1(x: float) -> float:
    return round(x, 1)


def _f1(precision: float, recall: float, eps: float) -> float:
    # The reference's F1: from the rounded percentages, with an epsilon in the denominator.
    return _round1(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps) * 100)


@dataclass
class AmberResult:
    """Metrics (rounded as the reference prints them), the reference's raw counters and per-item details."""

    metrics: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    counters: dict[str, float]
    settings: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "groups": self.groups, "counters": self.counters,
                "settings": self.settings, "items": self.items}


def _nouns_fn() -> Callable[[str], list[str]]:
    from vlmscope.eval.nltk_backend import SETUP_HINT, nltk_normaliser, nltk_status

    status = nltk_status()
    if not status.available:
        raise InputError(f"AMBER's nouns need NLTK's {', '.join(status.missing)}; {SETUP_HINT}")
    return nltk_normaliser().nouns_cased  # type: ignore[attr-defined]


def _first_exact(cands: list[tuple[str, int]], noun: str) -> int | None:
    return next((i for w, i in cands if w == noun), None)


def _first_similar(cands: list[tuple[str, int]], noun: str, similar: Similarity, threshold: float) -> int | None:
    return next((i for w, i in cands if similar(noun, w) > threshold), None)


def _describe(nouns: list[str], truth: Sequence[str], hallu: Sequence[str], data: AmberData,
              similar: Similarity | None, threshold: float) -> dict[str, Any]:
    """One description against its annotation, step by step as the reference decides."""
    vocabulary = data.vocabulary
    kept = [n for n in nouns if n in vocabulary]
    # (word, object position): every object's association words in object order, then the objects themselves.
    safe = [(w, i) for i, obj in enumerate(truth) for w in data.association[obj]] + [(o, i) for i, o in enumerate(truth)]
    risky = [(w, i) for i, obj in enumerate(hallu) for w in data.association[obj]] + [(o, i) for i, o in enumerate(hallu)]
    covered: set[int] = set()
    mentioned: set[int] = set()
    hallucinated: list[str] = []

    for noun in kept:
        if noun in data.safe_words:
            continue
        hit = _first_exact(safe, noun)
        if hit is not None:
            covered.add(hit)
            continue
        hit = _first_exact(risky, noun)
        if hit is not None:
            mentioned.add(hit)  # and fall through, as the reference does
        if similar is not None:
            hit = _first_similar(risky, noun, similar, threshold)
            if hit is not None:
                mentioned.add(hit)
            hit = _first_similar(safe, noun, similar, threshold)
            if hit is not None:
                covered.add(hit)
                continue
        hallucinated.append(noun)
    return {"nouns": kept, "hallucinated": hallucinated,
            "covered": [truth[i] for i in sorted(covered)], "mentioned_hallu": [hallu[i] for i in sorted(mentioned)],
            "n_truth": len(truth), "n_hallu": len(hallu)}


def _discriminative_block(c: Mapping[str, float], prefixes: Sequence[str], eps: float) -> dict[str, float]:
    def total(name: str) -> float:
        # Summed in the reference's order (state, number, action): the 0.001 starts make order matter.
        value: float = 0
        for k, p in enumerate(prefixes):
            value = c[f"{p}_{name}"] if k == 0 else value + c[f"{p}_{name}"]
        return value

    precision = _round1(total("ans_no_score") / total("ans_no_num") * 100)
    recall = _round1(total("no_score") / total("no_num") * 100)
    return {"Accuracy": _round1(total("correct_score") / total("correct_num") * 100),
            "Precision": precision, "Recall": recall, "F1": _f1(precision, recall, eps)}


def _answer_stats(answers: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(answers)
    yes = sum(a["parsed"] == "Yes" for a in answers)
    no = sum(a["parsed"] == "No" for a in answers)
    degenerate = None
    if n and yes + no == 0:
        degenerate = "no answer parsed as Yes or No"
    elif n and no == n:
        degenerate = "always No"
    elif n and yes == n:
        degenerate = "always Yes"
    elif n and no == yes + no:
        degenerate = "never Yes"
    elif n and yes == yes + no:
        degenerate = "never No"
    return {"n": n, "Yes_ratio": 100 * yes / n if n else None, "No_ratio": 100 * no / n if n else None,
            "unparsed": n - yes - no, "degenerate": degenerate}


def amber_scores(responses: Iterable[Mapping[str, Any]], task: str = "all", parser: str = "reference",
                 similarity: str | Similarity | None = "auto", threshold: float = SIMILARITY_THRESHOLD,
                 nouns: Callable[[str], list[str]] | None = None) -> AmberResult:
    """AMBER's scores of `responses` (``{"id", "response"}``) as the reference ``inference.py`` computes them.

    Every response is scored whatever its type, as there; `task` picks the blocks reported (`TASKS`;
    a block without any response is None). `similarity`: see `resolve_similarity`. `nouns`: the noun
    extractor (default: NLTK's exact path, which needs its tagger and WordNet).
    """
    if task not in TASKS:
        raise InputError(f"unknown AMBER task {task!r}; use one of {', '.join(TASKS)}")
    if parser not in PARSERS:
        raise InputError(f"unknown AMBER parser {parser!r}; use one of {', '.join(PARSERS)}")
    rows = _check_responses(list(responses), "responses")
    data = load_amber_data()
    has_generative = any(data.annotation(r["id"])["type"] == "generative" for r in rows)
    similar = resolve_similarity(similarity) if has_generative else None
    extract = (nouns or _nouns_fn()) if has_generative else None
    parse = PARSERS[parser]
    c: dict[str, float] = dict(data.start_values)
    items: list[dict[str, Any]] = []
    n_generative = 0
    empty = 0
    by_group: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUPS}
    for row in rows:
        ann = data.annotation(row["id"])
        response = row["response"]
        if ann["type"] == "generative":
            n_generative += 1
            empty += not response.strip()
            d = _describe(extract(response), ann["truth"], ann["hallu"], data, similar, threshold)  # type: ignore[misc]
            c["chair_score"] += len(d["hallucinated"])
            c["chair_num"] += len(d["nouns"])
            c["safe_cover_score"] += len(d["covered"])
            c["safe_cover_num"] += d["n_truth"]
            c["hallu_cover_score"] += len(d["mentioned_hallu"])
            c["hallu_cover_num"] += d["n_hallu"]
            if not d["hallucinated"]:
                c["non_hallu_score"] += 1
            c["non_hallu_num"] += 1
            items.append({"id": row["id"], "type": "generative", **d})
            continue
        group, prefix = TYPE_GROUP.get(ann["type"], ("relation", "asso_qa"))
        truth = ann["truth"]
        parsed = parse(response)
        correct = (parsed == "Yes") if truth == "yes" else (parsed == "No")
        for p in ("qa", prefix):
            c[f"{p}_correct_num"] += 1
            if correct:
                c[f"{p}_correct_score"] += 1
            if truth != "yes":
                c[f"{p}_no_num"] += 1
                if correct:
                    c[f"{p}_no_score"] += 1
            if parsed == "No":
                c[f"{p}_ans_no_num"] += 1
                if truth == "no":
                    c[f"{p}_ans_no_score"] += 1
        item = {"id": row["id"], "type": ann["type"], "truth": truth, "response": response, "parsed": parsed,
                "correct": correct}
        items.append(item)
        by_group[group].append(item)
        if group in ("state", "number", "action"):
            by_group["attribute"].append(item)

    groups: dict[str, dict[str, Any]] = {}
    metrics: dict[str, Any] = {}
    want_g = task in ("all", "generative")
    want = {g for g in GROUPS if task in ("all", "discriminative", g)
            or (task == "attribute" and g in ("state", "number", "action"))}
    if want_g:
        gen = {"CHAIR": None, "Cover": None, "Hal": None, "Cog": None}
        if n_generative:
            gen = {"CHAIR": _round1(c["chair_score"] / c["chair_num"] * 100),
                   "Cover": _round1(c["safe_cover_score"] / c["safe_cover_num"] * 100),
                   "Hal": _round1(100 - c["non_hallu_score"] / c["non_hallu_num"] * 100),
                   "Cog": _round1(c["hallu_cover_score"] / c["hallu_cover_num"] * 100)}
        groups["generative"] = {**gen, "n": n_generative, "empty": empty}
        metrics.update(gen)
    disc_items = [it for it in items if it["type"] != "generative"]
    if task in ("all", "discriminative"):
        block = _discriminative_block(c, ("qa",), 0.0001) if disc_items else dict.fromkeys(("Accuracy", "Precision", "Recall", "F1"))
        groups["discriminative"] = {**block, **_answer_stats(disc_items)}
        metrics.update(block)
        metrics["Yes_ratio"] = groups["discriminative"]["Yes_ratio"]
    prefixes = {"existence": ("ha_qa",), "attribute": ("as_qa", "an_qa", "aa_qa"), "state": ("as_qa",),
                "number": ("an_qa",), "action": ("aa_qa",), "relation": ("asso_qa",)}
    for g in GROUPS:
        if g not in want:
            continue
        eps = 0.001 if g == "existence" else 0.0001
        block = _discriminative_block(c, prefixes[g], eps) if by_group[g] else dict.fromkeys(("Accuracy", "Precision", "Recall", "F1"))
        groups[g] = {**block, **_answer_stats(by_group[g])}
        for k in ("Accuracy", "F1") if g in ("state", "number", "action") else ("Accuracy", "Precision", "Recall", "F1"):
            metrics[f"{g}/{k}"] = block[k]
        metrics[f"{g}/Yes_ratio"] = groups[g]["Yes_ratio"]
    if task == "all":
        chair, f1 = metrics.get("CHAIR"), metrics.get("F1")
        metrics["AMBER_Score"] = None if chair is None or f1 is None else round((100 - chair + f1) / 2, 2)
    degenerate = {g: b["degenerate"] for g, b in groups.items() if b.get("degenerate")}
    unparsed = sum(it.get("parsed") is None for it in disc_items)
    settings = {"task": task, "parser": parser, "threshold": threshold,
                "similarity": similarity_note(similarity, similar, threshold) if has_generative else None,
                "nouns": None if extract is None else NOUNS_NLTK if nouns is None else "custom",
                "degenerate": degenerate or None, "unparsed": unparsed}
    return AmberResult(metrics, groups, dict(c), settings, items)


# ---------------------------------------------------------------------------------------------------------
# Bootstrap intervals (vlmscope.eval.stats): images resampled, each with its description and its questions.


@lru_cache(maxsize=1)
def _image_of() -> dict[int, str]:
    return {q["id"]: q["image"] for q in amber_queries("all")}


def amber_intervals(result: AmberResult, draws: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """95 % percentile intervals of the headline metrics, AMBER images resampled (all of an image's items move
    together). The replicates use the plain pooled ratios (no 0.001 starts, no rounding), so an interval's
    ``value`` can differ from the reported figure in the last decimal."""
    import numpy as np

    from vlmscope.eval.stats import _f1, _ratio, bootstrap_intervals, group_counts

    if not result.items:
        return {}
    names = ("hallucinated", "nouns", "covered", "truth", "mentioned", "hallu", "clean", "descriptions",
             "correct", "questions", "correct_no", "truth_no", "answered_no")
    rows = []
    for it in result.items:
        if it["type"] == "generative":
            rows.append((len(it["hallucinated"]), len(it["nouns"]), len(it["covered"]), it["n_truth"],
                         len(it["mentioned_hallu"]), it["n_hallu"], int(not it["hallucinated"]), 1, 0, 0, 0, 0, 0))
        else:
            is_no = it["truth"] != "yes"
            rows.append((0, 0, 0, 0, 0, 0, 0, 0, int(it["correct"]), 1, int(is_no and it["correct"]), int(is_no),
                         int(it["parsed"] == "No")))
    columns = {name: np.asarray([r[k] for r in rows], dtype=float) for k, name in enumerate(names)}
    _, counts = group_counts([_image_of()[it["id"]] for it in result.items], columns)

    def precision(c: Mapping[str, Any]) -> Any:
        return _ratio(c["correct_no"], c["answered_no"])

    def recall(c: Mapping[str, Any]) -> Any:
        return _ratio(c["correct_no"], c["truth_no"])

    fns: dict[str, Callable[[Mapping[str, Any]], Any]] = {}
    if result.metrics.get("CHAIR") is not None:
        fns.update({"CHAIR": lambda c: _ratio(c["hallucinated"], c["nouns"]),
                    "Cover": lambda c: _ratio(c["covered"], c["truth"]),
                    "Hal": lambda c: 100 - _ratio(c["clean"], c["descriptions"]),
                    "Cog": lambda c: _ratio(c["mentioned"], c["hallu"])})
    if result.metrics.get("F1") is not None:
        fns.update({"Accuracy": lambda c: _ratio(c["correct"], c["questions"]), "Precision": precision,
                    "Recall": recall, "F1": lambda c: _f1(precision(c), recall(c))})
    if result.metrics.get("AMBER_Score") is not None:
        fns["AMBER_Score"] = lambda c: (100 - _ratio(c["hallucinated"], c["nouns"]) + _f1(precision(c), recall(c))) / 2
    return bootstrap_intervals(counts, fns, draws, seed, level) if fns else {}


# ---------------------------------------------------------------------------------------------------------
# Runs: `vlmscope eval amber` (folders: vlmscope.eval.runs) and `vlmscope amber score`

AnswerFn = Callable[[list[tuple[str, str]]], Sequence[str]]
HEADLINE = ("CHAIR", "Cover", "Hal", "Cog", "Accuracy", "Precision", "Recall", "F1", "Yes_ratio", "AMBER_Score")


def select_queries(task: str = "all", num_images: int | None = None) -> list[dict[str, Any]]:
    """The official queries of `task`, restricted to its first `num_images` images (in id order) if given."""
    queries = amber_queries(task)
    if num_images is None:
        return queries
    images: list[str] = []
    for q in queries:
        if q["image"] not in images:
            images.append(q["image"])
    keep = set(images[:num_images])
    return [q for q in queries if q["image"] in keep]


def check_images(queries: Sequence[Mapping[str, Any]], image_root: str | os.PathLike[str]) -> None:
    """`InputError` unless every query's image (``AMBER_<id>.jpg``) is in `image_root`."""
    root = Path(image_root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}; pass the folder of AMBER_<id>.jpg images as --data-path")
    missing = sorted({q["image"] for q in queries if not (root / q["image"]).is_file()},
                     key=lambda name: (len(name), name))
    if missing:
        raise InputError(f"{len(missing)} AMBER images are not in {root} (first: {missing[0]}); check --data-path")


def check_scoring(queries: Sequence[Mapping[str, Any]], similarity: str) -> None:
    """Refuse, before any model loads, a scoring that cannot run (NLTK data, spaCy, a similarity table)."""
    if any(q["id"] <= 1004 for q in queries):
        _nouns_fn()
        resolve_similarity(similarity)


def answer_amber(queries: Sequence[Mapping[str, Any]], answer_fns: Mapping[str, AnswerFn], store: Any,
                 batch_size: int, image_root: str | os.PathLike[str], progress: bool = True,
                 desc: str = "amber") -> None:
    """Answer every query not yet in `store` (keyed by ``id``), one stored batch at a time; descriptions and
    yes/no questions go to ``answer_fns["generative"]`` / ``["discriminative"]`` (their token limits differ)."""
    from tqdm import tqdm

    root = Path(image_root)
    pending = [q for q in queries if q["id"] not in store]
    with tqdm(total=len(queries), initial=len(queries) - len(pending), desc=desc, unit="item",
              disable=not progress, dynamic_ncols=True) as bar:
        for kind in ("generative", "discriminative"):
            todo = [q for q in pending if (q["id"] <= 1004) == (kind == "generative")]
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                answers = list(answer_fns[kind]([(str(root / q["image"]), q["query"]) for q in batch]))
                if len(answers) != len(batch):
                    raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} queries")
                store.append({"id": q["id"], "image": q["image"], "query": q["query"], "response": str(a)}
                             for q, a in zip(batch, answers))
                bar.update(len(batch))


def score_amber(ids: Sequence[int], results_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                settings: Mapping[str, Any], task: str = "all", parser: str = "reference",
                similarity: str | Similarity | None = "auto", bootstrap: int = 1000,
                bootstrap_seed: int = 0) -> dict[str, Any]:
    """AMBER scores of the stored responses of `ids`; writes ``metrics.json``, ``metrics.md`` and
    ``amber_details.json`` (per item: nouns, hallucinations, covered objects; parsed answers). Returns the payload."""
    from vlmscope.eval.runner import write_metrics
    from vlmscope.eval.store import ResultStore

    store = ResultStore(results_path, key="id")
    stored = {row["id"]: row for row in store.rows()}
    missing = [i for i in ids if i not in stored]
    if missing:
        raise InputError(f"{len(missing)} queries have no response in {store.path} (first: {missing[0]}); "
                         "run the answering first")
    result = amber_scores([{"id": i, "response": stored[i]["response"]} for i in ids], task, parser, similarity)
    payload = amber_payload(result, settings, store.path.name, bootstrap, bootstrap_seed)
    out = Path(out_dir)
    write_metrics(out, payload)
    tmp = out / "amber_details.json.tmp"
    tmp.write_text(json.dumps({"settings": result.settings, "items": result.items}, indent=1, ensure_ascii=False)
                   + "\n", encoding="utf-8")
    os.replace(tmp, out / "amber_details.json")
    return payload


def amber_payload(result: AmberResult, settings: Mapping[str, Any] | None = None, results_file: str | None = None,
                  bootstrap: int = 0, bootstrap_seed: int = 0) -> dict[str, Any]:
    """The ``metrics.json`` payload of a scoring (with `bootstrap` draws of intervals, none if 0)."""
    from vlmscope.eval.runner import _intervals

    if bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {bootstrap}")
    metrics = {k: result.metrics[k] for k in (*HEADLINE, *result.metrics) if k in result.metrics}
    intervals = amber_intervals(result, bootstrap, bootstrap_seed) if bootstrap else {}
    return {"task": "amber", "metrics": metrics, **_intervals(intervals), "groups": result.groups,
            "scoring": result.settings, "settings": {**result.settings, **(settings or {})},
            "results_file": results_file, "n_items": len(result.items)}


def summary_line(result_settings: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """One line of the headline figures and how they were scored."""
    parts = [f"{k} {metrics[k]:.1f}" if isinstance(metrics[k], float) else f"{k} -"
             for k in HEADLINE if k in metrics and k != "Yes_ratio"]
    notes = [f"parser {result_settings['parser']}"]
    if result_settings.get("similarity"):
        notes.append(f"similarity {result_settings['similarity']}")
    degenerate = result_settings.get("degenerate") or {}
    if degenerate:  # the overall verdict when there is one, else the groups'
        shown = {"discriminative": degenerate["discriminative"]} if "discriminative" in degenerate else degenerate
        notes.append("DEGENERATE: " + ", ".join(f"{g} {v}" for g, v in shown.items()))
    if result_settings.get("unparsed"):
        hint = "; --amber-parser lenient reads yes/no substrings" if result_settings["parser"] == "reference" else ""
        notes.append(f"{result_settings['unparsed']} answers neither 'Yes' nor 'No' (counted wrong{hint})")
    return "AMBER  " + "  ".join(parts) + "  (" + "; ".join(notes) + ")"
