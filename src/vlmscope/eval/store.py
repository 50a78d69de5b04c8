"""Resumable JSON-lines result files, sharding and shard merging.

A run writes one JSON object per line. Each row goes to the file in a single ``os.write`` of a complete line on
a descriptor opened with ``O_APPEND``, followed by ``fsync``, so a killed run leaves at most one incomplete
last line. Opening the store cuts such a line away; the row it held is simply recomputed, so a restart
neither loses nor duplicates rows. Rows whose key is already stored are not written again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vlmscope.errors import InputError

__all__ = ["ResultStore", "merge_shards", "read_rows", "shard"]

T = TypeVar("T")
_CHUNK = 1 << 16


def _complete_length(path: Path) -> int:
    """Length of the file up to and including its last newline (0 if it has none)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            block = fh.read(end - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            end = start
    return 0


def _iter_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Complete lines of a JSON-lines file as (line number, object); an unterminated last line is ignored."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                return  # torn last line of an interrupted run
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({exc}); remove that line and resume") from exc
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {lineno} is not a JSON object; remove that line and resume")
            yield lineno, obj


def _key_of(row: Mapping[str, Any], key: str, where: str) -> Hashable:
    if key not in row:
        raise InputError(f"{where} has no key {key!r}; every row needs it")
    value = row[key]
    if not isinstance(value, Hashable) or isinstance(value, (list, dict)):
        raise InputError(f"{where}: key {key!r} has an unhashable value; use a string or number")
    return value


def read_rows(path: str | os.PathLike[str], key: str | None = None) -> list[dict[str, Any]]:
    """All complete rows of a JSON-lines file (first occurrence per `key` if given)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}; check the path")
    rows, seen = [], set()
    for lineno, obj in _iter_lines(p):
        if key is not None:
            k = _key_of(obj, key, f"{p}: line {lineno}")
            if k in seen:
                continue
            seen.add(k)
        rows.append(obj)
    return rows


class ResultStore:
    """Append-only JSON-lines file keyed by `key`, safe to resume after a crash."""

    def __init__(self, path: str | os.PathLike[str], key: str = "image_id") -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = self._repair()
        self._done: set[Hashable] = set()
        if self.path.exists():
            for lineno, obj in _iter_lines(self.path):
                self._done.add(_key_of(obj, key, f"{self.path}: line {lineno}"))

    def _repair(self) -> int:
        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        keep = _complete_length(self.path)
        if keep < size:
            # The run was killed while writing this line; it will be recomputed.
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
        return size - keep

    def done_keys(self) -> set[Hashable]:
        """Keys of the rows stored so far."""
        return set(self._done)

    def __contains__(self, key: object) -> bool:
        return key in self._done

    def __len__(self) -> int:
        return len(self._done)

    def rows(self) -> list[dict[str, Any]]:
        """The stored rows, one per key, in file order."""
        return read_rows(self.path, self.key) if self.path.exists() else []

    def append(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append rows whose key is new, each as one atomic line write; fsync at the end. Returns rows written."""
        pending = []
        for i, row in enumerate(rows):
            k = _key_of(row, self.key, f"row {i}")
            if k in self._done or any(k == p[0] for p in pending):
                continue
            line = json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n"
            pending.append((k, line.encode("utf-8")))
        if not pending:
            return 0
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for k, data in pending:
                written = os.write(fd, data)
                if written != len(data):
                    # A short write on a regular file means the disk is full or similar; finish the line
                    # rather than leave a torn one behind.
                    view = memoryview(data)[written:]
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                self._done.add(k)
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(pending)


def shard(items: Sequence[T] | Iterable[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world_size, ...`` (by index; deterministic, disjoint, covering)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"invalid shard {rank} of {world_size}; use 0 <= rank < world_size")
    return list(items)[rank::world_size]


def merge_shards(
    paths: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    key: str = "image_id",
    order: Sequence[Hashable] | None = None,
) -> int:
    """Merge shard files into `out`, one row per key (first seen wins), shards in the given order.

    With `order` (e.g. the item keys in their original order) rows are sorted by it; keys not in `order` go
    last, in merge order. The output is written to a temporary file and renamed. Returns the row count.
    """
    rows: list[dict[str, Any]] = []
    seen: set[Hashable] = set()
    for path in paths:
        for row in read_rows(path):
            k = _key_of(row, key, str(path))
            if k not in seen:
                seen.add(k)
                rows.append(row)
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        rows.sort(key=lambda r: rank.get(r[key], len(rank)))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return len(rows)
