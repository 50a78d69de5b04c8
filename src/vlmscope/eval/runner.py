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
from vlmscope.eval.chair import METRIC_KEYS, chair_scores
from vlmscope.eval.pope import METRIC_NAMES, pope_scores
from vlmscope.eval.store import ResultStore

__all__ = ["metrics_markdown", "run_chair", "run_pope", "write_metrics"]

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


def write_metrics(out_dir: str | os.PathLike[str], payload: Mapping[str, Any], name: str | None = None) -> Path:
    """Write ``metrics.json`` (the payload) and ``metrics.md`` (a table of ``payload["metrics"]``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    tmp = path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    table = metrics_markdown([(name or out.name, payload["metrics"])])
    (out / "metrics.md").write_text(f"# {payload.get('task', 'metrics')}\n\n{table}", encoding="utf-8")
    return path


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
    """Caption every ``(image_id, image_path)`` not yet stored, then score CHAIR over all `items`.

    Rows stored: ``{"image_id", "image", "caption"}``. `gt_objects` defaults to the bundled COCO-2014 cache;
    `chair_kwargs` go to `chair_scores`. Returns the payload written to ``metrics.json``.
    """
    results = _store(store, "image_id")
    if results.key != "image_id":
        raise InputError(f"a CHAIR store must be keyed by image_id, not {results.key!r}")
    items = [(int(i), str(p)) for i, p in items]
    pending = [it for it in items if it[0] not in results]
    with _progress(len(items), len(items) - len(pending), "captioning", progress) as bar:
        for batch in _batches(pending, batch_size):
            captions = list(caption_fn([path for _, path in batch]))
            if len(captions) != len(batch):
                raise ValueError(f"caption_fn returned {len(captions)} captions for {len(batch)} images")
            results.append(
                {"image_id": imid, "image": path, "caption": str(cap)} for (imid, path), cap in zip(batch, captions)
            )
            bar.update(len(batch))
    stored = {row["image_id"]: row for row in results.rows()}
    rows = [stored[imid] for imid, _ in items]
    result = chair_scores(rows, gt_objects, **chair_kwargs)
    payload = {
        "task": "chair",
        "metrics": {k: result.metrics[k] for k in METRIC_KEYS},
        "counts": result.counts,
        "settings": result.settings,
        "results_file": results.path.name,
        "n_items": len(items),
    }
    write_metrics(out_dir if out_dir is not None else results.path.parent, payload)
    return payload


def _question_key(question: Mapping[str, Any]) -> str:
    split = question.get("split") or question.get("category") or "all"
    return f"{split}:{question['question_id']}"


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
    """Answer every question not yet stored, then compute POPE metrics per split.

    Rows stored: the question fields plus ``answer`` and ``qkey`` (``"split:question_id"``, unique across
    splits). A store given as a path is keyed by ``qkey``; a `ResultStore` keyed by ``question_id`` works
    for a single split. Image paths are ``image_root / question["image"]`` when `image_root` is given.
    """
    results = _store(store, "qkey")
    rows_in = []
    for q in questions:
        for field in ("question_id", "image", "text", "label"):
            if field not in q:
                raise InputError(f"question {dict(q)!r} lacks {field!r}; use POPE question lines")
        rows_in.append({**q, "qkey": _question_key(q)})
    keys = [r.get(results.key) for r in rows_in]
    if len(set(keys)) != len(keys):
        raise InputError(f"questions repeat the store key {results.key!r}; key the store by 'qkey' to mix splits")
    pending = [r for r in rows_in if r[results.key] not in results]
    root = Path(image_root) if image_root is not None else None
    with _progress(len(rows_in), len(rows_in) - len(pending), "answering", progress) as bar:
        for batch in _batches(pending, batch_size):
            pairs = [(str(root / q["image"]) if root else str(q["image"]), str(q["text"])) for q in batch]
            answers = list(answer_fn(pairs))
            if len(answers) != len(batch):
                raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} questions")
            results.append({**q, "answer": str(a)} for q, a in zip(batch, answers))
            bar.update(len(batch))
    stored = {row[results.key]: row for row in results.rows()}
    answered = [stored[k] for k in keys]
    # Positional matching: question ids repeat across splits.
    scores = pope_scores([r["answer"] for r in answered], rows_in, rule=rule) if answered else {"splits": {}, "mean": {}}
    flat = dict(scores["mean"])
    if len(scores["splits"]) > 1:
        for split, m in scores["splits"].items():
            flat[f"{split}/Accuracy"] = m["Accuracy"]
            flat[f"{split}/F1"] = m["F1"]
    payload = {
        "task": "pope",
        "metrics": {k: flat[k] for k in [*METRIC_NAMES, *sorted(set(flat) - set(METRIC_NAMES))] if k in flat},
        "splits": scores["splits"],
        "settings": {"rule": rule},
        "results_file": results.path.name,
        "n_items": len(rows_in),
    }
    write_metrics(out_dir if out_dir is not None else results.path.parent, payload)
    return payload
