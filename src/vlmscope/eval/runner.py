"""Model-free core of the CHAIR and POPE evaluation runs.

The model layer plugs in as plain callables: ``caption_fn(image_paths) -> captions`` and
``answer_fn([(image_path, question)]) -> answers``. Runs are resumable: results go to a `ResultStore` one
finished batch at a time, and items already stored are skipped. At the end the metrics are computed from the
stored rows and written to ``metrics.json`` and ``metrics.md`` beside the results file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError
from vlmscope.eval.chair import METRIC_KEYS, chair_scores, load_gt_objects
from vlmscope.eval.pope import METRIC_NAMES, dataset_groups, pope_scores, pope_splits_markdown
from vlmscope.eval.stats import chair_intervals, pope_intervals
from vlmscope.eval.store import ResultStore

__all__ = [
    "answer_questions",
    "caption_images",
    "metrics_markdown",
    "question_key",
    "run_chair",
    "run_pope",
    "score_chair",
    "score_pope",
    "write_metrics",
]

CaptionFn = Callable[[list[str]], Sequence[str]]
AnswerFn = Callable[[list[tuple[str, str]]], Sequence[str]]


def _store(store: ResultStore | str | os.PathLike[str], key: str) -> ResultStore:
    return store if isinstance(store, ResultStore) else ResultStore(store, key=key)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    if size < 1:
        raise InputError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(total: int, done: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def metrics_markdown(rows: Sequence[tuple[str, Mapping[str, Any]]], columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per ``(name, metrics)``, one column per metric (floats to one decimal)."""
    if columns is None:
        columns = []
        for _, metrics in rows:
            columns += [k for k in metrics if k not in columns]
    header = "| run | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    body = ["| " + " | ".join([name, *(_fmt(m.get(c)) for c in columns)]) + " |" for name, m in rows]
    return "\n".join([header, rule, *body]) + "\n"


def _intervals(intervals: Mapping[str, Any]) -> dict[str, Any]:
    """The ``intervals`` and ``bootstrap`` entries of a metrics payload (nothing without intervals)."""
    if not intervals:
        return {}
    first = next(iter(intervals.values()))
    return {"intervals": {k: [v.low, v.high] for k, v in intervals.items()},
            "bootstrap": {"draws": first.draws, "seed": first.seed, "level": first.level, "unit": "image"}}


