"""POPE (Li et al., EMNLP 2023): question files, set construction, answer parsing, metrics.

Questions are JSON lines ``{"question_id", "image", "text", "label"}`` (the official COCO files are JSON lines
despite their ``.json`` name). Construction follows AoiDragon/POPE with an explicit seed: images with at least
`num_questions` objects form the pool, `num_images` are sampled, and each image gets, for its first
`num_questions` objects *in annotation order*, a "yes" question followed by a "no" question about an object
absent from the image and not yet asked about for it: a random pool object (``random``), the most frequent
pool object (``popular``) or the object co-occurring most often with the positive one (``adversarial``), with
a random fallback. By default only the article changes before a vowel ("Is there an apple in the image?");
``legacy_article_bug=True`` reproduces the original ``template.replace("a", "an")`` ("... in the imange?").

Answer parsers (``rule=``): ``official`` (also ``pope``, ``llava``): first sentence, commas removed, split on
spaces, "no" if a word is ``No``/``not``/``no``, else "yes" — so "NO", "isn't" and an empty answer are "yes";
``opera`` (also ``pai``): whole answer without ``.``/``,``, "no" if a word is ``No``/``not``/``no``/``NO`` or
ends with "n't"; ``vcd``: lower-cased substring test against the label ("yes" in the answer for a yes
question, "no" in it — also inside "not", "know", "cannot" — for a no question); ``exact`` (also
``lmms-eval``): the stripped, lower-cased answer must be exactly "yes" or "no"; anything else is wrong for
accuracy and left out of precision/recall. The yes-ratio is always computed from the predictions. Every
split reports ``unparsed`` (exact rule) and ``empty`` answers (mapped to "yes" by the sentence rules).

Shipped question sets, by name (`load_question_sets`): ``coco-random`` / ``coco-popular`` / ``coco-adversarial``
(the official COCO files), ``aokvqa-*`` (A-OKVQA, COCO val2014 images ``COCO_val2014_<id>.jpg``) and ``gqa-*``
(GQA, Visual Genome images ``<id>.jpg``), and ``coco`` / ``aokvqa`` / ``gqa`` for a dataset's three splits.
Splits of A-OKVQA and GQA are labelled ``<dataset>-<split>`` (``aokvqa-random``) wherever a split is named —
question keys, answers, metrics — and COCO's keep their plain names (``random``), as before. A question file
given by path is recognised as a shipped set by its fingerprint (any formatting), else by a file name
starting with ``aokvqa``/``gqa``/``coco``; anything else is an unnamed set, labelled by split only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

__all__ = [
    "RULES",
    "SPLITS",
    "POPE_DATASETS",
    "QUESTION_SET_NAMES",
    "build_pope",
    "coco_image_objects",
    "dataset_groups",
    "dataset_summary",
    "image_folders",
    "load_question_sets",
    "load_answers",
    "load_questions",
    "parse_answer",
    "pope_scores",
    "pope_splits_markdown",
    "question_file_info",
    "question_set_files",
    "split_label",
    "write_questions",
]

SPLITS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "Is there a {} in the image?"
PLURAL_TEMPLATE = "Are there {} in the image?"
# COCO category names that are plural nouns: "Is there a skis ..." in the official files.
PLURAL_NAMES = frozenset({"skis", "scissors"})
METRIC_NAMES = ("Accuracy", "Precision", "Recall", "F1", "Yes_ratio")
# The datasets of the shipped question sets, and what their images are (file names, where they come from).
POPE_DATASETS: dict[str, str] = {
    "coco": "MSCOCO val2014 images (COCO_val2014_<12-digit id>.jpg)",
    "aokvqa": "A-OKVQA's MSCOCO val2014 images (COCO_val2014_<12-digit id>.jpg)",
    "gqa": "GQA images (<Visual Genome id>.jpg, from GQA's images.zip)",
}
DATASET_TITLES = {"coco": "MSCOCO", "aokvqa": "A-OKVQA", "gqa": "GQA"}
QUESTION_SET_NAMES: tuple[str, ...] = tuple(
    name for d in POPE_DATASETS for name in (d, *(f"{d}-{s}" for s in SPLITS))
)


# ---------------------------------------------------------------------------------------------------------
# Answer parsing: each returns "yes", "no", or None (unparsed; only the exact rule produces None).


def _parse_official(answer: str, label: str) -> str | None:
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _parse_opera(answer: str, label: str) -> str | None:
    words = answer.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words)
    return "no" if negative else "yes"


def _parse_vcd(answer: str, label: str) -> str | None:
    # VCD scores against the label: the prediction is "right" if the label word occurs as a substring.
    text = answer.lower()
    if label == "yes":
        return "yes" if "yes" in text else "no"
    return "no" if "no" in text else "yes"


def _parse_exact(answer: str, label: str) -> str | None:
    text = answer.lower().strip()
    return text if text in ("yes", "no") else None


RULES: dict[str, Callable[[str, str], str | None]] = {
    "official": _parse_official,
    "pope": _parse_official,
    "llava": _parse_official,
    "opera": _parse_opera,
    "pai": _parse_opera,
    "vcd": _parse_vcd,
    "exact": _parse_exact,
    "lmms-eval": _parse_exact,
}


def parse_answer(answer: str | None, rule: str = "official", label: str = "yes") -> str | None:
    """Map a model answer to "yes"/"no" (None: unparseable under the exact rule). `label` matters for vcd only."""
    if rule not in RULES:
        raise InputError(f"unknown answer rule {rule!r}; use one of {', '.join(sorted(RULES))}")
    return RULES[rule]("" if answer is None else str(answer), label)


# ---------------------------------------------------------------------------------------------------------
# Files


def _read_records(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise InputError(f"file not found: {path}; check the path")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}; fix the file") from exc
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
    return out


def load_questions(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """Read a POPE question file; `split` (default: guessed from the file name) is stored in each question."""
    p = Path(path)
    if split is None:
        split = next((s for s in SPLITS if s in p.stem), p.stem)
    questions = []
    for lineno, rec in _read_records(p):
        if not isinstance(rec, dict):
            raise InputError(f"{p}: record {lineno} is not a JSON object; use POPE question lines")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
        if missing:
            raise InputError(f"{p}: line {lineno} lacks {', '.join(missing)}; use POPE question lines")
        label = str(rec["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise InputError(f"{p}: line {lineno} has label {rec['label']!r}; labels must be yes or no")
        questions.append({**rec, "label": label, "split": rec.get("split", split)})
    return questions


def question_file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """SHA-256, line count, first image and id base: identify the POPE file version (pope.md §2)."""
    p = Path(path)
    data = p.read_bytes()
    questions = load_questions(p)
    return {
        "path": str(p),
        "sha256": hashlib.sha256(data).hexdigest(),
        "lines": len(questions),
        "first_image": questions[0]["image"] if questions else None,
        "id_base": min((q["question_id"] for q in questions), default=None),
    }


def split_label(dataset: str | None, split: str) -> str:
    """How a split is named in keys and metrics: ``aokvqa-random``; COCO's (and unnamed sets') stay ``random``."""
    return split if dataset in (None, "coco") else f"{dataset}-{split}"


def _question_sources(spec: str) -> list[tuple[Path, str | None, str | None]]:
    """``[(file, dataset, split)]`` of one ``--questions`` value: a shipped set's name or a file path."""
    from vlmscope.eval.protocols import bundled_pope_file

    if spec in POPE_DATASETS:
        return [(bundled_pope_file(s, spec), spec, s) for s in SPLITS]
    dataset, _, split = spec.partition("-")
    if dataset in POPE_DATASETS and split in SPLITS:
        return [(bundled_pope_file(split, dataset), dataset, split)]
    path = Path(spec)
    if not path.exists() and not path.suffix and "/" not in spec and os.sep not in spec:
        raise InputError(f"unknown POPE question set {spec!r}; use one of {', '.join(QUESTION_SET_NAMES)} or a file path")
    return [(path, None, None)]


