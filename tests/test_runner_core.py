"""Evaluation runners with fake model callables; COCO image listing and seeded selection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlmscope.errors import InputError
from vlmscope.eval.coco import coco_items, list_coco_images, parse_image_id, read_image_ids, select_images
from vlmscope.eval.runner import metrics_markdown, run_chair, run_pope
from vlmscope.eval.store import ResultStore

IDS = [42, 7, 139, 285, 632, 724]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "val2014"
    root.mkdir()
    for i, imid in enumerate(IDS):
        Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(root / f"COCO_val2014_{imid:012d}.jpg")
    (root / "README.txt").write_text("not an image")
    return root


def test_parse_image_id() -> None:
    assert parse_image_id("COCO_val2014_000000391895.jpg") == 391895
    assert parse_image_id("/data/val2017/000000000139.jpg") == 139
    with pytest.raises(InputError, match="cannot read a COCO image id"):
        parse_image_id("cat.jpg")


def test_listing_and_seeded_selection_reproduce_the_seed_scripts(image_dir: Path) -> None:
    files = list_coco_images(image_dir)
    assert files == sorted(f"COCO_val2014_{i:012d}.jpg" for i in IDS)
    assert sorted(list_coco_images(image_dir, order="listdir")) == files
    # The seed repositories: random.seed(seed); random.shuffle(listing); listing[:n]
    state = random.getstate()
    try:
        expected = list(files)
        random.seed(927)
        random.shuffle(expected)
    finally:
        random.setstate(state)
    before = random.getstate()
    assert select_images(files, 4, seed=927) == expected[:4]
    assert random.getstate() == before  # the global generator is left alone
    assert select_images(files, None, seed=None) == files


def test_coco_items_from_selection_or_id_file(image_dir: Path, tmp_path: Path) -> None:
    items = coco_items(image_dir, num_images=3, seed=0)
    assert len(items) == 3 and all(Path(p).name == f"COCO_val2014_{i:012d}.jpg" for i, p in items)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("139\nCOCO_val2014_000000000007.jpg\n\n42\n")
    assert read_image_ids(ids_file) == [139, 7, 42]
    assert [i for i, _ in coco_items(image_dir, num_images=None, ids_file=ids_file)] == [139, 7, 42]
    ids_file.write_text("[139, 99]")
    with pytest.raises(InputError, match="not in"):
        coco_items(image_dir, ids_file=ids_file)
    with pytest.raises(InputError, match="image folder not found"):
        list_coco_images(tmp_path / "nope")


CAPTIONS = {
    42: "A dog and a man.",  # correct
    7: "A cat on a couch.",  # couch hallucinated
    139: "A car.",  # correct
    285: "A bus and a truck.",  # truck hallucinated
    632: "Nothing to see.",  # no mention
    724: "A horse.",  # correct
}
GT = {42: {"dog", "person"}, 7: {"cat"}, 139: {"car", "bus"}, 285: {"bus"}, 632: {"bed"}, 724: {"horse"}}


class FakeCaptioner:
    """Reads each image (they must be real JPEGs) and returns the canned caption; can crash after n calls."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.seen: list[int] = []
        self.crash_after = crash_after

    def __call__(self, paths: list[str]) -> list[str]:
        out = []
        for path in paths:
            if self.crash_after is not None and len(self.seen) >= self.crash_after:
                raise KeyboardInterrupt  # the run dies mid-way
            with Image.open(path) as img:
                assert img.size == (4, 4)
            imid = parse_image_id(path)
            self.seen.append(imid)
            out.append(CAPTIONS[imid])
        return out


