"""CHAIR (Rohrbach et al., 2018) as implemented by the OPERA / Maxlinn ``chair.py`` that LVLM papers use.

Pipeline per caption (reference/chair.md §3): lower-case → tokenise → lemmatise by part of speech → merge
two-word compounds left to right (``baby elephant`` → ``elephant``, ``hot dogs`` → ``hot dog``) → drop every
``seat`` when ``toilet`` also occurs → keep units that are synonym-list entries and map them to their COCO
category ("node word"). Ground truth per image = COCO instance categories ∪ objects mined from the reference
captions with the same pipeline. Metrics are pooled over captions and given in percent.

Text normalisers (``normaliser=``; the name actually used is in every result's ``settings``):
- ``"auto"`` (default): ``"nltk"`` when NLTK's tagger and WordNet are installed (``vlmscope chair setup``),
  otherwise ``"builtin"``, saying so once on stderr (the logging handler) with how to get exact figures.
- ``"nltk"``: the reference pipeline itself (`vlmscope.eval.nltk_backend`): NLTK's tokenizer and averaged-
  perceptron tagger, WordNet lemmas with nltk 3.8.1's morphy. On OPERA's 12 released caption logs it gives the
  reference table (../shared/data/README.md) exactly; `InputError` naming the fix if the data are missing.
- ``"builtin"``: no downloads. Treebank-style tokenisation (`vlmscope.eval.tokenize`; identical tokens to the
  exact normaliser on the 12 logs), WordNet morphy on a bundled WordNet subset (`vlmscope.eval.lemmatize`,
  exact for every word that can matter), and for the few hundred words whose part of speech changes a CHAIR
  mention ("tied", "seated", "stove", plurals the tagger calls adjectives) a small fitted model standing in for
  NLTK's tagger (`vlmscope.eval.postag`). Its residual disagreements are the tagger's context-dependent calls;
  ``benchmarks/bench_chair.py`` measures them on captions of models it was not fitted on.

Synonym list: ``"legacy"`` (default) reproduces the reference exactly, bugs included (entries " motor bike" and
" cheesecake" with a leading space never match, "iPhone" never matches a lower-cased caption, the 3-word
"stove top oven" is never merged, "dining table" is not in the merge list). ``"fixed"`` strips and lower-cases
the entries, merges "stove top oven" as a trigram and "dining table" as a compound.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError
from vlmscope.eval.lemmatize import lemmatize
from vlmscope.eval.tokenize import word_tokenize

__all__ = [
    "METRIC_KEYS",
    "ChairResult",
    "ChairVocabulary",
    "CaptionObjects",
    "build_gt_from_coco",
    "caption_to_objects",
    "chair_scores",
    "NORMALISERS",
    "get_normaliser",
    "normaliser_detail",
    "load_captions",
    "load_gt_objects",
    "load_vocabulary",
    "vocabulary_words",
    "write_gt_cache",
]

METRIC_KEYS = ("CHAIR_S", "CHAIR_I", "Recall", "Len", "Precision", "F1")

# Compounds kept as one unit (the reference's list, duplicates removed; order is irrelevant for a dict).
COMPOUNDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby X"/"adult X" → X so that "baby" and "adult" (synonyms of person) do not fire.
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger X" → X so that "passenger" does not fire person.
VEHICLE_WORDS = ("jet", "train")
# Overrides applied last, as in the reference: "wine glas" only mattered for pattern's singulariser.
SPECIAL_COMPOUNDS = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


def _data_file(name: str) -> Any:
    # vlmscope/data is a plain folder (no __init__), so address it from the package root.
    return resources.files("vlmscope").joinpath("data", name)


def _data_text(name: str) -> str:
    return _data_file(name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class ChairVocabulary:
    """Synonym list and compound rules of one variant."""

    variant: str
    objects: frozenset[str]
    node_of: Mapping[str, str]
    compounds: Mapping[str, str]
    max_ngram: int


def _parse_synonyms(text: str, variant: str) -> list[list[str]]:
    groups = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if variant == "legacy":
            # The reference splits on comma + one space, so "a,  b" yields " b" (never matches).
            groups.append(line.strip().split(", "))
        else:
            groups.append([e.strip().lower() for e in line.split(",") if e.strip()])
    return groups


@lru_cache(maxsize=8)
def load_vocabulary(variant: str = "legacy", synonyms_path: str | None = None) -> ChairVocabulary:
    """Load the synonym list (bundled by default) as ``"legacy"`` (reference-exact) or ``"fixed"``."""
    if variant not in ("legacy", "fixed"):
        raise InputError(f"unknown synonym variant {variant!r}; use 'legacy' or 'fixed'")
    if synonyms_path is None:
        text = _data_text("chair_synonyms.txt")
    else:
        try:
            text = Path(synonyms_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read synonym list {synonyms_path}: {exc.strerror}; pass an existing file") from exc
    objects: set[str] = set()
    node_of: dict[str, str] = {}
    for group in _parse_synonyms(text, variant):
        objects.update(group)
        for entry in group:
            node_of[entry] = group[0]
    compounds = {c: c for c in COMPOUNDS}
    for animal in ANIMAL_WORDS:
        compounds[f"baby {animal}"] = animal
        compounds[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        compounds[f"passenger {vehicle}"] = vehicle
    compounds.update(SPECIAL_COMPOUNDS)
    if variant == "fixed":
        compounds["dining table"] = "dining table"
    # The legacy merge only looks at bigrams, so the trigram entry is dead there.
    max_ngram = 3 if variant == "fixed" else 2
    return ChairVocabulary(variant, frozenset(objects), node_of, compounds, max_ngram)


def vocabulary_words() -> frozenset[str]:
    """Every single word that can matter to CHAIR (object entries and compound parts, both variants)."""
    words: set[str] = set()
    for variant in ("legacy", "fixed"):
        vocab = load_vocabulary(variant)
        for entry in [*vocab.objects, *vocab.compounds, *vocab.compounds.values()]:
            words.update(entry.split())
    return frozenset(words)


# ---------------------------------------------------------------------------------------------------------
# Normalisers: caption → (tokens, lemmas)

Normaliser = Callable[[str], tuple[list[str], list[str]]]

@lru_cache(maxsize=65536)
def _lemma(token: str, pos: str) -> str:
    return lemmatize(token, pos)


def builtin_normaliser(caption: str) -> tuple[list[str], list[str]]:
    """Tokens and lemmas of a caption without NLTK (see the module docstring)."""
    from vlmscope.eval.postag import load_model

    tokens = word_tokenize(caption.lower())
    return tokens, [_lemma(t, pos) for t, pos in zip(tokens, load_model().tag(tokens))]


builtin_normaliser.name = "builtin"  # type: ignore[attr-defined]
builtin_normaliser.detail = "builtin (no NLTK; approximate)"  # type: ignore[attr-defined]


NORMALISERS = ("auto", "nltk", "builtin")


@lru_cache(maxsize=1)
def _announce_fallback(missing: str) -> None:
    # Once per process, on stderr (the CLI's logging handler), so --json output stays pure.
    from vlmscope.eval.nltk_backend import SETUP_HINT

    logging.getLogger("vlmscope").warning(
        "CHAIR: NLTK data not found (%s); using the builtin normaliser (approximate); %s", missing, SETUP_HINT
    )


def get_normaliser(name: str | Normaliser = "auto") -> Normaliser:
    """``"auto"`` (NLTK when its data are installed, else the builtin, saying so once), ``"nltk"`` (the
    reference; `InputError` if its data are missing), ``"builtin"`` (no downloads) or a callable."""
    if callable(name):
        return name
    if name == "builtin":
        return builtin_normaliser
    from vlmscope.eval import nltk_backend

    if name == "nltk":
        return nltk_backend.nltk_normaliser()
    if name == "auto":
        status = nltk_backend.nltk_status()
        if status.available:
            return nltk_backend.nltk_normaliser()
        _announce_fallback(", ".join(status.missing))
        return builtin_normaliser
    raise InputError(f"unknown normaliser {name!r}; use 'auto', 'nltk' or 'builtin'")


def _normaliser_name(norm: Normaliser) -> str:
    return getattr(norm, "name", getattr(norm, "__name__", "custom"))


def normaliser_detail(norm: Normaliser) -> str:
    """What the normaliser is, for result files: e.g. "nltk 3.10.4, perceptron tagger (json), WordNet, ..."."""
    return getattr(norm, "detail", _normaliser_name(norm))


# ---------------------------------------------------------------------------------------------------------
# Caption → object mentions


@dataclass
class CaptionObjects:
    """Object mentions of one caption (the reference's ``caption_to_words`` output)."""

    words: list[str]  # synonym-list entries found, with repetitions
    node_words: list[str]  # their COCO categories
    token_idxs: list[int]  # index in `tokens` where each mention starts
    units: list[str]  # merged units (the reference's "raw words"; Len counts them)
    tokens: list[str]


def caption_to_objects(
    caption: str,
    vocabulary: ChairVocabulary | str = "legacy",
    normaliser: Normaliser | str = "auto",
) -> CaptionObjects:
    """Find the COCO object mentions of one caption."""
    vocab = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
    norm = get_normaliser(normaliser)
    tokens, lemmas = norm(caption)
    # The fixed variant also matches compounds on the surface words, because the tagger sometimes takes
    # a compound's first word for a verb ("dining" → "dine", "parking" → "park").
    sources = (lemmas, tokens) if vocab.variant == "fixed" else (lemmas,)
    units: list[str] = []
    starts: list[int] = []
    i = 0
    while i < len(lemmas):
        for size in range(vocab.max_ngram, 1, -1):
            if i + size > len(lemmas):
                continue
            key = next((k for k in (" ".join(s[i : i + size]) for s in sources) if k in vocab.compounds), None)
            if key is not None:
                units.append(vocab.compounds[key])
                starts.append(i)
                i += size
                break
        else:
            units.append(lemmas[i])
            starts.append(i)
            i += 1
    # "the seat of the toilet" must not fire chair.
    drop_seat = "toilet" in units and "seat" in units
    words, nodes, idxs = [], [], []
    for unit, start in zip(units, starts):
        if drop_seat and unit == "seat":
            continue
        if unit in vocab.objects:
            words.append(unit)
            nodes.append(vocab.node_of[unit])
            idxs.append(start)
    return CaptionObjects(words, nodes, idxs, units, list(tokens))


# ---------------------------------------------------------------------------------------------------------
# Ground truth


def _open_json(path: Path) -> Any:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return json.load(fh)
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise InputError(f"file not found: {path}; check the path") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); pass a JSON file") from exc


