"""Resumable result files: torn lines from killed runs, restarts, sharding and merging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlmscope.errors import InputError
from vlmscope.eval.store import ResultStore, merge_shards, read_rows, shard

SRC = Path(__file__).resolve().parents[1] / "src"


def _lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_append_done_keys_and_no_duplicates(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out" / "rows.jsonl")
    assert store.done_keys() == set() and len(store) == 0
    assert store.append([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]) == 2
    assert store.append([{"image_id": 2, "caption": "again"}, {"image_id": 3, "caption": "c"}]) == 1
    assert store.append([{"image_id": 4, "caption": "x"}, {"image_id": 4, "caption": "y"}]) == 1
    assert store.done_keys() == {1, 2, 3, 4} and 3 in store
    reopened = ResultStore(store.path)
    assert reopened.done_keys() == {1, 2, 3, 4}
    assert [r["caption"] for r in reopened.rows()] == ["a", "b", "c", "x"]
    assert len(_lines(store.path)) == 4


def test_torn_last_line_is_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": "b"}\n{"image_id": 3, "cap')
    store = ResultStore(path)
    assert store.repaired_bytes == len('{"image_id": 3, "cap')
    assert store.done_keys() == {1, 2}
    store.append([{"image_id": 3, "caption": "c"}])
    assert [r["image_id"] for r in _lines(path)] == [1, 2, 3]


def test_a_file_holding_only_a_torn_line_becomes_empty(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image_id": 1, "capt')
    assert ResultStore(path).done_keys() == set()
    assert path.read_bytes() == b""


def test_a_corrupt_complete_line_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image_id": 1}\nnot json\n{"image_id": 3}\n')
    with pytest.raises(InputError, match="line 2"):
        ResultStore(path)
    path.write_text('{"other": 1}\n')
    with pytest.raises(InputError, match="no key 'image_id'"):
        ResultStore(path)


WRITER = textwrap.dedent(
    """
    import sys, time
    from vlmscope.eval.store import ResultStore
    store = ResultStore(sys.argv[1], key="question_id")
    n = int(sys.argv[2])
    for i in range(n):
        if i in store:
            continue
        store.append([{"question_id": i, "answer": "yes" * 50}])
        time.sleep(0.002)
    """
)


def test_run_killed_with_sigkill_then_restarted_gives_each_row_once(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    n = 400
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 20_000):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = len(read_rows(path))
    assert 0 < partial < n  # killed mid-way
    # A kill can also land inside a write: simulate the torn tail it would leave.
    with open(path, "ab") as fh:
        fh.write(b'{"question_id": 99999, "ans')
    subprocess.run([sys.executable, str(script), str(path), str(n)], env=env, check=True, timeout=120)
    rows = _lines(path)
    assert [r["question_id"] for r in rows] == list(range(n))


def test_shard_is_deterministic_disjoint_and_covering() -> None:
    items = [f"img{i}" for i in range(10)]
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts[0] == ["img0", "img3", "img6", "img9"]
    assert parts[1] == ["img1", "img4", "img7"]
    assert sorted(sum(parts, [])) == sorted(items)
    assert shard(iter(items), 1, 3) == parts[1]
    with pytest.raises(InputError, match="invalid shard"):
        shard(items, 3, 3)


def test_merge_shards_dedupes_and_keeps_order(tmp_path: Path) -> None:
    a, b = ResultStore(tmp_path / "a.jsonl"), ResultStore(tmp_path / "b.jsonl")
    a.append([{"image_id": 0, "v": "a0"}, {"image_id": 2, "v": "a2"}])
    b.append([{"image_id": 1, "v": "b1"}, {"image_id": 2, "v": "b2"}, {"image_id": 3, "v": "b3"}])
    with open(b.path, "ab") as fh:
        fh.write(b'{"image_id": 5, "v"')  # torn tail in a shard is ignored, not copied
    out = tmp_path / "merged" / "all.jsonl"
    assert merge_shards([a.path, b.path], out) == 4
    assert [(r["image_id"], r["v"]) for r in _lines(out)] == [(0, "a0"), (2, "a2"), (1, "b1"), (3, "b3")]
    assert merge_shards([a.path, b.path], out, order=[3, 2, 1, 0]) == 4
    assert [r["image_id"] for r in _lines(out)] == [3, 2, 1, 0]
    assert not (out.parent / "all.jsonl.tmp").exists()