def test_run_chair_resumes_and_writes_metrics(image_dir: Path, tmp_path: Path) -> None:
    items = coco_items(image_dir, num_images=None, seed=3)
    run_dir = tmp_path / "run"
    first = FakeCaptioner(crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_chair(items, first, run_dir / "captions.jsonl", batch_size=2, progress=False, gt_objects=GT)
    # Batches of two: the first complete batch is stored, the interrupted one is not.
    assert len(ResultStore(run_dir / "captions.jsonl")) == 2
    second = FakeCaptioner()
    payload = run_chair(items, second, run_dir / "captions.jsonl", batch_size=2, progress=False, gt_objects=GT)
    assert sorted(second.seen) == sorted(set(IDS) - set(first.seen[:2]))
    rows = [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in rows) == sorted(IDS)
    m = payload["metrics"]
    # mentions: [dog, person], [cat, couch*], [car], [bus, truck*], [], [horse] → 2 of 8 hallucinated
    assert m["CHAIR_S"] == pytest.approx(100 * 2 / 6)
    assert m["CHAIR_I"] == pytest.approx(100 * 2 / 8)
    assert m["Recall"] == pytest.approx(100 * (2 + 1 + 1 + 1 + 0 + 1) / (2 + 1 + 2 + 1 + 1 + 1))
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["metrics"] == m and saved["task"] == "chair" and saved["n_items"] == 6
    md = (run_dir / "metrics.md").read_text()
    assert "| run | CHAIR_S | CHAIR_I | Recall | Len | Precision | F1 |" in md and "| 33.3 | 25.0 |" in md
    # A third run has nothing left to caption.
    third = FakeCaptioner()
    run_chair(items, third, run_dir / "captions.jsonl", progress=False, gt_objects=GT)
    assert third.seen == []


def test_run_chair_rejects_a_wrong_number_of_captions(image_dir: Path, tmp_path: Path) -> None:
    items = coco_items(image_dir, num_images=2, seed=0)
    with pytest.raises(ValueError, match="returned 1 captions for 2"):
        run_chair(items, lambda paths: ["x"], tmp_path / "c.jsonl", batch_size=2, progress=False, gt_objects=GT)


def _questions() -> list[dict]:
    qs = []
    for split in ("random", "adversarial"):
        for k, (obj, label) in enumerate([("dog", "yes"), ("cat", "no"), ("person", "yes"), ("bus", "no")]):
            img = "COCO_val2014_000000000042.jpg" if k < 2 else "COCO_val2014_000000000007.jpg"
            qs.append({"question_id": k + 1, "image": img, "text": f"Is there a {obj} in the image?", "label": label, "split": split})
    return qs


def test_run_pope_across_splits_with_resume(image_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def answer(pairs: list[tuple[str, str]]) -> list[str]:
        calls.extend(pairs)
        for path, _ in pairs:
            assert Path(path).is_file()
        # Says yes to everything about dogs, cats and people, no otherwise.
        return ["Yes." if any(w in q for w in ("dog", "cat", "person")) else "No." for _, q in pairs]

    store = tmp_path / "pope" / "answers.jsonl"
    # A previous run answered the first three questions of the random split.
    first = ResultStore(store, key="qkey")
    first.append({**q, "qkey": f"random:{q['question_id']}", "answer": "Yes"} for q in _questions()[:3])
    payload = run_pope(_questions(), answer, store, batch_size=3, progress=False, image_root=image_dir)
    assert len(calls) == 5
    r, a = payload["splits"]["random"], payload["splits"]["adversarial"]
    # random: stored yes, yes, yes + new "No." (bus) vs labels yes no yes no → TP 2, FP 1, TN 1
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 1, 0)
    # adversarial: yes(dog) yes(cat) yes(person) no(bus) → same counts
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (2, 1, 1, 0)
    assert payload["metrics"]["Accuracy"] == 75.0 and payload["metrics"]["Yes_ratio"] == 75.0
    assert payload["metrics"]["random/F1"] == pytest.approx(80.0)
    assert json.loads((tmp_path / "pope" / "metrics.json").read_text())["settings"] == {"rule": "official"}
    assert len(ResultStore(store, key="qkey")) == 8


def test_run_pope_refuses_colliding_keys(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "a.jsonl", key="question_id")
    with pytest.raises(InputError, match="key the store by 'qkey'"):
        run_pope(_questions(), lambda pairs: ["yes"] * len(pairs), store, progress=False)


def test_metrics_markdown_table() -> None:
    table = metrics_markdown([("a", {"X": 1.234, "Y": 2}), ("b", {"Y": 3.0})])
    assert table.splitlines() == ["| run | X | Y |", "|---|---:|---:|", "| a | 1.2 | 2 |", "| b |  | 3.0 |"]