def _annotation_files(annotation_dir: Path, kind: str) -> list[Path]:
    found = [annotation_dir / f"{kind}_{split}2014.json" for split in ("train", "val")]
    found = [p for p in found if p.is_file()]
    if not found and kind == "instances":
        # PAI reads the 2017 instance files: same images, re-split, so the union gives the same sets.
        found = [p for p in (annotation_dir / f"instances_{s}2017.json" for s in ("train", "val")) if p.is_file()]
    return found


def build_gt_from_coco(
    annotation_dir: str | os.PathLike[str],
    vocabulary: ChairVocabulary | str = "legacy",
    normaliser: Normaliser | str = "auto",
    image_ids: Iterable[int] | None = None,
    progress: bool = False,
) -> dict[int, frozenset[str]]:
    """Ground-truth objects per image from ``instances_*2014.json`` + ``captions_*2014.json`` in a folder."""
    root = Path(annotation_dir)
    if not root.is_dir():
        raise InputError(f"COCO annotation folder not found: {root}; pass the folder holding instances_val2014.json")
    instance_files = _annotation_files(root, "instances")
    caption_files = _annotation_files(root, "captions")
    if not instance_files or not caption_files:
        raise InputError(
            f"{root} lacks instances_{{train,val}}2014.json or captions_{{train,val}}2014.json; "
            "download the COCO 2014 annotations into it"
        )
    vocab = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
    norm = get_normaliser(normaliser)
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    objects: dict[int, set[str]] = {}
    for path in instance_files:
        data = _open_json(path)
        names = {c["id"]: c["name"] for c in data["categories"]}
        for ann in data["annotations"]:
            imid = ann["image_id"]
            if wanted is None or imid in wanted:
                objects.setdefault(imid, set()).add(vocab.node_of[names[ann["category_id"]]])
    for path in caption_files:
        anns = _open_json(path)["annotations"]
        if progress:
            from tqdm import tqdm

            anns = tqdm(anns, desc=f"mining {path.name}", unit="caption")
        for ann in anns:
            imid = ann["image_id"]
            if wanted is None or imid in wanted:
                found = caption_to_objects(ann["caption"], vocab, norm).node_words
                objects.setdefault(imid, set()).update(found)
    return {k: frozenset(v) for k, v in objects.items()}


