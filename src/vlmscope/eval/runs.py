"""Run folders of `vlmscope eval chair|pope|amber`: bound to their settings, resumable, sharded under accelerate.

A run folder holds::

    run.json        {"kind": "eval-chair" | "eval-pope" | "eval-amber", "settings": {...}, "provenance": {...}}
    captions.jsonl  (CHAIR), answers.jsonl (POPE) or responses.jsonl (AMBER): one fsync'ed JSON line per item
    metrics.json    {"task", "metrics", "settings", ...}; metrics.md (a table); chair_details.json (CHAIR),
                    pope_details.json (POPE), amber_details.json (AMBER)
    shards/         per-process result files under `accelerate launch` (merged by the main process)

``settings`` is every setting that determines the stored rows (model, revision, dtype, decoding and
interventions as registry spec strings, prompts, token limits, batch size, data). Restarting into the same
folder resumes: stored rows are reused and only the missing ones are computed. Restarting with different
settings is refused (the stored rows would be labelled with settings that did not produce them), except for
the keys in `RESCORED_KEYS`, which only change how the stored rows are scored. ``force_new=True`` discards
the folder's results and starts over. A folder holding files this module did not write is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError
from vlmscope.eval.store import ResultStore, merge_shards
from vlmscope.eval.store import shard as take_shard

__all__ = ["KINDS", "RESCORED_KEYS", "RUN_FILE", "RunFolder", "ids_digest", "run_amber_folder", "run_chair_folder",
           "run_pope_folder"]

RUN_FILE = "run.json"
KINDS = {"eval-chair": ("captions.jsonl", "image_id"), "eval-pope": ("answers.jsonl", "qkey"),
         "eval-amber": ("responses.jsonl", "id")}
# Files and folders a run writes; only these are replaced or removed.
OWNED = frozenset({RUN_FILE, "captions.jsonl", "answers.jsonl", "responses.jsonl", "metrics.json", "metrics.md",
                   "chair_details.json", "pope_details.json", "amber_details.json", "shards"})
# Settings that only change the scoring of stored rows: a resume may change them (metrics are recomputed).
# AMBER's answer parser and similarity step are among them.
RESCORED_KEYS = frozenset({"rule", "gt_objects", "normaliser", "synonyms", "bootstrap", "bootstrap_seed",
                           "amber_parser", "amber_similarity"})


def ids_digest(keys: Sequence[Any]) -> str:
    """``sha256:<hex>`` of the item keys in order: identifies the selected images or questions."""
    text = json.dumps([k if isinstance(k, int | str) else str(k) for k in keys])
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _owned(name: str) -> bool:
    # Temporary files of an interrupted atomic write (``metrics.json.tmp``, ``run.json.123.tmp``) count too.
    return name in OWNED or (name.endswith(".tmp") and any(name.startswith(o + ".") for o in OWNED))


def _write_json(path: Path, payload: Any) -> None:
    # One temporary name per process: several ranks may write run.json at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RunFolder:
    """An eval run folder and the settings it is (to be) bound to."""

    path: Path
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.kind not in KINDS:
            raise ValueError(f"unknown run kind {self.kind!r}; use one of {', '.join(KINDS)}")

    @property
    def results_name(self) -> str:
        return KINDS[self.kind][0]

    @property
    def key(self) -> str:
        return KINDS[self.kind][1]

    @property
    def results_path(self) -> Path:
        return self.path / self.results_name

    def stored(self) -> dict[str, Any] | None:
        """The folder's run.json, or None if it has none."""
        path = self.path / RUN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc.msg}); pass --force-new to start over") from None
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise InputError(f"{path} has no 'settings' object; pass --force-new to start over, or a new --out")
        return data

    def differing_keys(self, stored_settings: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
        keys = [*stored_settings, *(k for k in self.settings if k not in stored_settings)]
        return [k for k in keys if k not in RESCORED_KEYS and k not in ignore
                and stored_settings.get(k) != self.settings.get(k)]

    def check(self, force_new: bool = False, ignore: Sequence[str] = ()) -> None:
        """Refuse (`InputError`) a folder this run must not write into; writes nothing.

        `ignore`: settings not known yet (e.g. the revision before the model is loaded)."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; name a folder for the run")
        if not out.is_dir():
            return
        entries = sorted(p.name for p in out.iterdir())
        foreign = [name for name in entries if not _owned(name)]
        if foreign:
            raise InputError(f"{out} holds files vlmscope eval did not write (first: {foreign[0]}); "
                             "pass an empty or new --out folder")
        if not entries or force_new:
            return
        stored = self.stored()
        if stored is None:
            raise InputError(f"{out} holds results without {RUN_FILE} (an older vlmscope wrote them), so their "
                             "settings are unknown; pass --force-new to start over, or a new --out folder")
        if stored.get("kind") != self.kind:
            raise InputError(f"{out} holds an {stored.get('kind')} run, not {self.kind}; pass a new --out folder "
                             "(or --force-new to discard it)")
        differing = self.differing_keys(stored["settings"], ignore)
        if differing:
            raise InputError(f"{out} holds a run with other settings ({', '.join(differing)}); pass --force-new "
                             "to discard its results, or a new --out folder")

    def clear(self) -> None:
        """Remove the files a run owns (never anything else)."""
        for path in list(self.path.iterdir()) if self.path.is_dir() else []:
            if not _owned(path.name):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def start(self, provenance: Mapping[str, Any], force_new: bool = False) -> bool:
        """Create the folder (after `check`), discard old results with `force_new`, write run.json.
        Returns whether the folder was created now."""
        created = not self.path.exists()
        if force_new and not created:
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write(provenance)
        return created

    def write(self, provenance: Mapping[str, Any]) -> None:
        stored = self.stored() or {}
        # Scoring keys are the latest scoring's; the bound keys are equal to the stored ones (checked).
        settings = {**stored.get("settings", {}), **self.settings}
        _write_json(self.path / RUN_FILE, {"kind": self.kind, "settings": settings, "provenance": dict(provenance)})

    def discard_if_empty(self) -> None:
        """After a failure: remove a folder created by this run that holds no result row yet."""
        has_rows = self.results_path.is_file() and self.results_path.stat().st_size > 0
        shards = self.path / "shards"
        if has_rows or (shards.is_dir() and any(p.stat().st_size for p in shards.iterdir())):
            return
        self.clear()
        try:
            self.path.rmdir()
        except OSError:
            pass  # something else was put there meanwhile: leave it


@dataclass
class RunReport:
    """What a run did: rows reused from the folder, rows computed now, and the metrics payload (main only)."""

    reused: int
    computed: int
    total: int
    payload: dict[str, Any] | None


def _shard_path(folder: RunFolder, shard: Any) -> Path:
    # One file per process: appends from several processes never interleave; the main process merges.
    name = folder.results_name
    return folder.results_path if shard.world_size == 1 else folder.path / "shards" / f"{name}.rank{shard.rank}"


def _merge(folder: RunFolder, order: list[Hashable], shard: Any) -> None:
    if shard.world_size > 1:
        final = folder.results_path
        parts = ([final] if final.exists() else []) + sorted((folder.path / "shards").glob(f"{folder.results_name}.rank*"))
        merge_shards(parts, final, folder.key, order=order)


def _run(folder: RunFolder, items: Sequence[Any], item_key: Callable[[Any], Hashable], work: Callable[..., Any],
         score: Callable[[], dict[str, Any]], shard: Any, provenance: Mapping[str, Any], force_new: bool,
         notify: Callable[[str], None]) -> RunReport:
    started = time.perf_counter()
    created = False
    # The main process discards old results and writes run.json first; the others follow once it has.
    if shard.is_main:
        created = folder.start(provenance, force_new)
    shard.wait()
    if not shard.is_main:
        folder.start(provenance)
    try:
        final = ResultStore(folder.results_path, folder.key)
        mine = take_shard(items, shard.rank, shard.world_size)
        # Rows merged into the final file by an earlier (differently sharded) run count as done.
        store = final if shard.world_size == 1 else ResultStore(_shard_path(folder, shard), folder.key)
        todo = [it for it in mine if item_key(it) not in final and item_key(it) not in store]
        reused = len(mine) - len(todo)
        if reused:
            notify(f"resuming {folder.path}: reused {reused} stored {folder.results_name} rows of {len(mine)}"
                   f"{'' if shard.world_size == 1 else f' (rank {shard.rank})'}, computing {len(todo)}")
        work(todo, store)
    except BaseException:
        if created:
            folder.discard_if_empty()
        raise
    shard.wait()
    if not shard.is_main:
        return RunReport(reused, len(todo), len(mine), None)
    _merge(folder, [item_key(it) for it in items], shard)
    payload = score()
    folder.write({**provenance, "wall_seconds": round(time.perf_counter() - started, 3), "rows_reused": reused,
                  "rows_computed": len(todo)})
    return RunReport(reused, len(todo), len(items), payload)


def run_chair_folder(folder: RunFolder, items: Sequence[tuple[int, str]], caption_fn: Callable[[list[str]], Any],
                     shard: Any, batch_size: int, provenance: Mapping[str, Any], gt_objects: Any = None,
                     force_new: bool = False, progress: bool = True,
                     notify: Callable[[str], None] = _stderr, **chair_kwargs: Any) -> RunReport:
    """Caption the `items` not yet stored in `folder` (this process's shard), merge, score CHAIR (main only)."""
    from vlmscope.eval.runner import caption_images, score_chair

    def work(todo: list[tuple[int, str]], store: ResultStore) -> None:
        caption_images(todo, caption_fn, store, batch_size, progress=progress, desc=f"captions[{shard.rank}]")

    def score() -> dict[str, Any]:
        return score_chair([i for i, _ in items], folder.results_path, gt_objects, folder.path, folder.settings,
                           **chair_kwargs)

    return _run(folder, list(items), lambda it: it[0], work, score, shard, provenance, force_new, notify)


def run_pope_folder(folder: RunFolder, questions: Sequence[Mapping[str, Any]],
                    answer_fn: Callable[[list[tuple[str, str]]], Any], shard: Any, batch_size: int,
                    provenance: Mapping[str, Any], image_root: str | os.PathLike[str], rule: str = "official",
                    force_new: bool = False, progress: bool = True,
                    notify: Callable[[str], None] = _stderr, **pope_kwargs: Any) -> RunReport:
    """Answer the `questions` not yet stored in `folder` (this process's shard), merge, score POPE (main only)."""
    from vlmscope.eval.runner import answer_questions, question_key, score_pope

    def work(todo: list[Mapping[str, Any]], store: ResultStore) -> None:
        answer_questions(todo, answer_fn, store, batch_size, progress=progress, image_root=image_root,
                         desc=f"answers[{shard.rank}]")

    def score() -> dict[str, Any]:
        return score_pope(questions, folder.results_path, rule, folder.path, folder.settings, **pope_kwargs)

    return _run(folder, list(questions), question_key, work, score, shard, provenance, force_new, notify)


def run_amber_folder(folder: RunFolder, queries: Sequence[Mapping[str, Any]], answer_fns: Mapping[str, Callable],
                     shard: Any, batch_size: int, provenance: Mapping[str, Any], image_root: str | os.PathLike[str],
                     task: str = "all", parser: str = "reference", similarity: str = "auto",
                     bootstrap: int = 1000, bootstrap_seed: int = 0, force_new: bool = False, progress: bool = True,
                     notify: Callable[[str], None] = _stderr) -> RunReport:
    """Answer the AMBER `queries` not yet stored in `folder` (this process's shard), merge, score (main only)."""
    from vlmscope.eval.amber import answer_amber, score_amber

    def work(todo: list[Mapping[str, Any]], store: ResultStore) -> None:
        answer_amber(todo, answer_fns, store, batch_size, image_root, progress=progress, desc=f"amber[{shard.rank}]")

    def score() -> dict[str, Any]:
        return score_amber([q["id"] for q in queries], folder.results_path, folder.path, folder.settings,
                           task=task, parser=parser, similarity=similarity, bootstrap=bootstrap,
                           bootstrap_seed=bootstrap_seed)

    return _run(folder, list(queries), lambda q: q["id"], work, score, shard, provenance, force_new, notify)
