"""Localization heads scored against COCO boxes: pointing game and IoU, checked against pointing.peak_in_box
and cell-by-cell hand computations on a COCO-format instances file written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmscope
from vlmscope.cli import main as cli_main
from vlmscope.errors import InputError
from vlmscope.explain.coco_heads import box_cells, map_iou, read_boxes, score_on_coco
from vlmscope.explain.pointing import PointingTarget, peak_in_box, word_maps

TEMPLATE = "Where is the {word} in the image?"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.RandomState(0)
    images = []
    for i, size in ((1, (64, 48)), (2, (48, 48)), (3, (40, 40))):
        path = root / f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
        images.append(path)
    (root / "annotations").mkdir()
    instances = {
        "images": [{"id": 1, "file_name": images[0].name}, {"id": 2, "file_name": images[1].name}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
        "annotations": [{"image_id": 1, "category_id": 18, "bbox": [0, 0, 30, 20]},
                        {"image_id": 1, "category_id": 18, "bbox": [40, 30, 20, 18]},
                        {"image_id": 1, "category_id": 17, "bbox": [10, 10, 40, 30]},
                        {"image_id": 2, "category_id": 17, "bbox": [24, 0, 24, 48]}],
    }
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(instances))
    return root / "annotations", images  # image 3 has no annotations: skipped


def test_read_boxes_converts_xywh(coco) -> None:
    boxes = read_boxes(coco[0])
    assert boxes["COCO_val2014_000000000001.jpg"]["dog"] == [(0, 0, 30, 20), (40, 30, 60, 48)]
    assert boxes["COCO_val2014_000000000002.jpg"] == {"cat": [(24, 0, 48, 48)]}


def test_box_cells_by_hand() -> None:
    # A 2×4 grid over a 40×20 image: cell centres x = 5, 15, 25, 35 and y = 5, 15.
    cells = box_cells([(10, 0, 30, 10)], (2, 4), (40, 20))
    assert cells.tolist() == [[False, True, True, False], [False, False, False, False]]
    attn = np.array([[0.0, 0.9, 0.05, 0.0], [0.0, 0.0, 0.05, 0.0]])
    assert map_iou(attn, cells) == pytest.approx(1 / 2)  # above 2·mean: only cell (0, 1); truth 2 cells


def test_scores_equal_peak_in_box_and_hand_iou(tiny_llava, coco) -> None:
    annotations, images = coco
    heads = [(1, 0), (2, 3), (3, 1)]
    scores = score_on_coco(tiny_llava, images, annotations, heads, TEMPLATE)
    assert scores["n"] == 3 and scores["images"] == 2
    boxes = read_boxes(annotations)
    hits, ious = np.zeros(3), np.zeros(3)
    for path in images[:2]:
        image = Image.open(path)
        for category, cat_boxes in sorted(boxes[path.name].items()):
            maps, regions = word_maps(tiny_llava, image, [PointingTarget(category, TEMPLATE.format(word=category),
                                                                         cat_boxes[0])], heads)
            for k, attn in enumerate(maps[0]):
                hits[k] += any(peak_in_box(attn, box, image.size, regions[0]) for box in cat_boxes)
                rows, cols = attn.shape
                x0, y0, x1, y1 = regions[0]
                inter = union = 0
                for r in range(rows):
                    for c in range(cols):
                        x = (x0 + (c + 0.5) / cols * (x1 - x0)) * image.width
                        y = (y0 + (r + 0.5) / rows * (y1 - y0)) * image.height
                        truth = any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in cat_boxes)
                        predicted = attn[r, c] > 2 * attn.mean()
                        inter += truth and predicted
                        union += truth or predicted
                ious[k] += inter / union if union else 0.0
    assert hits.sum() > 0 and ious.sum() > 0  # not a comparison of zeros
    assert [scores["pointing"][h] for h in heads] == pytest.approx(list(hits / 3))
    assert [scores["iou"][h] for h in heads] == pytest.approx(list(ious / 3))


def test_no_annotated_image_is_refused(tiny_llava, coco) -> None:
    with pytest.raises(InputError, match="none of the images"):
        score_on_coco(tiny_llava, coco[1][2:], coco[0], [(1, 0)])


def test_cli_heads_with_coco_annotations(coco, tmp_path, capsys) -> None:
    annotations, images = coco
    folder = images[0].parent
    out = tmp_path / "heads"
    assert cli_main(["heads", "--model", "tiny-llava", "--images", str(folder), "--prompt", "the dog",
                     "--top", "2", "--coco-annotations", str(annotations.parent), "--out", str(out)]) == 0
    assert "COCO boxes: 3 (image, category) targets in 2 image(s)" in capsys.readouterr().out
    ranking = vlmscope.load_result(out)
    assert ranking.ranking and all(0 <= row["coco_pointing"] <= 1 and row["coco_targets"] == 3
                                   for row in ranking.ranking)