def _write_json(path: Path, payload: Any) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_metrics(out_dir: str | os.PathLike[str], payload: Mapping[str, Any], name: str | None = None) -> Path:
    """Write ``metrics.json`` (the payload) and ``metrics.md`` (a table of ``payload["metrics"]``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    _write_json(path, payload)
    table = metrics_markdown([(name or out.name, payload["metrics"])])
    (out / "metrics.md").write_text(f"# {payload.get('task', 'metrics')}\n\n{table}", encoding="utf-8")
    return path


def caption_images(
    items: Sequence[tuple[int, str]],
    caption_fn: CaptionFn,
    store: ResultStore | str | os.PathLike[str],
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "captioning",
) -> ResultStore:
    """Caption every ``(image_id, image_path)`` not yet in `store`, one stored batch at a time.

    Rows stored: ``{"image_id", "image", "caption"}``. A killed run resumes where it stopped.
    """
    results = _store(store, "image_id")
    if results.key != "image_id":
        raise InputError(f"a CHAIR store must be keyed by image_id, not {results.key!r}")
    items = [(int(i), str(p)) for i, p in items]
    pending = [it for it in items if it[0] not in results]
    with _progress(len(items), len(items) - len(pending), desc, progress) as bar:
        for batch in _batches(pending, batch_size):
            captions = list(caption_fn([path for _, path in batch]))
            if len(captions) != len(batch):
                raise ValueError(f"caption_fn returned {len(captions)} captions for {len(batch)} images")
            results.append(
                {"image_id": imid, "image": path, "caption": str(cap)} for (imid, path), cap in zip(batch, captions)
            )
            bar.update(len(batch))
    return results


def score_chair(
    image_ids: Sequence[int],
    store: ResultStore | str | os.PathLike[str],
    gt_objects: Mapping[int, Iterable[str]] | str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    **chair_kwargs: Any,
) -> dict[str, Any]:
    """CHAIR over the stored captions of `image_ids`; writes ``metrics.json`` (with 95 % bootstrap intervals,
    `bootstrap` draws over images, none if 0), ``metrics.md`` and ``chair_details.json`` (per-caption
    mentions, hallucinations, ground truth). Returns the payload."""
    results = _store(store, "image_id")
    stored = {row["image_id"]: row for row in results.rows()}
    missing = [i for i in image_ids if i not in stored]
    if missing:
        raise InputError(f"{len(missing)} images have no caption in {results.path} (first: {missing[0]}); "
                         "run the captioning first")
    rows = [stored[i] for i in image_ids]
    if gt_objects is not None and not isinstance(gt_objects, Mapping):
        gt_objects = load_gt_objects(gt_objects, image_ids=list(image_ids))
    result = chair_scores(rows, gt_objects, **chair_kwargs)
    payload = {
        "task": "chair",
        "metrics": {k: result.metrics[k] for k in METRIC_KEYS},
        **_intervals(chair_intervals(result, bootstrap, bootstrap_seed) if bootstrap else {}),
        "counts": result.counts,
        "settings": {**result.settings, **(settings or {})},
        "results_file": results.path.name,
        "n_items": len(rows),
    }
    out = Path(out_dir) if out_dir is not None else results.path.parent
    write_metrics(out, payload)
    _write_json(out / "chair_details.json", result.to_dict())
    return payload


def run_chair(
    items: Sequence[tuple[int, str]],
    caption_fn: CaptionFn,
    store: ResultStore | str | os.PathLike[str],
    batch_size: int = 1,
    progress: bool = True,
    gt_objects: Mapping[int, Iterable[str]] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    **chair_kwargs: Any,
) -> dict[str, Any]:
    """`caption_images` then `score_chair` over all `items` (`gt_objects` defaults to the bundled COCO-2014
    cache; `chair_kwargs` go to `chair_scores`). Returns the payload written to ``metrics.json``."""
    results = caption_images(items, caption_fn, store, batch_size, progress)
    return score_chair([int(i) for i, _ in items], results, gt_objects, out_dir, **chair_kwargs)


def question_key(question: Mapping[str, Any]) -> str:
    """``"split:question_id"``: unique across the official files, whose ids restart in every split."""
    split = question.get("split") or question.get("category") or "all"
    return f"{split}:{question['question_id']}"


def _keyed_questions(questions: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    rows = []
    for q in questions:
        for field in ("question_id", "image", "text", "label"):
            if field not in q:
                raise InputError(f"question {dict(q)!r} lacks {field!r}; use POPE question lines")
        rows.append({**q, "qkey": question_key(q)})
    keys = [r.get(key) for r in rows]
    if len(set(keys)) != len(keys):
        raise InputError(f"questions repeat the store key {key!r}; key the store by 'qkey' to mix splits")
    return rows


def answer_questions(
    questions: Sequence[Mapping[str, Any]],
    answer_fn: AnswerFn,
    store: ResultStore | str | os.PathLike[str],
    batch_size: int = 1,
    progress: bool = True,
    image_root: str | os.PathLike[str] | Mapping[str | None, str | os.PathLike[str]] | None = None,
    desc: str = "answering",
) -> ResultStore:
    """Answer every question not yet in `store`, one stored batch at a time.

    Rows stored: the question fields plus ``answer`` and ``qkey`` (``"split:question_id"``). A store given as
    a path is keyed by ``qkey``; a `ResultStore` keyed by ``question_id`` works for a single split. Image
    paths are ``image_root / question["image"]`` when `image_root` is given; a mapping ``{dataset: folder}``
    gives each question the folder of its ``dataset`` (`vlmscope.eval.pope.image_folders`).
    """
    results = _store(store, "qkey")
    rows_in = _keyed_questions(questions, results.key)
    pending = [r for r in rows_in if r[results.key] not in results]
    if isinstance(image_root, Mapping):
        roots = {k: Path(v) for k, v in image_root.items()}
    else:
        roots = {} if image_root is None else {"*": Path(image_root)}

    def image_path(q: Mapping[str, Any]) -> str:
        root = roots.get(q.get("dataset"), roots.get("*")) if roots else None
        return str(root / q["image"]) if root else str(q["image"])

    with _progress(len(rows_in), len(rows_in) - len(pending), desc, progress) as bar:
        for batch in _batches(pending, batch_size):
            pairs = [(image_path(q), str(q["text"])) for q in batch]
            answers = list(answer_fn(pairs))
            if len(answers) != len(batch):
                raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} questions")
            results.append({**q, "answer": str(a)} for q, a in zip(batch, answers))
            bar.update(len(batch))
    return results


def score_pope(
    questions: Sequence[Mapping[str, Any]],
    store: ResultStore | str | os.PathLike[str],
    rule: str = "official",
    out_dir: str | os.PathLike[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """POPE metrics per split (and their mean) over the stored answers of `questions`; writes
    ``metrics.json`` (with 95 % bootstrap intervals, images resampled), ``metrics.md`` and
    ``pope_details.json`` (the parsed answer of every question). Returns the payload."""
    results = _store(store, "qkey")
    rows_in = _keyed_questions(questions, results.key)
    stored = {row[results.key]: row for row in results.rows()}
    missing = [r[results.key] for r in rows_in if r[results.key] not in stored]
    if missing:
        raise InputError(f"{len(missing)} questions have no answer in {results.path} (first: {missing[0]}); "
                         "run the answering first")
    answered = [stored[r[results.key]] for r in rows_in]
    # Positional matching: question ids repeat across splits.
    scores = pope_scores([r["answer"] for r in answered], rows_in, rule=rule) if answered else {"splits": {}, "mean": {}}
    # A run with A-OKVQA / GQA questions names every number by its dataset ("aokvqa/F1", "aokvqa-random/F1").
    groups = dataset_groups(scores.get("items", []))
    if groups:
        flat = {f"{d}/{k}": v for d, entry in scores["datasets"].items() for k, v in entry["mean"].items()}
    else:
        flat = dict(scores["mean"])
    if len(scores["splits"]) > 1:
        for split, m in scores["splits"].items():
            flat[f"{split}/Accuracy"] = m["Accuracy"]
            flat[f"{split}/F1"] = m["F1"]
    intervals = pope_intervals(scores["items"], bootstrap, bootstrap_seed) if bootstrap and answered else {}
    payload = {
        "task": "pope",
        "metrics": {k: flat[k] for k in [*METRIC_NAMES, *sorted(set(flat) - set(METRIC_NAMES))] if k in flat},
        **_intervals(intervals),
        "splits": scores["splits"],
        **({"datasets": scores["datasets"]} if "datasets" in scores else {}),
        "settings": {"rule": rule, **(settings or {})},
        "results_file": results.path.name,
        "n_items": len(rows_in),
    }
    out = Path(out_dir) if out_dir is not None else results.path.parent
    write_metrics(out, payload)
    if "datasets" in scores:
        with (out / "metrics.md").open("a", encoding="utf-8") as md:
            md.write("\n" + pope_splits_markdown(payload))
    _write_json(out / "pope_details.json", {"rule": rule, "items": scores.get("items", [])})
    return payload


def run_pope(
    questions: Sequence[Mapping[str, Any]],
    answer_fn: AnswerFn,
    store: ResultStore | str | os.PathLike[str],
    batch_size: int = 1,
    progress: bool = True,
    rule: str = "official",
    image_root: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """`answer_questions` then `score_pope`. Returns the payload written to ``metrics.json``."""
    results = answer_questions(questions, answer_fn, store, batch_size, progress, image_root)
    return score_pope(questions, results, rule, out_dir)
