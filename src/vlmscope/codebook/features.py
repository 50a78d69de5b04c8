"""Post-projector image features per batch row, computed through the model's own `get_image_features`.

The return type of `get_image_features` differs across transformers versions (5.x: an output object whose
`pooler_output` is a list of per-image tensors; 4.x: a list or a [B, L, D] tensor), so it is normalised here.
The features of each row are aligned with that row's image-token span: LLaVA-NeXT features are already packed
(base view, unpadded tiles, newline tokens) in the order of the placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmscope.errors import InputError, UnsupportedModelError
from vlmscope.models.adapters import Adapter, Batch, ImageGrid

SUPPORTED_FAMILIES = ("llava", "llava_next")


def check_family(adapter: Adapter, what: str) -> None:
    if adapter.family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{what} supports LLaVA-1.5 and LLaVA-NeXT models, not {adapter.family!r}"
        )


def _feature_list(output: Any) -> list[torch.Tensor]:
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, list | tuple) or isinstance(pooled, torch.Tensor):
        output = pooled
    if isinstance(output, torch.Tensor):
        return list(output) if output.dim() == 3 else [output]
    if isinstance(output, list | tuple) and all(isinstance(t, torch.Tensor) for t in output):
        return [t.reshape(-1, t.shape[-1]) for t in output]
    raise UnsupportedModelError(f"cannot read image features from {type(output).__name__}")


def image_features(model: Any, batch: Batch) -> list[torch.Tensor]:
    """One [span_len, D] tensor per row: what the model scatters into that row's image placeholders."""
    inputs = {k: v for k, v in batch.model_inputs.items() if k in ("pixel_values", "image_sizes")}
    if "pixel_values" not in inputs:
        raise InputError("the batch has no pixel values: encode the prompts with their images")
    with torch.no_grad():
        output = model.get_image_features(**inputs)
    features = torch.cat(_feature_list(output), dim=0)
    counts = batch.image_mask.sum(dim=1).tolist()
    if features.shape[0] != sum(counts):
        raise UnsupportedModelError(
            f"the model produced {features.shape[0]} image features for {sum(counts)} image tokens"
        )
    return list(features.split(counts, dim=0))


@dataclass(frozen=True)
class SpanLayout:
    """Which span positions of one row are image content (grid tokens) and which are separators (newlines)."""

    grids: tuple[ImageGrid, ...]
    content: np.ndarray  # span indices of grid tokens, in span order
    separators: np.ndarray  # span indices of everything else (LLaVA-NeXT's image_newline tokens)

    def locate(self, index: int) -> tuple[str, int, int]:
        """(grid name, row, col) of a content span index."""
        for grid in self.grids:
            hits = np.argwhere(grid.indices() == index)
            if len(hits):
                return grid.name, int(hits[0][0]), int(hits[0][1])
        raise KeyError(index)


def span_layout(adapter: Adapter, batch: Batch, row: int) -> SpanLayout:
    span_len = int(batch.image_mask[row].sum())
    grids = tuple(adapter.image_grids(batch, row))
    content = np.unique(np.concatenate([g.indices().ravel() for g in grids]))
    separators = np.setdiff1d(np.arange(span_len), content)
    return SpanLayout(grids, content, separators)
