"""COCO image listing and the image selections of the seed repositories.

OPERA, PAI and AAI evaluate CHAIR on "the first 500 images of a ``random.shuffle``d val2014 listing" after
``random.seed(seed)`` (OPERA 42, PAI 927). `select_images` reproduces exactly that — ``random.Random(seed)``
gives the same sequence as the seeded global generator, *provided the shuffle is the first draw after
seeding*, as in those scripts. The listing is the part that is not portable: they shuffle ``os.listdir``
output, whose order depends on the file system. ``order="sorted"`` (default) sorts names first, which is
reproducible everywhere; ``order="listdir"`` keeps the directory order to reproduce a run on the same
machine. Only image files (`vlmscope.images.IMAGE_SUFFIXES`) are listed; the seed scripts list every entry,
which is the same for an unmodified val2014 folder.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from vlmscope.errors import InputError
from vlmscope.images import (
    IMAGE_SUFFIXES,
    parse_image_id,  # re-exported: eval callers import it from here
)

__all__ = ["coco_items", "list_coco_images", "parse_image_id", "read_image_ids", "select_images"]

def list_coco_images(data_dir: str | os.PathLike[str], order: str = "sorted") -> list[str]:
    """Image file names in `data_dir`, sorted (default) or in ``os.listdir`` order (``order="listdir"``)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}; pass the COCO val2014 folder")
    if order not in ("sorted", "listdir"):
        raise InputError(f"unknown order {order!r}; use 'sorted' or 'listdir'")
    names = [n for n in os.listdir(root) if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(names) if order == "sorted" else names


def select_images(files: Sequence[str], num_images: int | None = 500, seed: int | None = None) -> list[str]:
    """``random.seed(seed); random.shuffle(files); files[:num_images]`` without touching global state.

    ``seed=None`` keeps the given order; ``num_images=None`` keeps all.
    """
    chosen = list(files)
    if seed is not None:
        random.Random(seed).shuffle(chosen)
    if num_images is not None:
        if num_images < 0:
            raise InputError("num_images must be >= 0")
        chosen = chosen[:num_images]
    return chosen


def read_image_ids(path: str | os.PathLike[str]) -> list[int]:
    """Image ids from a file: one id or file name per line, a JSON list, or JSON lines with ``image_id``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image id file not found: {p}; check the path")
    text = p.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: invalid JSON ({exc.msg}); write a list of ids") from exc
    else:
        values = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    values.append(json.loads(line)["image_id"])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise InputError(f"{p}: line {lineno} is not an object with image_id; fix that line") from exc
            else:
                values.append(line)
    ids = []
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            ids.append(value)
        elif isinstance(value, str) and value.isdigit():
            ids.append(int(value))
        elif isinstance(value, str):
            ids.append(parse_image_id(value))
        else:
            raise InputError(f"{p}: {value!r} is not an image id; list integer ids or file names")
    return ids


def coco_items(
    data_dir: str | os.PathLike[str],
    num_images: int | None = 500,
    seed: int | None = None,
    ids_file: str | os.PathLike[str] | None = None,
    order: str = "sorted",
) -> list[tuple[int, str]]:
    """``[(image_id, image_path)]`` to evaluate: the ids in `ids_file` (in file order), or a seeded selection."""
    root = Path(data_dir)
    files = list_coco_images(root, order=order)
    if ids_file is not None:
        by_id = {parse_image_id(f): f for f in files}
        ids = read_image_ids(ids_file)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(f"{len(missing)} listed images are not in {root} (first: {missing[0]}); check the folder")
        chosen = [by_id[i] for i in ids][:num_images] if num_images is not None else [by_id[i] for i in ids]
    else:
        chosen = select_images(files, num_images, seed)
    return [(parse_image_id(f), str(root / f)) for f in chosen]
