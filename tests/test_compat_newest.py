"""Compatibility subset: every tiny family loads, generates, is steered and explained on the installed transformers.

scripts/compat.sh runs this file in a second environment holding the newest transformers 5.x release (the main
suite runs it on the pinned one). Oracles: stock `AutoModelForImageTextToText` weights, stock greedy `generate`
and stock eager attention; each test is small so the whole file stays well under a minute per environment.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vlmscope
from vlmscope.explain.maps import carry_queries_to_patches, explain
from vlmscope.models.tiny import ARCHS, VIDEO_PROCESSORS, save_tiny

PROMPT = "describe this image ."
# The tiny Gemma 3's one full-attention layer: PAI and explain are refused on its sliding-window layers.
_LAYER = {"gemma3": 2}


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=ARCHS)
def saved(request, tmp_path_factory) -> tuple[str, object]:
    arch = request.param
    out = save_tiny(arch, tmp_path_factory.mktemp(arch.replace("-", "_")) / "model", seed=1)
    return arch, vlmscope.load(str(out), device="cpu"), out


def _stock_greedy(vlm, image: Image.Image, steps: int, output_attentions: bool = False):
    batch = vlm.encode([image], [PROMPT])
    with torch.no_grad():
        out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 **batch.model_inputs, max_new_tokens=steps, do_sample=False,
                                 output_attentions=output_attentions, return_dict_in_generate=True)
    return batch, out, out.sequences[0, batch.input_ids.shape[1]:].tolist()


def test_loads_like_the_stock_auto_class(saved):
    arch, vlm, out = saved
    stock = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(stock) is type(vlm.model)
    ours = vlm.model.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_video_processor_is_named_so_stock_auto_processor_gets_past_the_config(saved):
    arch, _, out = saved
    config = json.loads((out / "processor_config.json").read_text())
    if arch not in VIDEO_PROCESSORS:
        assert "video_processor" not in config
        return
    video = config["video_processor"]
    assert video["video_processor_type"] == VIDEO_PROCESSORS[arch]
    assert hasattr(transformers, video["video_processor_type"])  # a stock class of this release
    image = config["image_processor"]
    assert {k: image[k] for k in ("size", "image_mean", "image_std") if k in image} == {
        k: video[k] for k in ("size", "image_mean", "image_std") if k in image}
    if transformers.utils.is_torchvision_available():
        processor = transformers.AutoProcessor.from_pretrained(out)
        assert type(processor.video_processor).__name__ == VIDEO_PROCESSORS[arch]
    else:
        # Without torchvision the stock loader now stops at transformers' own dependency check, not at a
        # missing config ("Can't load video processor"), which was the bug.
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            transformers.AutoProcessor.from_pretrained(out)


def test_greedy_equals_stock_generate(saved):
    _, vlm, _ = saved
    result = vlm.generate(_image(), PROMPT, max_new_tokens=6)
    _, _, ref = _stock_greedy(vlm, _image(), 6)
    assert result.token_ids == ref


def test_pai_steers_and_leaves_the_model_as_it_was(saved):
    arch, vlm, _ = saved
    layer = _LAYER.get(arch, 0)
    plain = vlm.generate(_image(), PROMPT, max_new_tokens=4)
    steered = vlm.generate(_image(), PROMPT, max_new_tokens=4,
                           interventions=f"pai:alpha=2.0,start={layer},end={layer + 1}")
    assert steered.scores[0] != pytest.approx(plain.scores[0], abs=1e-6)  # the hook reached the model
    again = vlm.generate(_image(), PROMPT, max_new_tokens=4)
    assert again.token_ids == plain.token_ids and again.scores == pytest.approx(plain.scores, abs=1e-6)


def test_explain_maps_equal_stock_eager_attention(saved):
    arch, vlm, _ = saved
    layer = _LAYER.get(arch, 1)
    result = explain(vlm, _image(), PROMPT, layers=str(layer), max_new_tokens=2)
    previous = vlm.model.config.text_config._attn_implementation
    vlm.model.set_attn_implementation("eager")
    try:
        batch, out, tokens = _stock_greedy(vlm, _image(), 2, output_attentions=True)
    finally:
        vlm.model.set_attn_implementation(previous)
    assert result.token_ids == tokens
    cols = batch.image_mask[0].nonzero().flatten()
    stock = np.stack([np.stack([a[0, :, -1, cols].float().numpy() for a in out.attentions[s]])
                      for s in range(len(tokens))])
    stock = stock[:, [layer]]
    grids = vlm.adapter.image_grids(batch, 0)
    if hasattr(vlm.adapter, "query_patch_attention"):
        # Q-Former families: the image columns are the queries, carried to the ViT patches as explain does
        # (test_seed_models.py checks that carrying).
        stock = carry_queries_to_patches(stock, vlm.adapter.query_patch_attention(batch)[0].cpu().numpy())
        grids = [vlm.adapter.patch_grid()]
    assert grids
    for grid in grids:
        np.testing.assert_allclose(result.grid_maps[grid.name], grid.take(stock), atol=1e-5)
