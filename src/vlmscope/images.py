"""Reading images and listing image folders, with errors that say what to fix (the one suffix list)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

# What counts as an image file everywhere (heads, codebook building, COCO folders).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(name: str | Path) -> bool:
    return str(name).lower().endswith(IMAGE_SUFFIXES)


def list_image_files(directory: str | Path) -> list[Path]:
    """The image files of a directory, sorted by name; InputError when it is missing or holds none."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise InputError(f"image directory not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p.name))
    if not files:
        raise InputError(f"no images in {path}: it holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(image: Any) -> Any:
    """A PIL image (RGB) from a PIL image, a path, or a numpy array."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read image {path}: corrupt or not an image ({exc.__class__.__name__})") from None
    try:
        import numpy as np

        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
    except ImportError:  # pragma: no cover
        pass
    if image is None:
        raise InputError("no image given: every prompt needs an image")
    raise InputError(f"cannot use {type(image).__name__} as an image: pass a path or a PIL image")


# COCO file names: shared by eval (image selection) and explain (localization heads on COCO boxes).
_ID_RE = re.compile(r"(?:^|_)(\d+)(?:" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$", re.IGNORECASE)


def parse_image_id(name: str | os.PathLike[str]) -> int:
    """Image id from ``COCO_val2014_000000391895.jpg`` (or 2017-style ``000000391895.jpg``)."""
    match = _ID_RE.search(Path(name).name)
    if not match:
        raise InputError(f"cannot read a COCO image id from {Path(name).name!r}; name files like COCO_val2014_000000123456.jpg")
    return int(match.group(1))
