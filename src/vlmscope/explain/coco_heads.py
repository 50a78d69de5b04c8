"""Localization heads scored on real annotations: pointing game and IoU of head maps against COCO boxes.

For every image with COCO instance annotations and every category annotated in it, one target: the prompt
`template` with the category name (default "Where is the {word} in the image?"), whose word's attention to
the image at each scored (layer, head) is captured (`vlmscope.explain.pointing.word_maps`). Per head and target:

- **pointing game**: hit when the centre of the map's highest cell lies inside *any* box of that category;
- **IoU** on the image grid: the cells with value > 2 · mean of the map (the binarisation of the spatial
  entropy criterion, Kang et al. 2025) against the cells whose centre lies inside any box of the category.

Boxes come from `instances_*.json` (COCO format: `bbox` = [x, y, width, height] in pixels); images are matched
to annotations by file name, else by the id in a COCO file name (COCO_val2014_000000000139.jpg).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmscope.errors import InputError
from vlmscope.explain.pointing import PointingTarget, word_maps
from vlmscope.images import load_image

DEFAULT_TEMPLATE = "Where is the {word} in the image?"
Box = tuple[float, float, float, float]


def instance_files(annotations: str | Path) -> list[Path]:
    root = Path(annotations)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"--coco-annotations {root} does not exist: give the COCO annotations folder")
    files = sorted(root.glob("instances_*.json")) or sorted(root.glob("annotations/instances_*.json"))
    if not files:
        raise InputError(f"{root} has no instances_*.json: give the folder of the COCO instance annotations")
    return files


def read_boxes(annotations: str | Path) -> dict[str, dict[str, list[Box]]]:
    """{image file name: {category name: [boxes (x0, y0, x1, y1) in pixels]}} from COCO instance files."""
    out: dict[str, dict[str, list[Box]]] = {}
    for path in instance_files(annotations):
        try:
            data = json.loads(path.read_text())
            names = {c["id"]: c["name"] for c in data["categories"]}
            files = {im["id"]: im["file_name"] for im in data["images"]}
            for ann in data["annotations"]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                per_image = out.setdefault(files[ann["image_id"]], {})
                per_image.setdefault(names[ann["category_id"]], []).append((x, y, x + w, y + h))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path} is not a COCO instances file ({type(err).__name__}: {err})") from None
    return out


def _boxes_for(image: Any, boxes: dict[str, dict[str, list[Box]]]) -> dict[str, list[Box]]:
    name = Path(str(image)).name
    if name in boxes:
        return boxes[name]
    from vlmscope.images import parse_image_id

    try:
        image_id = parse_image_id(name)
    except (InputError, ValueError):
        return {}
    for file_name, per_image in boxes.items():
        try:
            if parse_image_id(file_name) == image_id:
                return per_image
        except (InputError, ValueError):
            continue
    return {}


def box_cells(boxes: Sequence[Box], shape: tuple[int, int], image_size: tuple[int, int],
              region: Sequence[float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean grid: cells whose centre lies inside any of `boxes` (the grid covers `region` of the image)."""
    rows, cols = shape
    width, height = image_size
    rx0, ry0, rx1, ry1 = region
    xs = (rx0 + (np.arange(cols) + 0.5) / cols * (rx1 - rx0)) * width
    ys = (ry0 + (np.arange(rows) + 0.5) / rows * (ry1 - ry0)) * height
    inside = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((ys[:, None] >= y0) & (ys[:, None] < y1)) & ((xs[None, :] >= x0) & (xs[None, :] < x1))
    return inside


def map_iou(attn_map: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the cells above twice the map's mean with `truth` (0 when both are empty)."""
    predicted = attn_map > 2 * attn_map.mean()
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 0.0


def score_on_coco(vlm: Any, images: Sequence[Any], annotations: str | Path,
                  layer_heads: Sequence[tuple[int, int]], template: str = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """Pointing-game hit rate and mean IoU of each (layer, head) over every (image, category) target.

    Returns {"n": targets, "images": images with annotations, "pointing": {(l, h): rate}, "iou": {(l, h):
    mean}}; images without annotations are skipped (an error if none has any)."""
    if "{word}" not in template:
        raise InputError("the prompt template needs {word} where the category name goes")
    boxes = read_boxes(annotations)
    hits = np.zeros(len(layer_heads))
    ious = np.zeros(len(layer_heads))
    total, used = 0, 0
    for image in images:
        per_category = _boxes_for(image, boxes)
        if not per_category:
            continue
        used += 1
        pil = load_image(image)
        categories = sorted(per_category)
        # PointingTarget's box is unused here: a hit counts against any box of the category.
        targets = [PointingTarget(c, template.format(word=c), per_category[c][0]) for c in categories]
        maps, regions = word_maps(vlm, pil, targets, layer_heads)
        for category, head_maps, region in zip(categories, maps, regions):
            truth = box_cells(per_category[category], head_maps.shape[1:], pil.size, region)
            for k, attn in enumerate(head_maps):
                r, c = np.unravel_index(int(np.argmax(attn)), attn.shape)
                hits[k] += bool(truth[r, c])
                ious[k] += map_iou(attn, truth)
            total += 1
    if total == 0:
        raise InputError("none of the images has COCO instance annotations: check --coco-annotations and the "
                         "image file names")
    return {"n": total, "images": used,
            "pointing": {tuple(lh): float(h / total) for lh, h in zip(layer_heads, hits)},
            "iou": {tuple(lh): float(v / total) for lh, v in zip(layer_heads, ious)}}
