"""The pointing game (vlmscope.explain.pointing): word maps against stock eager attention, peaks by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.errors import InputError
from vlmscope.explain.pointing import PointingTarget, peak_in_box, pointing_game, word_maps, word_position


def make_image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(3).rand(48, 48, 3) * 255).astype("uint8"))


def test_peak_in_box_by_hand() -> None:
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0
    # A square 64-pixel image covered by the grid: cell (1, 2) has its centre at x = 40, y = 24.
    assert peak_in_box(heat, (32, 16, 48, 32), 64)
    assert not peak_in_box(heat, (0, 0, 40, 64), 64)  # x1 is exclusive
    # An 80x40 image whose middle half (x 0.25..0.75) the grid covers: x = (0.25 + 2.5 / 4 * 0.5) * 80 = 45,
    # y = 1.5 / 4 * 40 = 15.
    assert peak_in_box(heat, (44, 14, 46, 16), (80, 40), (0.25, 0.0, 0.75, 1.0))
    assert not peak_in_box(heat, (44, 14, 46, 16), (80, 40))  # without the region the centre is x = 50


def test_word_maps_equal_stock_eager_attention_under_left_padding(tiny_llava: VLM) -> None:
    image = make_image()
    # Prompts of different lengths (the short one is left-padded) and a word that occurs twice in one.
    targets = [PointingTarget("cat", "is there a cat in the image ?", (0, 0, 24, 24)),
               PointingTarget("dog", "a dog", (24, 24, 48, 48)),
               PointingTarget("cat", "a cat or a cat ?", (0, 24, 24, 48))]
    layer_heads = [(0, 1), (2, 3), (3, 0)]
    maps, regions = word_maps(tiny_llava, image, targets, layer_heads)
    model = tiny_llava.model
    model.set_attn_implementation("eager")
    try:
        for target, got in zip(targets, maps):
            batch = tiny_llava.encode([image], [target.prompt])  # alone: no padding
            with torch.no_grad():
                attentions = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   **batch.model_inputs, output_attentions=True).attentions
            ids = batch.input_ids[0]
            position = int((ids == tiny_llava.adapter.tokenizer.convert_tokens_to_ids(target.word)).nonzero()[-1])
            columns = batch.image_mask[0].nonzero().flatten()
            for k, (layer, head) in enumerate(layer_heads):
                expected = attentions[layer][0, head, position, columns].reshape(4, 4).numpy()
                np.testing.assert_allclose(got[k], expected, atol=1e-5)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(regions) == 3


def test_pointing_game_counts_hits_per_head(tiny_llava: VLM) -> None:
    image = make_image()
    targets = [PointingTarget("cat", "a cat", (0, 0, 48, 48)), PointingTarget("dog", "a dog", (0, 0, 1, 1))]
    game = pointing_game(tiny_llava, [(image, targets)], [(1, 0), (2, 1)])
    maps, regions = word_maps(tiny_llava, image, targets, [(1, 0), (2, 1)])
    # The first box is the whole image (always a hit), the second one pixel: hand count from the maps.
    for k, head in enumerate([(1, 0), (2, 1)]):
        hits = 1 + peak_in_box(maps[1][k], (0, 0, 1, 1), image.size, regions[1])
        assert game["hit_rate"][head] == hits / 2
    assert game["n"] == 2 and game["best_rate"] == max(game["hit_rate"].values())


def test_bad_targets_are_one_line_errors(tiny_llava: VLM) -> None:
    with pytest.raises(InputError, match="'cow' is not in the prompt"):
        word_position(tiny_llava.adapter.tokenizer, [1, 2, 3], "cow")
    with pytest.raises(InputError, match="L9H0 is out of range"):
        word_maps(tiny_llava, make_image(), [PointingTarget("cat", "a cat", (0, 0, 1, 1))], [(9, 0)])
    with pytest.raises(InputError, match="no pointing targets"):
        pointing_game(tiny_llava, [(make_image(), [])], [(1, 0)])