def _gt_from_mapping(data: Any, source: str) -> dict[int, frozenset[str]]:
    if not isinstance(data, dict):
        raise InputError(f"{source} is not an {{image_id: [objects]}} JSON object; pass a ground-truth cache file")
    gt = {}
    for key, objs in data.items():
        try:
            imid = int(key)
        except ValueError as exc:
            raise InputError(f"{source}: key {key!r} is not an image id; pass a ground-truth cache file") from exc
        if not isinstance(objs, list):
            raise InputError(f"{source}: objects of image {key} are not a list; pass a ground-truth cache file")
        gt[imid] = frozenset(objs)
    return gt


@lru_cache(maxsize=1)
def _bundled_gt() -> dict[int, frozenset[str]]:
    # Parsed once per process (about a second); callers get a shallow copy.
    with _data_file("coco2014_gt_objects.json.gz").open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as fh:
            return _gt_from_mapping(json.load(fh), "bundled ground truth")


def load_gt_objects(
    source: str | os.PathLike[str] | None = None,
    vocabulary: ChairVocabulary | str = "legacy",
    normaliser: Normaliser | str = "auto",
    image_ids: Iterable[int] | None = None,
) -> dict[int, frozenset[str]]:
    """Ground truth ``{image_id: objects}``.

    `source`: ``None`` → the bundled COCO-2014 cache (built by the reference with NLTK; all 123,287 train+val
    images); a folder → built from the COCO annotation files in it; a file → a ``{image_id: [objects]}``
    JSON (optionally gzipped) as written by `write_gt_cache`.
    """
    if source is None:
        return dict(_bundled_gt())
    path = Path(source)
    if path.is_dir():
        return build_gt_from_coco(path, vocabulary, normaliser, image_ids)
    if not path.exists():
        raise InputError(f"ground truth not found: {path}; pass a COCO annotation folder or a gt-objects JSON")
    return _gt_from_mapping(_open_json(path), str(path))


