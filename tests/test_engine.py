"""The attention engine against stock eager attention (`output_attentions`) and stock SDPA."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmscope.attention.engine import (
    ATTN_KEY,
    AttentionPlan,
    Capture,
    active_plan,
    attention_plan,
    decoder_attention_modules,
)

PROMPTS = ["describe this image .", "what is in the image ?"]


@pytest.fixture(scope="module")
def setup(tiny_llava, images):
    batch = tiny_llava.encode(images, PROMPTS)  # left-padded batch of two
    eager = copy.deepcopy(tiny_llava.model)
    eager.set_attn_implementation({"text_config": "eager"})
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs)
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True)
        sdpa = tiny_llava.model(**inputs)
    return tiny_llava, batch, inputs, ref, sdpa


def run(model, plan, inputs):
    with torch.no_grad(), attention_plan(model, plan):
        return model(**inputs)


def test_padded_batch_really_padded(setup):
    _, batch, *_ = setup
    assert (batch.attention_mask == 0).any()


def test_idle_engine_equals_stock_sdpa(setup):
    vlm, _, inputs, _, sdpa = setup
    out = run(vlm.model, AttentionPlan(decoder_attention_modules(vlm.model)), inputs)
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(out.logits[mask], sdpa.logits[mask], atol=1e-5)


def test_capture_equals_stock_eager_attentions(setup):
    vlm, batch, inputs, ref, sdpa = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    captures = {layer: plan.add_capture(layer, Capture(rows="all")) for layer in (1, 3)}
    out = run(vlm.model, plan, inputs)
    mask = inputs["attention_mask"].bool()
    for layer, capture in captures.items():
        got = capture.records[0]
        expected = ref.attentions[layer]
        # Rows of padding positions are meaningless; compare the real query rows.
        for row in range(2):
            keep = mask[row]
            assert torch.allclose(got[row][:, keep][:, :, keep], expected[row][:, keep][:, :, keep], atol=1e-5)
    assert torch.allclose(out.logits[mask], sdpa.logits[mask], atol=1e-5)


def test_last_row_image_columns_and_head_selection(setup):
    vlm, batch, inputs, ref, _ = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    cap = plan.add_capture(2, Capture(rows="last", columns="image", heads=[1, 3]))
    cap_max = plan.add_capture(2, Capture(rows="last", columns="image", head_reduce="max"))
    run(vlm.model, plan, inputs)
    expected = torch.stack([ref.attentions[2][b, :, -1, batch.image_mask[b]] for b in range(2)])  # [B, H, 16]
    assert cap.records[0].shape == (2, 2, 1, 16)
    assert torch.allclose(cap.records[0][:, :, 0], expected[:, [1, 3]], atol=1e-6)
    assert torch.allclose(cap_max.records[0][:, 0, 0], expected.max(dim=1).values, atol=1e-6)


def test_last_row_fast_path_edit_is_exact(setup):
    """An identity edit takes the SDPA-prefix + eager-last-row path: logits must equal stock."""
    vlm, batch, inputs, ref, sdpa = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    seen = []

    def identity(logits, ctx):
        seen.append(logits.shape)
        return logits

    for layer in range(4):
        plan.add_edit(layer, identity)
    cap = plan.add_capture(0, Capture(rows="last"))
    out = run(vlm.model, plan, inputs)
    mask = inputs["attention_mask"].bool()
    assert all(shape[2] == 1 for shape in seen)  # only the last row ran eagerly
    assert torch.allclose(out.logits[mask], sdpa.logits[mask], atol=1e-5)
    assert torch.allclose(cap.records[0][:, :, 0], ref.attentions[0][:, :, -1], atol=1e-6)


def test_key_mask_equals_stock_padding_mask(setup):
    """Blocking image keys in every layer = stock model with those keys marked as padding."""
    vlm, batch, inputs, _, _ = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    for layer in range(4):
        plan.add_key_mask(layer, lambda ctx: ctx.image_keys)
    out = run(vlm.model, plan, inputs)
    masked = dict(inputs)
    masked["attention_mask"] = inputs["attention_mask"] * (~batch.image_mask).long()
    with torch.no_grad():
        ref = vlm.model(**masked)
    assert torch.allclose(out.logits[:, -1], ref.logits[:, -1], atol=1e-5)


def test_edit_changes_output_and_context(setup):
    vlm, batch, inputs, _, sdpa = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    contexts = []

    def boost(logits, ctx):
        contexts.append(ctx)
        return logits + 5.0 * ctx.image_keys[:, None, None, :].float()

    plan.add_edit(1, boost)
    out = run(vlm.model, plan, inputs)
    assert not torch.allclose(out.logits[:, -1], sdpa.logits[:, -1], atol=1e-3)
    assert contexts[0].layer_idx == 1 and contexts[0].is_prefill
    assert contexts[0].image_keys.shape == batch.image_mask.shape


def test_state_restored_after_exception(tiny_llava, images):
    model = tiny_llava.model
    before = model.config.text_config._attn_implementation
    plan = AttentionPlan(decoder_attention_modules(model))

    def explode(logits, ctx):
        raise RuntimeError("boom")

    plan.add_edit(0, explode)
    batch = tiny_llava.encode(images[:1], PROMPTS[:1])
    with pytest.raises(RuntimeError, match="boom"), attention_plan(model, plan):
        assert model.config.text_config._attn_implementation == ATTN_KEY
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs)
    assert model.config.text_config._attn_implementation == before
    assert active_plan() is None


def test_plan_of_another_model_is_ignored(tiny_llava, images):
    """A plan owns its model's modules: a second model in the same context runs untouched."""
    from vlmscope.models.tiny import build_tiny

    other, _ = build_tiny("llava", seed=1)
    batch = tiny_llava.encode(images[:1], PROMPTS[:1])
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs)
    with torch.no_grad():
        ref = other(**inputs).logits
    plan = AttentionPlan(decoder_attention_modules(tiny_llava.model))
    plan.add_edit(0, lambda logits, ctx: logits * 0)
    other.set_attn_implementation({"text_config": ATTN_KEY})
    try:
        with torch.no_grad(), attention_plan(tiny_llava.model, plan):
            got = other(**inputs).logits
    finally:
        other.set_attn_implementation({"text_config": "sdpa"})
    assert torch.allclose(got, ref, atol=1e-5)
