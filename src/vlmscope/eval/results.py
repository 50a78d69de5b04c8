"""Resumable JSON-lines result files: whole-line atomic appends, torn-tail repair, shard merging.

A run appends one line per finished item with a single `os.write` on an O_APPEND descriptor, then fsyncs,
so a killed run leaves at most one torn final line; opening the file again cuts that tail away. Rows are keyed
(`image_id`, `question_id`), so a restarted run skips what is done and never writes a key twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError


class JsonlResults:
    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._done = {row[key] for row in self.rows()}

    def _repair(self) -> None:
        """Drop a torn last line left by a killed writer (everything after the last newline)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def rows(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{self.path}:{number} is not valid JSON: delete that line to resume") from None
                if self.key not in row:
                    raise InputError(f"{self.path}:{number} has no {self.key!r} key")
                yield row

    def done(self) -> set[Any]:
        return set(self._done)

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        written = 0
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for row in rows:
                if row[self.key] in self._done:
                    continue
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                os.write(fd, line)
                self._done.add(row[self.key])
                written += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        return written


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Deterministic round-robin share of `items` for process `rank`."""
    return list(items[rank::world_size])


def merge(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], key: str) -> int:
    """Merge shard files into `out` (appending rows whose key is not there yet)."""
    target = JsonlResults(out, key)
    total = 0
    for path in paths:
        if Path(path).exists():
            total += target.append(JsonlResults(path, key).rows())
    return total
