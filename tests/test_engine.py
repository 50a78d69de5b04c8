"""The attention engine against stock eager attention (`output_attentions`) and stock SDPA."""

from __future__ import annotations

import copy
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vlmscope.attention.engine import (
    ATTN_KEY,
    AttentionPlan,
    Capture,
    active_plan,
    attention_plan,
    decoder_attention_modules,
    engine_users,
    vlmscope_attention,
)
from vlmscope.errors import UnsupportedModelError

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


@pytest.mark.parametrize("eager", [False, True])
def test_key_mask_equals_stock_padding_mask(setup, eager):
    """Blocking image keys in every layer = stock model with those keys marked as padding, on both paths:
    key masks alone (folded into the SDPA mask) and key masks beside an edit (eager math on every row)."""
    vlm, batch, inputs, _, _ = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    for layer in range(4):
        plan.add_key_mask(layer, lambda ctx: ctx.image_keys)
        if eager:
            plan.add_edit(layer, lambda logits, ctx: logits, last_row_only=False)
    out = run(vlm.model, plan, inputs)
    assert plan.calls == 4
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


def test_plan_of_another_model_is_ignored_and_reported(tiny_llava, images):
    """A plan owns its model's modules: a second model in the same context runs untouched, and the plan's
    operations that never ran raise on exit (naming the model class and the layers) instead of passing."""
    from vlmscope.models.tiny import build_tiny

    other, _ = build_tiny("llava", seed=1)
    batch = tiny_llava.encode(images[:1], PROMPTS[:1])
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs)
    with torch.no_grad():
        ref = other(**inputs).logits
    plan = AttentionPlan(decoder_attention_modules(tiny_llava.model))
    plan.add_edit(0, lambda logits, ctx: logits * 0)
    with pytest.raises(UnsupportedModelError, match=r"LlavaForConditionalGeneration.*layers \[0\] never ran"):
        with torch.no_grad(), attention_plan(other, plan):
            got = other(**inputs).logits
    assert torch.allclose(got, ref, atol=1e-5)
    assert other.config.text_config._attn_implementation == "sdpa"
    assert active_plan() is None


# --- the engine never silently does nothing ------------------------------------------------------------------


@pytest.fixture()
def cannot_switch(monkeypatch, tiny_llava):
    """The tiny LLaVA as seen with a language-model class that does not use AttentionInterface: transformers'
    set_attn_implementation then only logs a warning and keeps SDPA."""
    language_model = type(tiny_llava.model.model.language_model)
    monkeypatch.setattr(language_model, "_can_set_attn_implementation", classmethod(lambda cls: False))
    return tiny_llava


def test_model_class_that_cannot_switch_raises_in_every_entry_point(cannot_switch, images):
    from vlmscope.eval.model_eval import answer_fn
    from vlmscope.explain.flow import flow
    from vlmscope.explain.heads import image_attention

    vlm = cannot_switch
    expected = r"LlavaForConditionalGeneration: attention operations on layers \[0, 1\] never ran.*could not switch"
    with pytest.raises(UnsupportedModelError, match=expected):
        vlm.generate(images[0], PROMPTS[0], max_new_tokens=3, interventions="pai:start=0,end=2")
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vlm.explain(images[0], PROMPTS[0], layers=[1], max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        flow(vlm, images[0], PROMPTS[0], answer="a cat", layers=[1], cam=None)
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        image_attention(vlm, images[0], PROMPTS[0])
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):  # POPE-style eval runs
        answer_fn(vlm, "", 2, "greedy", ["truncate:layer=1"])([(images[0], "is there a cat ?")])
    # Without operations nothing needs the engine: plain generation still runs, and the model is as before.
    assert len(vlm.generate(images[0], PROMPTS[0], max_new_tokens=3).token_ids) == 3
    assert vlm.model.config.text_config._attn_implementation == "sdpa"
    assert engine_users(vlm.model) == 0


