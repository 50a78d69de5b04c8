"""Pointing game: does a head's attention from a word land on the object the word names?

For every target (a word, the prompt that contains it, the object's box in the image), one prefill captures the
attention of the word's token to the image tokens at the chosen (layer, head) pairs, laid out on the first image
grid (`word_maps`). A head scores a hit when the centre of its map's highest cell lies inside the object's box
(`peak_in_box`); `pointing_game` reports each head's hit rate over all targets. The word's position is the last
occurrence of its token(s) in the prompt, so a prompt that names the object once is unambiguous.

Worlds with ground-truth boxes (`vlmscope.shapes`) build the targets; nothing here knows about them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmscope.attention.engine import AttentionPlan, Capture, decoder_attention_modules
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.images import load_image

Box = tuple[float, float, float, float]
Region = tuple[float, float, float, float]


@dataclass(frozen=True)
class PointingTarget:
    """A word of `prompt` that names the object inside `box` (image pixels x0, y0, x1, y1; x1/y1 exclusive)."""

    word: str
    prompt: str
    box: Box


def word_position(tokenizer: Any, input_ids: Sequence[int], word: str) -> int:
    """Position of the last token of the last occurrence of `word` in `input_ids`."""
    ids = list(input_ids)
    candidates: list[list[int]] = []
    single = tokenizer.convert_tokens_to_ids(word)
    if isinstance(single, int) and single != tokenizer.unk_token_id:
        candidates.append([single])
    for text in (word, " " + word):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if pieces and pieces not in candidates:
            candidates.append(list(pieces))
    best = -1
    for pieces in candidates:
        n = len(pieces)
        for start in range(len(ids) - n, -1, -1):
            if ids[start:start + n] == pieces:
                best = max(best, start + n - 1)
                break
    if best < 0:
        raise InputError(f"the word {word!r} is not in the prompt: a pointing target's word must appear in it")
    return best


def word_maps(vlm: Any, image: Any, targets: Sequence[PointingTarget],
              layer_heads: Sequence[tuple[int, int]]) -> tuple[list[np.ndarray], list[Region]]:
    """For every target, the attention of its word to the image at each (layer, head):
    `[len(layer_heads), grid_h, grid_w]` on the first image grid, and the fraction box of the image that grid
    covers. One batched prefill over the targets' prompts (same image), captured by the attention engine
    (every row, image columns, chosen layers only)."""
    if not targets:
        return [], []
    if not layer_heads:
        raise InputError("no (layer, head) pairs given: name at least one head to score")
    adapter = vlm.adapter
    for layer, head in layer_heads:
        if not (0 <= layer < adapter.num_layers and 0 <= head < adapter.num_heads):
            raise InputError(f"head L{layer}H{head} is out of range: the model has {adapter.num_layers} layers of "
                             f"{adapter.num_heads} heads")
    pil = load_image(image)
    batch = vlm.encode([pil] * len(targets), [t.prompt for t in targets])
    layers = sorted({layer for layer, _ in layer_heads})
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    captures = {layer: plan.add_capture(layer, Capture(rows="all", columns="image", to_cpu=True)) for layer in layers}
    with torch.no_grad(), GenerationRun(vlm.model, adapter, batch, (), capture_plan=plan) as run:
        run.prefill()
    out, regions = [], []
    for row, target in enumerate(targets):
        valid = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        # Left padding: the row's real tokens are its last len(valid) positions.
        position = batch.input_ids.shape[1] - len(valid) + word_position(adapter.tokenizer, valid, target.word)
        grid = adapter.image_grids(batch, row)[0]
        out.append(np.stack([grid.take(captures[layer].records[0][row, head, position].float().numpy())
                             for layer, head in layer_heads]))
        regions.append(tuple(grid.region))
    return out, regions


def peak_in_box(attn_map: np.ndarray, box: Box, image_size: int | tuple[int, int],
                region: Region = (0.0, 0.0, 1.0, 1.0)) -> bool:
    """Whether the centre of the map's highest cell lies inside `box`. The map covers the fraction box `region`
    of an image of `image_size` pixels (an int for a square image, or (width, height))."""
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    rows, cols = attn_map.shape
    r, c = np.unravel_index(int(np.argmax(attn_map)), attn_map.shape)
    rx0, ry0, rx1, ry1 = region
    x = (rx0 + (c + 0.5) / cols * (rx1 - rx0)) * width
    y = (ry0 + (r + 0.5) / rows * (ry1 - ry0)) * height
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def pointing_game(vlm: Any, items: Sequence[tuple[Any, Sequence[PointingTarget]]],
                  layer_heads: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Hit rate of each (layer, head) over every target of `items` [(image, targets)]: how often the peak of the
    word's map falls inside the box of its object. Returns {"n", "hit_rate": {(layer, head): rate}, "best",
    "best_rate"}."""
    hits = np.zeros(len(layer_heads))
    total = 0
    for image, targets in items:
        pil = load_image(image)
        all_maps, regions = word_maps(vlm, pil, targets, layer_heads)
        for target, maps, region in zip(targets, all_maps, regions):
            hits += [peak_in_box(m, target.box, pil.size, region) for m in maps]
            total += 1
    if total == 0:
        raise InputError("no pointing targets: give at least one (image, targets) item with a target")
    rates = {tuple(lh): float(h / total) for lh, h in zip(layer_heads, hits)}
    best = max(rates, key=lambda lh: rates[lh])
    return {"n": total, "hit_rate": rates, "best": best, "best_rate": rates[best]}
