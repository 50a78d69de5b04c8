"""The interventions on LLaVA-NeXT (any-resolution tiles with newline tokens) and Qwen2-VL (M-RoPE, merged grid)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions import INTERVENTIONS
from vlmscope.interventions.aai import vision_reference
from vlmscope.models.tiny import build_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def next_vlm() -> VLM:
    return VLM(*build_tiny("llava-next"), "tiny-llava-next")


@pytest.fixture(scope="module")
def qwen_vlm() -> VLM:
    return VLM(*build_tiny("qwen2-vl"), "tiny-qwen2-vl")


def _logits(vlm, batch, specs, tokens=(5, 6)):
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch,
                                        [INTERVENTIONS.parse(s) for s in specs]) as run:
        out = [run.prefill()]
        for tok in tokens:
            out.append(run.advance(torch.tensor([tok])))
    return out


def _received_attention(tower, crops):
    """Last CLIP layer written out by hand: head-mean softmax(q kᵀ/√d), CLS dropped, summed over queries."""
    with torch.no_grad():
        hidden = tower(crops, output_hidden_states=True).hidden_states[-2]
        layer = tower.encoder.layers[-1]
        x = layer.layer_norm1(hidden)
        b, t, _ = x.shape
        q = layer.self_attn.q_proj(x).view(b, t, layer.self_attn.num_heads, -1).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(b, t, layer.self_attn.num_heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(dim=1)
    return probs[:, 1:, 1:].sum(dim=1)


def test_next_aai_reference_follows_the_token_layout(next_vlm):
    batch = next_vlm.encode([_image(0)], ["describe this image ."])
    ref = vision_reference(next_vlm.model, next_vlm.adapter, batch)[0]
    assert ref.numel() == int(batch.image_mask.sum())
    base, tiles = next_vlm.adapter.image_grids(batch, 0)
    crops = batch.model_inputs["pixel_values"][0]
    received = _received_attention(next_vlm.adapter.vision_tower(), crops)
    # The base view comes first, row-major, from crop 0.
    torch.testing.assert_close(ref[torch.as_tensor(base.indices().ravel())], received[0], atol=1e-5, rtol=0)
    # Each tile row ends with a newline token whose value is the mean of the patch tokens, so r = 1 there.
    newline = torch.as_tensor(tiles.offset + np.arange(tiles.height) * tiles.row_stride + tiles.width)
    tile_tokens = torch.as_tensor(tiles.indices().ravel())
    patches = torch.cat([ref[torch.as_tensor(base.indices().ravel())], ref[tile_tokens]])
    torch.testing.assert_close(ref[newline], patches.mean().expand(len(newline)), atol=1e-6, rtol=0)
    torch.testing.assert_close(ref[newline] / ref.mean(), torch.ones(len(newline)), atol=1e-6, rtol=0)
    # Tile tokens carry values of the tile crops (1..n).
    pool = received[1:].flatten()
    assert all(bool(torch.isclose(pool, v, atol=1e-5).any()) for v in ref[tile_tokens])


def test_next_fastv_drop_equals_mask_and_aai_runs(next_vlm):
    batch = next_vlm.encode([_image(0)], ["describe this image ."])
    for extra in ([], ["aai:start=1,alpha=1,warmup=false"]):
        drop = _logits(next_vlm, batch, ["fastv:k=1,ratio=0.5", *extra])
        mask = _logits(next_vlm, batch, ["fastv:k=1,ratio=0.5,mode=mask", *extra])
        for d, m in zip(drop, mask):
            torch.testing.assert_close(d, m, atol=1e-5, rtol=0)


def test_qwen_fastv_drop_equals_mask(qwen_vlm):
    batch = qwen_vlm.encode([_image(0)], ["describe this image ."])
    drop = _logits(qwen_vlm, batch, ["fastv:k=1,ratio=0.5"])
    mask = _logits(qwen_vlm, batch, ["fastv:k=1,ratio=0.5,mode=mask"])
    plain = _logits(qwen_vlm, batch, [])
    for d, m in zip(drop, mask):
        torch.testing.assert_close(d, m, atol=1e-5, rtol=0)
    assert max((d - p).abs().max().item() for d, p in zip(drop, plain)) > 1e-4


def test_qwen_truncation_pai_cfg_and_aai(qwen_vlm):
    prompt = ["describe this image ."]
    cut = [qwen_vlm.generate([_image(s)], prompt, max_new_tokens=4, interventions="truncate:layer=0")[0]
           for s in (0, 1)]
    assert cut[0].token_ids == cut[1].token_ids and cut[0].scores == cut[1].scores
    results = qwen_vlm.generate([_image(0), _image(1)], ["describe this image .", "what is in the image ?"],
                                max_new_tokens=4, interventions=["pai:start=1,cfg=true,gamma=2"])
    assert all(len(r.token_ids) > 0 and np.all(np.isfinite(r.scores)) for r in results)
    with pytest.raises(InputError, match="no vision reference map"):
        qwen_vlm.generate([_image(0)], prompt, max_new_tokens=2, interventions="aai")
    uniform = qwen_vlm.generate([_image(0)], prompt, max_new_tokens=4,
                                interventions="aai:reference=uniform,start=1,warmup=false,alpha=0.5")[0]
    pai = qwen_vlm.generate([_image(0)], prompt, max_new_tokens=4, interventions="pai:start=1,alpha=0.5")[0]
    assert uniform.token_ids == pai.token_ids