def test_decoder_attention_modules(tiny_llava):
    """Private attribute contract: decoder self-attention modules carry layer_idx and num_key_value_groups."""
    modules = decoder_attention_modules(tiny_llava.model)
    assert [m.layer_idx for m in modules] == list(range(tiny_llava.adapter.num_layers))
    assert all(m.num_key_value_groups >= 1 for m in modules)
    assert all(m in list(tiny_llava.model.get_decoder().modules()) for m in modules)
    with pytest.raises(UnsupportedModelError, match="Sequential: no self-attention modules"):
        decoder_attention_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attention_call_convention(tiny_llava):
    """Private API contract: stock `sdpa_attention_forward` takes (module, q, k, v, mask, dropout=, scaling=) with
    [B, H, L, D] tensors and returns [B, L, H, D]; the engine returns the same layout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = list(inspect.signature(sdpa_attention_forward).parameters)
    assert params[:5] == ["module", "query", "key", "value", "attention_mask"]
    assert {"dropout", "scaling"} <= set(params)
    module = decoder_attention_modules(tiny_llava.model)[0]
    q, k, v = _qkv(module)
    stock, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=module.scaling)
    assert stock.shape == (1, 5, q.shape[1], q.shape[-1])
    plan = AttentionPlan(decoder_attention_modules(tiny_llava.model))
    plan.add_capture(0, Capture(rows="all"))
    with attention_plan(tiny_llava.model, plan):
        ours, _ = vlmscope_attention(module, q, k, v, None, scaling=module.scaling)
    assert torch.allclose(ours, stock, atol=1e-6)


def _qkv(module, length=5):
    gen = torch.Generator().manual_seed(0)
    heads = module.config.num_attention_heads
    kv_heads = module.config.num_key_value_heads
    dim = module.head_dim
    q = torch.randn(1, heads, length, dim, generator=gen)
    return q, torch.randn(1, kv_heads, length, dim, generator=gen), torch.randn(1, kv_heads, length, dim, generator=gen)


@pytest.mark.parametrize("kwarg", [dict(softcap=30.0), dict(sliding_window=3), dict(s_aux=torch.zeros(4))])
def test_unimplemented_attention_kwargs_raise_on_active_layers_and_pass_on_idle(tiny_llava, kwarg):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    modules = decoder_attention_modules(tiny_llava.model)
    active, idle = modules[0], modules[1]
    q, k, v = _qkv(active)
    plan = AttentionPlan(modules)
    plan.add_edit(0, lambda logits, ctx: logits)
    with attention_plan(tiny_llava.model, plan):
        with pytest.raises(UnsupportedModelError, match=f"layer 0.*{next(iter(kwarg))}="):
            vlmscope_attention(active, q, k, v, None, scaling=active.scaling, **kwarg)
        if "softcap" in kwarg:  # stock SDPA refuses it itself: passed through, its error surfaces
            with pytest.raises(ValueError, match="softcap"):
                vlmscope_attention(idle, q, k, v, None, scaling=idle.scaling, **kwarg)
        else:
            got, _ = vlmscope_attention(idle, q, k, v, None, scaling=idle.scaling, **kwarg)
            want, _ = sdpa_attention_forward(idle, q, k, v, None, dropout=0.0, scaling=idle.scaling, **kwarg)
            assert torch.equal(got, want)


def test_output_attentions_under_a_plan_equals_stock_eager(setup):
    vlm, batch, inputs, ref, sdpa = setup
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    plan.image_mask = batch.image_mask
    capture = plan.add_capture(1, Capture(rows="last"))
    with torch.no_grad(), attention_plan(vlm.model, plan):
        out = vlm.model(**inputs, output_attentions=True)
    mask = inputs["attention_mask"].bool()
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions)
    for got, expected in zip(out.attentions, ref.attentions):
        for row in range(2):
            keep = mask[row]
            assert torch.allclose(got[row][:, keep][:, :, keep], expected[row][:, keep][:, :, keep], atol=1e-5)
    assert torch.allclose(capture.records[0][:, :, 0], ref.attentions[1][:, :, -1], atol=1e-6)
    assert torch.allclose(out.logits[mask], sdpa.logits[mask], atol=1e-5)


def test_attention_implementation_switched_once_per_generation(tiny_llava, images, monkeypatch):
    calls = []
    original = tiny_llava.model.set_attn_implementation
    monkeypatch.setattr(tiny_llava.model, "set_attn_implementation", lambda names: calls.append(names) or original(names))
    result = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=8, interventions="pai")
    assert len(result.token_ids) == 8
    assert calls == [{"text_config": ATTN_KEY}, {"text_config": "sdpa"}]  # 9 forwards, one switch and one restore


def test_two_threads_with_two_plans_on_one_model(setup):
    """Thread B's plan stays effective after thread A leaves its own, and the model is restored once both left.

    The schedule is forced: A enters, B enters, A exits, B forwards, B exits."""
    vlm, batch, inputs, ref, _ = setup
    model = vlm.model
    events = {name: threading.Event() for name in ("a_in", "b_in", "a_out")}
    captured = {}
    errors = []

    def thread_a():
        try:
            plan = AttentionPlan(decoder_attention_modules(model))
            capture = plan.add_capture(1, Capture(rows="all"))
            with torch.no_grad(), attention_plan(model, plan):
                events["a_in"].set()
                events["b_in"].wait(10)
                model(**inputs)
            captured["a"] = capture.records
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            events["a_out"].set()

    def thread_b():
        try:
            events["a_in"].wait(10)
            plan = AttentionPlan(decoder_attention_modules(model))
            capture = plan.add_capture(2, Capture(rows="all"))
            with torch.no_grad(), attention_plan(model, plan):
                events["b_in"].set()
                events["a_out"].wait(10)
                model(**inputs)
            captured["b"] = capture.records
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            events["b_in"].set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    mask = inputs["attention_mask"].bool()
    for name, layer in (("a", 1), ("b", 2)):
        assert len(captured[name]) == 1, name
        for row in range(2):
            keep = mask[row]
            got, want = captured[name][0][row], ref.attentions[layer][row]
            assert torch.allclose(got[:, keep][:, :, keep], want[:, keep][:, :, keep], atol=1e-5)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert engine_users(model) == 0


def test_concurrent_generations_with_different_interventions(tiny_llava, images):
    """Two threads generating at once on one model (one steered, one not) get what each gets alone."""
    jobs = [(images[0], None), (images[1], "pai:alpha=3.0,start=0"), (images[0], "truncate:layer=0"),
            (images[1], None)]
    alone = [tiny_llava.generate(im, PROMPTS[0], max_new_tokens=6, interventions=spec).token_ids
             for im, spec in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda job: tiny_llava.generate(job[0], PROMPTS[0], max_new_tokens=6,
                                                                 interventions=job[1]).token_ids, jobs * 2))
    assert together == alone * 2
    assert alone[1] != alone[0] or alone[2] != alone[0]  # the steering is visible, so a mix-up would show
    assert engine_users(tiny_llava.model) == 0