def write_gt_cache(gt: Mapping[int, Iterable[str]], path: str | os.PathLike[str]) -> Path:
    """Write ``{image_id: sorted objects}`` as JSON (gzipped if the name ends in ``.gz``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {str(k): sorted(v) for k, v in sorted(gt.items())}
    text = json.dumps(payload, separators=(",", ":"))
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".gz":
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Captions


def load_captions(
    path: str | os.PathLike[str], image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[dict[str, Any]]:
    """Read ``.json`` (a list of objects) or JSON lines; returns ``[{"image_id", "caption"}]``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"captions file not found: {p}; check the path")
    text = p.read_text(encoding="utf-8")
    records: list[tuple[int, Any]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: invalid JSON at line {exc.lineno}: {exc.msg}; fix the file") from exc
        records = [(i + 1, r) for i, r in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{p}: line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
    out = []
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise InputError(f"{p}: record {lineno} is not a JSON object; each line must be an object")
        for key in (image_id_key, caption_key):
            if key not in rec:
                keys = ", ".join(sorted(rec)) or "none"
                raise InputError(f"{p}: record {lineno} has no key {key!r} (keys: {keys}); pass --image-id-key/--caption-key")
        out.append({"image_id": rec[image_id_key], "caption": rec[caption_key]})
    return out


def _image_id(value: Any) -> int:
    # The reference silently treats a string id as a missing image (empty ground truth): coerce or refuse.
    if isinstance(value, bool):
        raise InputError(f"image id {value!r} is not an integer; use COCO integer ids")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise InputError(f"image id {value!r} is not an integer; use COCO integer ids")


def _truncate_incomplete(caption: str) -> str:
    # OPERA's 64-token protocol: keep text up to the last period (nothing if there is none).
    return caption[: caption.rfind(".") + 1]


# ---------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ChairResult:
    """Overall metrics (percent), counts, settings and per-caption records."""

    metrics: dict[str, float]
    counts: dict[str, int]
    settings: dict[str, Any]
    per_caption: list[dict[str, Any]] = field(repr=False)

    def to_dict(self, per_caption: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"metrics": self.metrics, "counts": self.counts, "settings": self.settings}
        if per_caption:
            out["per_caption"] = self.per_caption
        return out


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def chair_scores(
    captions: Iterable[Mapping[str, Any]],
    gt_objects: Mapping[int, Iterable[str]] | None = None,
    *,
    vocabulary: ChairVocabulary | str = "legacy",
    normaliser: Normaliser | str = "auto",
    image_id_key: str = "image_id",
    caption_key: str = "caption",
    missing: str = "error",
    truncate_incomplete: bool = False,
) -> ChairResult:
    """Score captions against ground-truth objects.

    `gt_objects` defaults to the bundled COCO-2014 cache. `missing`: what to do with an image id absent from
    the ground truth: ``"error"`` (default), ``"skip"`` the caption, or ``"empty"`` (the reference's silent
    behaviour: every mention counts as hallucinated).
    Metrics (percent): CHAIR_S = captions with ≥ 1 hallucinated mention / captions; CHAIR_I = hallucinated
    mentions / mentions (with repetitions); Recall = Σ|correct unique objects| / Σ|GT objects|; Len = mean
    merged units per caption (punctuation included); Precision = Σ|correct unique| / Σ|unique mentioned|;
    F1 = harmonic mean of Precision and Recall. A zero denominator gives 0.
    Per-caption records carry the reference's fields (``mscoco_hallucinated_words`` as [word, node] pairs,
    ``mscoco_gt_words``, ``mscoco_generated_words``, ``hallucination_idxs``, ``words`` = merged units) plus
    ``mscoco_words`` and ``mention_idxs``; indices are token positions in the tokenised caption (the
    reference's shift after a dropped "seat" is not reproduced), and ``metrics.Len`` is the unit count
    (the reference leaves it 0).
    """
    if missing not in ("error", "skip", "empty"):
        raise InputError(f"unknown missing={missing!r}; use 'error', 'skip' or 'empty'")
    vocab = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
    norm = get_normaliser(normaliser)
    gt_map = load_gt_objects() if gt_objects is None else gt_objects

    n_caps = n_hall_caps = n_mentions = n_hall = n_gt = n_recalled = n_unique = n_units = n_skipped = 0
    records = []
    for rec in captions:
        if image_id_key not in rec or caption_key not in rec:
            raise InputError(f"caption record lacks {image_id_key!r} or {caption_key!r}; pass the right keys")
        imid = _image_id(rec[image_id_key])
        caption = rec[caption_key]
        if not isinstance(caption, str):
            raise InputError(f"caption of image {imid} is not a string; fix the captions file")
        if imid in gt_map:
            gt = set(gt_map[imid])
        elif missing == "error":
            raise InputError(
                f"image {imid} is not in the ground truth; pass the matching --coco-annotations/--gt-objects "
                "or use missing='skip'"
            )
        elif missing == "skip":
            n_skipped += 1
            continue
        else:
            gt = set()
        text = _truncate_incomplete(caption) if truncate_incomplete else caption
        found = caption_to_objects(text, vocab, norm)
        hallucinated = [
            (w, node, idx) for w, node, idx in zip(found.words, found.node_words, found.token_idxs) if node not in gt
        ]
        correct = {node for node in found.node_words if node in gt}
        generated = set(found.node_words)
        n_caps += 1
        n_hall_caps += bool(hallucinated)
        n_mentions += len(found.node_words)
        n_hall += len(hallucinated)
        n_gt += len(gt)
        n_recalled += len(correct)
        n_unique += len(generated)
        n_units += len(found.units)
        records.append(
            {
                "image_id": imid,
                "caption": caption,
                "mscoco_hallucinated_words": [[w, node] for w, node, _ in hallucinated],
                "mscoco_gt_words": sorted(gt),
                "mscoco_generated_words": found.node_words,
                "mscoco_words": found.words,
                "mention_idxs": found.token_idxs,
                "hallucination_idxs": [idx for _, _, idx in hallucinated],
                "words": found.units,
                "metrics": {
                    "CHAIRs": int(bool(hallucinated)),
                    "CHAIRi": _ratio(len(hallucinated), len(found.node_words)),
                    "Recall": _ratio(len(correct), len(gt)),
                    "Len": len(found.units),
                },
            }
        )
    precision = _ratio(n_recalled, n_unique)
    recall = _ratio(n_recalled, n_gt)
    f1 = _ratio(2 * precision * recall, precision + recall)
    metrics = {
        "CHAIR_S": 100 * _ratio(n_hall_caps, n_caps),
        "CHAIR_I": 100 * _ratio(n_hall, n_mentions),
        "Recall": 100 * recall,
        "Len": _ratio(n_units, n_caps),
        "Precision": 100 * precision,
        "F1": 100 * f1,
    }
    assert all(math.isfinite(v) for v in metrics.values())
    counts = {
        "captions": n_caps,
        "hallucinated_captions": n_hall_caps,
        "mentions": n_mentions,
        "hallucinated_mentions": n_hall,
        "gt_objects": n_gt,
        "recalled_objects": n_recalled,
        "unique_mentions": n_unique,
        "units": n_units,
        "skipped_missing_gt": n_skipped,
    }
    settings = {
        "normaliser": _normaliser_name(norm),
        "normaliser_detail": normaliser_detail(norm),
        "synonyms": vocab.variant,
        "truncate_incomplete": truncate_incomplete,
        "missing": missing,
    }
    return ChairResult(metrics, counts, settings, records)