def question_set_files(specs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The question files behind ``--questions`` values (shipped set names resolved to their files)."""
    return [path for spec in specs for path, _, _ in _question_sources(str(spec))]


def load_question_sets(specs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The questions of shipped set names (``aokvqa-random``, ``gqa``, ...) and/or question files, in order.

    Each question gets ``split`` = its `split_label` and, when its dataset is known, ``dataset``. A file is a
    shipped set when its questions' fingerprint is one (``vlmscope.eval.protocols.identify_pope_questions``),
    else its dataset is the file name's prefix (aokvqa, gqa, coco) if it has one. The same split twice is
    refused: its question keys would collide.
    """
    from vlmscope.eval.protocols import identify_pope_questions

    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for spec in specs:
        for path, dataset, split in _question_sources(str(spec)):
            questions = load_questions(path, split)  # split None: guessed from the file name, per record
            if dataset is None:
                known = identify_pope_questions(questions)
                if known is not None:
                    dataset, split = known
                    for q in questions:
                        q["split"] = split
                else:
                    dataset = next((d for d in POPE_DATASETS if path.name.lower().startswith(d)), None)
            labels = set()
            for q in questions:
                if q["split"] in SPLITS:
                    q["split"] = split_label(dataset, q["split"])
                if dataset is not None:
                    q["dataset"] = dataset
                labels.add(q["split"])
            for label in sorted(labels):
                if label in seen:
                    raise InputError(f"POPE split {label} is given twice ({seen[label]} and {spec}); pass each "
                                     "question set once")
                seen[label] = str(spec)
            out.extend(questions)
    return out


def _data_path_entry(value: str) -> tuple[str | None, str]:
    name, sep, folder = value.partition("=")
    if not sep or Path(value).is_dir():
        return None, value
    if name not in POPE_DATASETS:
        raise InputError(f"--data-path {value}: unknown dataset {name!r}; use {'=, '.join(POPE_DATASETS)}=DIR or "
                         "a plain folder")
    return name, folder


def image_folders(data_paths: Sequence[str], questions: Sequence[Mapping[str, Any]]) -> dict[str | None, Path]:
    """The image folder of every dataset of `questions` (key None: questions of an unnamed set).

    ``--data-path DIR`` serves every dataset of the run; ``--data-path gqa=DIR`` (repeatable) serves one,
    and a plain folder then serves the others. Refuses (`InputError`, one line) before anything loads: an
    entry given twice, a dataset without a folder, a folder that does not exist, a missing image (naming its
    path and the fix)."""
    default: str | None = None
    per: dict[str, str] = {}
    for value in data_paths:
        name, folder = _data_path_entry(str(value))
        if name is None:
            if default is not None:
                raise InputError(f"--data-path given twice ({default}, {folder}); give one plain folder, and "
                                 "DATASET=DIR for the datasets whose images are elsewhere")
            default = folder
        elif name in per:
            raise InputError(f"--data-path {name}= given twice; give one folder per dataset")
        else:
            per[name] = folder
    datasets = list(dict.fromkeys(q.get("dataset") for q in questions))
    unused = sorted(set(per) - set(datasets))
    if unused:
        raise InputError(f"--data-path {unused[0]}=... names a dataset this run has no questions of; drop it or "
                         f"add its questions (--questions {unused[0]})")
    folders: dict[str | None, Path] = {}
    for dataset in datasets:
        folder = per.get(dataset, default) if dataset is not None else default
        what = POPE_DATASETS.get(dataset or "", "the images the questions name")
        if folder is None:
            flag = "DIR" if dataset is None else f"{dataset}=DIR"
            raise InputError(f"no image folder for the {dataset or 'unnamed set'} questions; pass --data-path {flag} "
                             f"(DIR holding {what})")
        root = Path(folder)
        if not root.is_dir():
            flag = f"{dataset}=DIR" if dataset in per else "DIR"
            raise InputError(f"image folder not found: {root}; pass --data-path {flag} with DIR holding {what}")
        missing = sorted({q["image"] for q in questions if q.get("dataset") == dataset
                          and not (root / q["image"]).is_file()})
        if missing:
            name = "POPE" if dataset is None else dataset
            flag = "DIR" if dataset is None or (dataset not in per and len(datasets) == 1) else f"{dataset}=DIR"
            raise InputError(f"{len(missing)} {name} images are not in {root} (first: {root / missing[0]}); pass "
                             f"--data-path {flag} with DIR holding {what}")
        folders[dataset] = root
    return folders


_ANSWER_KEYS = ("answer", "text", "prediction", "output", "response")


def load_answers(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read model answers (JSON lines or array) with ``question_id`` and one of answer/text/prediction/output."""
    p = Path(path)
    out = []
    for lineno, rec in _read_records(p):
        if not isinstance(rec, dict):
            raise InputError(f"{p}: record {lineno} is not a JSON object; use one answer object per line")
        key = next((k for k in _ANSWER_KEYS if k in rec), None)
        if key is None:
            raise InputError(f"{p}: line {lineno} has none of the keys {', '.join(_ANSWER_KEYS)}; add the answer text")
        row = {"question_id": rec.get("question_id"), "answer": rec[key]}
        if rec.get("split") is not None:
            row["split"] = rec["split"]
        out.append(row)
    return out


def write_questions(questions: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write questions as JSON lines with the official four fields."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({k: q[k] for k in ("question_id", "image", "text", "label")}, ensure_ascii=False) for q in questions
    ]
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------
# Metrics


def _metrics(preds: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    n = len(labels)
    unparsed = sum(p is None for p in preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "Accuracy": 100 * (tp + tn) / n if n else 0.0,
        "Precision": 100 * precision,
        "Recall": 100 * recall,
        "F1": 100 * f1,
        "Yes_ratio": 100 * sum(p == "yes" for p in preds) / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": unparsed,
    }


def _answer_text(answer: Any) -> Any:
    if isinstance(answer, Mapping):
        key = next((k for k in _ANSWER_KEYS if k in answer), None)
        if key is None:
            raise InputError(f"answer {dict(answer)!r} has none of the keys {', '.join(_ANSWER_KEYS)}; add the answer text")
        return answer[key]
    return answer


def pope_scores(
    answers: Iterable[Mapping[str, Any] | str],
    questions: Iterable[Mapping[str, Any]],
    rule: str = "official",
    extra: str = "error",
) -> dict[str, Any]:
    """Accuracy, Precision, Recall, F1 and yes-ratio (percent) per split, their mean over splits, and counts.

    Answers are matched to questions by ``question_id`` when every answer has one, by position when none
    has (``matched_by`` in the result says which). Scoring never guesses: an empty input, answers mixing
    both forms, an id answered twice, a question without an answer and (unless ``extra="ignore"``, which
    counts them as ``extra_answers``) answers to questions not in `questions` are errors.
    A question's split is its ``split`` (or ``category``) field, ``"all"`` if absent.
    """
    if rule not in RULES:
        raise InputError(f"unknown answer rule {rule!r}; use one of {', '.join(sorted(RULES))}")
    if extra not in ("error", "ignore"):
        raise InputError(f"extra must be 'error' or 'ignore', got {extra!r}")
    qs = list(questions)
    ans = list(answers)
    if not qs:
        raise InputError("no questions to score; pass a non-empty POPE question file")
    if not ans:
        raise InputError("no answers to score; the answers file is empty")
    has_id = [isinstance(a, Mapping) and a.get("question_id") is not None for a in ans]
    if any(has_id) and not all(has_id):
        first = has_id.index(False) + 1
        raise InputError(f"answers mix records with and without question_id (answer {first} has none); "
                         "give every answer its question_id, or none (then answers follow the question order)")
    keyed = all(has_id)
    extra_answers = 0
    if keyed:
        # Answers that name their split are matched on (split, id): ids restart in every official file.
        with_split = all(a.get("split") is not None for a in ans)

        def qkey(q: Mapping[str, Any]) -> Any:
            return (str(q.get("split") or q.get("category") or "all"), q["question_id"]) if with_split else q["question_id"]

        ids = [qkey(q) for q in qs]
        if len(set(ids)) != len(ids):
            raise InputError(
                "question ids repeat (several splits?); give answers a split field, score each split separately, "
                "or give answers in question order"
            )
        known = set(ids)
        by_id: dict[Any, Any] = {}
        for position, a in enumerate(ans, 1):
            k = qkey(a)
            if k in by_id:
                raise InputError(f"question {k} is answered twice (again in answer {position}); keep one answer "
                                 "per question")
            if k not in known:
                if extra == "ignore":
                    extra_answers += 1
                    continue
                raise InputError(f"answer {position} is for question {k}, which is not in the question file(s); "
                                 "check the files match (or pass --extra-answers ignore to count and skip them)")
            by_id[k] = _answer_text(a)
        missing = [k for k in ids if k not in by_id]
        if missing:
            raise InputError(f"{len(missing)} questions have no answer (first: {missing[0]}); answer every question")
        texts = [by_id[k] for k in ids]
    else:
        if len(ans) != len(qs):
            raise InputError(f"{len(ans)} answers for {len(qs)} questions; give one answer per question, in order")
        texts = [_answer_text(a) for a in ans]
    groups: dict[str, tuple[list[str | None], list[str]]] = {}
    dataset_of: dict[str, str] = {}
    empty: Counter[str] = Counter()
    items = []  # per question, for bootstrap intervals and paired comparisons (vlmscope.eval.stats)
    for q, text in zip(qs, texts):
        label = str(q["label"]).strip().lower()
        split = str(q.get("split") or q.get("category") or "all")
        preds, labels = groups.setdefault(split, ([], []))
        preds.append(parse_answer(text, rule, label))
        labels.append(label)
        empty[split] += text is None or not str(text).strip()
        if q.get("dataset"):
            dataset_of.setdefault(split, str(q["dataset"]))
        items.append({"split": split, "question_id": q["question_id"], "image": q.get("image"), "label": label,
                      "pred": preds[-1], **({"dataset": str(q["dataset"])} if q.get("dataset") else {})})
    splits = {name: {**_metrics(*groups[name]), "empty": empty[name],
                     **({"dataset": dataset_of[name]} if name in dataset_of else {})} for name in groups}
    mean = _mean(splits.values())
    out = {"rule": rule, "n_questions": len(qs), "matched_by": "question_id" if keyed else "position",
           "extra_answers": extra_answers, "splits": splits, "mean": mean, "items": items}
    if dataset_of:
        out["datasets"] = dataset_summary(splits)
    return out


def _mean(splits: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    rows = list(splits)
    return {k: sum(s[k] for s in rows) / len(rows) for k in METRIC_NAMES} if rows else {}


def dataset_groups(items: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{dataset: [split labels]}`` whose means a run reports as ``"<dataset>/<metric>"``, from `pope_scores`
    items: every dataset of a run with A-OKVQA or GQA questions or with several datasets (then no mean is
    taken across datasets); ``{}`` for a COCO-only or unnamed run, which keeps the plain metric names."""
    groups: dict[str, list[str]] = {}
    for it in items:
        if it.get("dataset"):
            labels = groups.setdefault(str(it["dataset"]), [])
            if it["split"] not in labels:
                labels.append(str(it["split"]))
    return {} if set(groups) <= {"coco"} else groups


def pope_splits_markdown(payload: Mapping[str, Any]) -> str:
    """A markdown table of a metrics payload: one row per dataset and split (and each dataset's mean), with
    the dataset named in every row; 95 % intervals beside the values when the payload has them."""
    intervals = payload.get("intervals") or {}
    metrics = payload.get("metrics") or {}

    def cells(key_prefix: str, m: Mapping[str, Any]) -> str:
        out = []
        for k in METRIC_NAMES:
            iv = intervals.get(f"{key_prefix}{k}")
            out.append(f"{m[k]:.1f}" + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else ""))
        return " | ".join(out)

    level = payload.get("bootstrap", {}).get("level")
    note = f" (95 % intervals: {payload['bootstrap']['draws']} bootstrap draws over images)" if level else ""
    lines = [f"## per dataset and split{note}", "",
             "| dataset | split | questions | " + " | ".join(METRIC_NAMES) + " |",
             "|---|---|---:|" + "---:|" * len(METRIC_NAMES)]
    for label, m in (payload.get("splits") or {}).items():
        dataset = m.get("dataset")
        split = label[len(dataset) + 1:] if dataset and label.startswith(f"{dataset}-") else label
        title = DATASET_TITLES.get(dataset or "", dataset or "unnamed")
        lines.append(f"| {title} | {split} | {m['n']} | {cells(f'{label}/', m)} |")
    for dataset, entry in (payload.get("datasets") or {}).items():
        if len(entry["splits"]) > 1:
            prefix = f"{dataset}/" if f"{dataset}/Accuracy" in metrics else ""
            title = DATASET_TITLES.get(dataset, dataset)
            lines.append(f"| {title} | mean of {len(entry['splits'])} | | {cells(prefix, entry['mean'])} |")
    return "\n".join(lines) + "\n"


def dataset_summary(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{dataset: {"splits": [labels], "mean": {metric: mean over its splits}}}`` of `pope_scores` splits that
    name their dataset (a run mixing datasets gets one mean per dataset, never one across them only)."""
    out: dict[str, dict[str, Any]] = {}
    for label, m in splits.items():
        if m.get("dataset"):
            out.setdefault(str(m["dataset"]), {"splits": []})["splits"].append(label)
    for entry in out.values():
        entry["mean"] = _mean(splits[label] for label in entry["splits"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Construction


def coco_image_objects(instances: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, list[str]]:
    """``{image file name: [category names in annotation order, no repeats]}`` from a COCO instances file."""
    if isinstance(instances, Mapping):
        data = instances
    else:
        p = Path(instances)
        if not p.is_file():
            raise InputError(f"instances file not found: {p}; pass e.g. annotations/instances_val2014.json")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{p} is not valid JSON ({exc.msg}); pass a COCO instances file") from exc
    if not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError("not a COCO instances file (needs images, annotations, categories); pass instances_*.json")
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {img["id"]: img.get("file_name") or f"COCO_val2014_{img['id']:012d}.jpg" for img in data["images"]}
    objects: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        fname = files.get(ann["image_id"])
        if fname is None:
            continue
        seen = objects.setdefault(fname, [])
        name = names[ann["category_id"]]
        if name not in seen:
            seen.append(name)
    return objects


def _question_text(obj: str, template: str, legacy_article_bug: bool, plural_aware: bool) -> str:
    if plural_aware and obj in PLURAL_NAMES and template == DEFAULT_TEMPLATE:
        return PLURAL_TEMPLATE.format(obj)
    if obj[:1] in "aeiou":
        if legacy_article_bug:
            # The original replaced every "a": "Is there an apple in the imange?"
            return template.replace("a", "an").format(obj)
        return re.sub(r"\ba(?= \{\})", "an", template).format(obj)
    return template.format(obj)


def build_pope(
    image_objects: Mapping[str, Sequence[str]],
    splits: str | Iterable[str] = "all",
    num_images: int = 500,
    num_questions: int = 3,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    legacy_article_bug: bool = False,
    plural_aware: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Build POPE question sets ``{split: questions}`` from ``{image: [objects]}`` (see `coco_image_objects`).

    All splits use the same `num_images` images, sampled with `seed`; each image yields `num_questions`
    yes/no pairs. Random negatives draw from a generator seeded by (seed, split), so a split's questions do
    not depend on which other splits are built.
    """
    wanted = list(SPLITS) if splits == "all" else [splits] if isinstance(splits, str) else list(splits)
    for s in wanted:
        if s not in SPLITS:
            raise InputError(f"unknown POPE split {s!r}; use random, popular, adversarial or all")
    if num_questions < 1 or num_images < 1:
        raise InputError("num_images and num_questions must be positive")
    pool = sorted(img for img, objs in image_objects.items() if len(objs) >= num_questions)
    if len(pool) < num_images:
        raise InputError(
            f"only {len(pool)} images have at least {num_questions} objects; lower --num-images to {len(pool)} or less"
        )
    images = random.Random(seed).sample(pool, num_images)
    # Statistics over the sampled images only, as the reference does.
    frequency: Counter[str] = Counter()
    co_occur: dict[str, Counter[str]] = {}
    for img in images:
        objs = list(dict.fromkeys(image_objects[img]))
        frequency.update(objs)
        for o in objs:
            co_occur.setdefault(o, Counter()).update(x for x in objs if x != o)
    vocabulary = sorted(frequency)
    # Ties broken by name so that the order does not depend on dict insertion order.
    by_frequency = sorted(vocabulary, key=lambda o: (-frequency[o], o))

    out: dict[str, list[dict[str, Any]]] = {}
    for split in wanted:
        rng = random.Random(f"pope:{seed}:{split}")
        questions: list[dict[str, Any]] = []
        for img in images:
            objs = list(dict.fromkeys(image_objects[img]))
            present = set(objs)
            used: set[str] = set()
            for positive in objs[:num_questions]:
                allowed = [o for o in vocabulary if o not in present and o not in used]
                if not allowed:
                    raise InputError(f"no negative object left for image {img}; use a larger image pool")
                if split == "popular":
                    ranked = by_frequency
                elif split == "adversarial":
                    ranked = sorted(co_occur[positive], key=lambda o: (-co_occur[positive][o], o))
                else:
                    ranked = []
                negative = next((o for o in ranked if o not in present and o not in used), None)
                if negative is None:
                    # The reference redraws a random pool object until it is valid; drawing from the valid
                    # ones directly gives the same distribution.
                    negative = rng.choice(allowed)
                used.add(negative)
                for obj, label in ((positive, "yes"), (negative, "no")):
                    questions.append(
                        {
                            "question_id": len(questions) + 1,
                            "image": img,
                            "text": _question_text(obj, template, legacy_article_bug, plural_aware),
                            "label": label,
                            "object": obj,
                        }
                    )
        out[split] = questions
    return out
