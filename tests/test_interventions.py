"""Attention-side interventions (PAI, AAI, truncation, FastV) against independent oracles.

Oracles: the unsteered baseline (identity settings), hand computations of the edited attention from q/k recorded
by a separate probe attention function, a hand-written CLIP attention for AAI's reference map, the mask-only
FastV as the reference of the physical drop, and image independence under full truncation.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmscope.api import VLM
from vlmscope.attention.engine import AttentionPlan, Capture, decoder_attention_modules
from vlmscope.decoding.base import DecodingMethod
from vlmscope.decoding.session import GenerationRun, Intervention
from vlmscope.errors import InputError
from vlmscope.interventions import INTERVENTIONS
from vlmscope.interventions.aai import vision_reference
from vlmscope.models.tiny import build_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["describe this image .", "what is in the image ? is there a cat on the table ?"]


def _image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = [_image(0), _image(1)]


@pytest.fixture(scope="module")
def vlm() -> VLM:
    model, processor = build_tiny("llava")
    return VLM(model, processor, "tiny-llava")


def _generate(vlm, spec=None, images=IMAGES, prompts=PROMPTS, n=8, decoding="greedy"):
    return vlm.generate(list(images), list(prompts), max_new_tokens=n, decoding=decoding, interventions=spec)


def _tokens(results):
    return [r.token_ids for r in results]


def _intervention(spec):
    return INTERVENTIONS.parse(spec)


# --- identity settings ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(vlm):
    return _generate(vlm)


@pytest.mark.parametrize("spec", ["pai:alpha=0", "aai:alpha=0,beta=1,warmup=false", "truncate:layer=99",
                                  "fastv:ratio=0", "fastv:ratio=0,mode=mask"])
def test_identity_settings_reproduce_baseline(vlm, baseline, spec):
    steered = _generate(vlm, spec)
    assert _tokens(steered) == _tokens(baseline)
    for got, want in zip(steered, baseline):
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        assert got.image_tokens == want.image_tokens == 16


def test_strong_settings_change_the_output(vlm, baseline):
    # Guards the identity tests: the same machinery with non-zero strength does change generations.
    for spec in ["pai:alpha=3,start=0", "aai:alpha=3,start=0,warmup=false", "truncate:layer=0",
                 "fastv:k=1,ratio=0.9"]:
        steered = _generate(vlm, spec)
        assert _tokens(steered) != _tokens(baseline) or not np.allclose(
            steered[0].scores, baseline[0].scores, atol=1e-4), spec


# --- hand computation of the PAI / AAI edits ------------------------------------------------------------------------

_PROBE = "vlmscope_test_probe"
_PROBED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _PROBED[module.layer_idx] = (query.detach().clone(), key.detach().clone())
    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(_PROBE, _probe)
AttentionMaskInterface.register(_PROBE, sdpa_mask)


def _probe_prefill(vlm, batch) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """q and k (after RoPE) of every decoder layer in a stock forward of the prompt."""
    model = vlm.model
    previous = model.config.text_config._attn_implementation
    _PROBED.clear()
    model.set_attn_implementation({"text_config": _PROBE})
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=vlm.adapter.position_ids(batch), **batch.model_inputs)
    finally:
        model.set_attn_implementation({"text_config": previous})
    return dict(_PROBED)


def _hand_last_row_probs(vlm, batch, q, k, weights_fn) -> np.ndarray:
    """Last query row: logits = q·kᵀ/√d + mask (float64), image logits → weights_fn(L), softmax."""
    q = q.double().numpy()[:, :, -1, :]  # [B, H, D]
    k = k.double().numpy()
    groups = q.shape[1] // k.shape[1]
    k = np.repeat(k, groups, axis=1)  # GQA: query head h reads key head h // groups
    logits = np.einsum("bhd,bhkd->bhk", q, k) / np.sqrt(q.shape[-1])
    pad = batch.attention_mask.numpy() == 0
    image = batch.image_mask.numpy()
    out = np.empty_like(logits)
    for row in range(logits.shape[0]):
        row_logits = logits[row].copy()
        row_logits[:, image[row]] = weights_fn(row, row_logits[:, image[row]])
        row_logits[:, pad[row]] = -np.inf
        row_logits -= row_logits.max(axis=-1, keepdims=True)
        probs = np.exp(row_logits)
        out[row] = probs / probs.sum(axis=-1, keepdims=True)
    return out


def _captured_prefill(vlm, batch, spec, layer) -> np.ndarray:
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    capture = plan.add_capture(layer, Capture(rows="last", columns="all"))
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [_intervention(spec)],
                                        capture_plan=plan) as run:
        run.prefill()
    return capture.records[0][:, :, 0, :].double().numpy()


def test_pai_edit_matches_hand_computation(vlm):
    batch = vlm.encode(IMAGES, PROMPTS)  # left-padded batch of two
    layer, alpha = 1, 0.7
    qk = _probe_prefill(vlm, batch)
    got = _captured_prefill(vlm, batch, f"pai:alpha={alpha},start={layer},end={layer + 1}", layer)
    want = _hand_last_row_probs(vlm, batch, *qk[layer], lambda row, L: L + alpha * np.abs(L))
    np.testing.assert_allclose(got, want, atol=1e-5)
    unedited = _hand_last_row_probs(vlm, batch, *qk[layer], lambda row, L: L)
    assert np.abs(want - unedited).max() > 1e-2  # the edit is visible at this tolerance


def _clip_received_attention(vlm, pixel_values) -> np.ndarray:
    """AAI's map written out by hand: last CLIP layer, q/k from its input, head mean, no CLS, column sums."""
    tower = vlm.adapter.vision_tower()
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        last = tower.encoder.layers[-1]
        attn = last.self_attn
        x = last.layer_norm1(hidden)
        b, t, _ = x.shape
        heads = attn.num_heads
        q = attn.q_proj(x).view(b, t, heads, -1).transpose(1, 2).double()
        k = attn.k_proj(x).view(b, t, heads, -1).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), dim=-1).mean(dim=1)
    return probs[:, 1:, 1:].sum(dim=1).numpy()


def test_aai_reference_map_matches_hand_computation(vlm):
    batch = vlm.encode(IMAGES, PROMPTS)
    refs = vision_reference(vlm.model, vlm.adapter, batch)
    want = _clip_received_attention(vlm, batch.model_inputs["pixel_values"])
    np.testing.assert_allclose(np.stack([r.numpy() for r in refs]), want, atol=1e-5)
    # The vision tower is back on its own attention implementation.
    assert vlm.model.config.vision_config._attn_implementation == "sdpa"


def test_aai_edit_matches_hand_computation(vlm):
    batch = vlm.encode(IMAGES, PROMPTS)
    layer, alpha, beta = 2, 0.6, 0.8
    qk = _probe_prefill(vlm, batch)
    ref = _clip_received_attention(vlm, batch.model_inputs["pixel_values"])
    r = ref / (ref.mean(axis=1, keepdims=True) + 1e-8)
    got = _captured_prefill(vlm, batch, f"aai:alpha={alpha},beta={beta},start={layer},end={layer + 1},"
                                        "warmup=false", layer)
    want = _hand_last_row_probs(vlm, batch, *qk[layer],
                                lambda row, L: alpha * np.abs(r[row]) * np.abs(L) + beta * L)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_aai_uniform_reference_equals_pai(vlm):
    pai = _generate(vlm, "pai:alpha=0.9,start=1")
    aai = _generate(vlm, "aai:alpha=0.9,beta=1,start=1,reference=uniform,warmup=false")
    assert _tokens(aai) == _tokens(pai)
    for a, p in zip(aai, pai):
        np.testing.assert_allclose(a.scores, p.scores, atol=1e-6)


def _teacher_forced_logits(vlm, batch, interventions, tokens):
    """Processed logits of the prefill and of each step fed `tokens` [N, T]."""
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, interventions) as run:
        out = [run.prefill()]
        for step in range(tokens.shape[1]):
            out.append(run.advance(tokens[:, step]))
        return out, run


def test_aai_warmup_leaves_first_six_tokens(vlm, baseline):
    steered = _generate(vlm, "aai:alpha=4,start=0", n=10)
    for got, want in zip(steered, baseline):
        assert got.token_ids[:6] == want.token_ids[:6]
    # Per step: forwards 0..5 (prefill and decode steps 1-5) are untouched, step 6 is edited.
    batch = vlm.encode(IMAGES, PROMPTS)
    tokens = torch.tensor([r.token_ids[:7] for r in baseline])
    plain, _ = _teacher_forced_logits(vlm, batch, [], tokens)
    edited, _ = _teacher_forced_logits(vlm, batch, [_intervention("aai:alpha=4,start=0")], tokens)
    for step in range(6):
        torch.testing.assert_close(edited[step], plain[step], atol=1e-5, rtol=0)
    assert (edited[6] - plain[6]).abs().max() > 1e-3


# --- truncation ---------------------------------------------------------------------------------------------------


def test_truncate_from_layer0_ignores_the_image(vlm):
    prompts = [PROMPTS[0]]
    plain = [_generate(vlm, None, [im], prompts)[0] for im in IMAGES]
    assert plain[0].token_ids != plain[1].token_ids or plain[0].scores != plain[1].scores
    cut = [_generate(vlm, "truncate:layer=0", [im], prompts)[0] for im in IMAGES]
    assert cut[0].token_ids == cut[1].token_ids
    assert cut[0].scores == cut[1].scores


def test_truncate_keep_masks_all_but_top_keys(vlm):
    batch = vlm.encode(IMAGES, PROMPTS)
    layer, keep = 2, 3
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    ranking = plan.add_capture(layer - 1, Capture(rows="last", columns="image", head_reduce="mean"))
    after = plan.add_capture(layer, Capture(rows="last", columns="image"))
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch,
                                        [_intervention(f"truncate:layer={layer},keep={keep}")],
                                        capture_plan=plan) as run:
        run.prefill()
        run.advance(torch.tensor([5, 6]))
    scores = ranking.records[0][:, 0, 0]  # [B, 16] head-mean attention at layer-1 of the last prompt row
    top = torch.topk(scores, keep, dim=1).indices
    for record in after.records:  # prefill and decode step: only the top-K image keys get attention
        visible = record[:, :, 0].sum(dim=1) > 0  # [B, 16]
        expected = torch.zeros_like(visible).scatter_(1, top, True)
        assert torch.equal(visible, expected)


def test_edits_never_revive_truncated_keys(vlm):
    # With every image key masked from layer 1 on, a boost on layers 2-3 has nothing to act on; without the
    # guard, alpha > 1 would turn the masked logits (dtype min) into huge positive ones.
    truncated = _generate(vlm, "truncate:layer=1", n=4)
    for extra in ("pai:alpha=1.5", "aai:alpha=5,beta=0.5,warmup=false"):
        combined = _generate(vlm, ["truncate:layer=1", extra], n=4)
        assert _tokens(combined) == _tokens(truncated)
        for got, want in zip(combined, truncated):
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


# --- FastV --------------------------------------------------------------------------------------------------------


def test_fastv_drop_equals_mask_on_padded_batch(vlm):
    batch = vlm.encode(IMAGES, PROMPTS)
    assert bool((batch.attention_mask == 0).any())  # left padding present
    tokens = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    drop, run_drop = _teacher_forced_logits(vlm, batch, [_intervention("fastv:k=2,ratio=0.5")], tokens)
    mask, run_mask = _teacher_forced_logits(vlm, batch, [_intervention("fastv:k=2,ratio=0.5,mode=mask")],
                                            tokens)
    plain, run_plain = _teacher_forced_logits(vlm, batch, [], tokens)
    for d, m in zip(drop, mask):
        torch.testing.assert_close(d, m, atol=1e-5, rtol=0)
    assert max((d - p).abs().max().item() for d, p in zip(drop, plain)) > 1e-3
    # The cache of layers >= k really is shorter by the 8 dropped tokens per row.
    lengths = [layer.keys.shape[-2] for layer in run_drop.cache.layers]
    full = [layer.keys.shape[-2] for layer in run_plain.cache.layers]
    assert lengths[:2] == full[:2] and all(x == y - 8 for x, y in zip(lengths[2:], full[2:]))
    assert run_drop.image_tokens == run_mask.image_tokens == [8, 8]
    # Other operations see only the kept image keys on the pruned layers.
    assert int(run_drop.plan.layer_image_masks[3].sum(dim=1)[0]) == 8
    assert not any(m._forward_pre_hooks for m in vlm.model.modules())


@pytest.mark.parametrize("extra", ["pai:start=1,alpha=1", "aai:start=1,alpha=1,warmup=false"])
def test_fastv_drop_equals_mask_with_attention_edits(vlm, extra):
    # The edits after layer k see only the kept image keys (PAI via the layer's image mask, AAI's per-token
    # weights gathered by the kept positions), in both modes.
    batch = vlm.encode(IMAGES, PROMPTS)
    tokens = torch.tensor([[7, 8], [11, 12]])
    drop, _ = _teacher_forced_logits(vlm, batch, [_intervention("fastv:k=2"), _intervention(extra)], tokens)
    mask, _ = _teacher_forced_logits(vlm, batch, [_intervention("fastv:k=2,mode=mask"), _intervention(extra)],
                                     tokens)
    for d, m in zip(drop, mask):
        torch.testing.assert_close(d, m, atol=1e-5, rtol=0)


def test_fastv_reference_ranks_on_row0_and_fix_ranks_per_row(vlm):
    batch = vlm.encode(IMAGES, PROMPTS)
    kept = {}
    for per_row in (False, True):
        plan = AttentionPlan(decoder_attention_modules(vlm.model))
        ranking = plan.add_capture(0, Capture(rows="last", columns="image", head_reduce="mean"))
        fastv = _intervention(f"fastv:k=1,ratio=0.75,mode=mask,rank_per_row={per_row}")
        with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [fastv], capture_plan=plan) as run:
            run.prefill()
            kept[per_row] = run.plan.layer_image_masks[1].clone()
    scores = ranking.records[0][:, 0, 0]
    top = torch.topk(scores, 4, dim=1).indices.sort(dim=1).values
    for row in range(2):
        image_positions = batch.image_mask[row].nonzero().flatten()
        assert torch.equal(kept[True][row].nonzero().flatten(), image_positions[top[row]])
        assert torch.equal(kept[False][row].nonzero().flatten(), image_positions[top[0]])


def test_fastv_result_reports_kept_image_tokens(vlm):
    results = _generate(vlm, "fastv:k=1,ratio=0.25", n=3)
    assert [r.image_tokens for r in results] == [12, 12]


# --- errors and state ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("specs, message", [
    (["pai", "aai"], "pai and aai"),
    (["pai", "pai:alpha=0.1"], "given 2 times"),
    (["fastv", "truncate:layer=2,keep=3"], "fastv and truncate"),
    (["fastv:k=9"], "k=9 is past"),
    (["pai:start=9"], "start layer 9"),
])
def test_unsupported_combinations_raise_at_setup(vlm, specs, message):
    with pytest.raises(InputError, match=message):
        _generate(vlm, specs, n=2)
    assert not any(m._forward_pre_hooks for m in vlm.model.modules())


# fastv ranks per row here: with the reference's row-0 ranking a batch does not equal its inputs alone.
@pytest.mark.parametrize("specs", [
    ["pai:start=0,end=2", "aai:start=2,warmup=false"],  # pai and aai on disjoint layers
    ["fastv:k=1,rank_per_row=true", "truncate:layer=3"],  # fastv + full truncation
    ["fastv:k=1,rank_per_row=true", "aai:warmup=false,start=1"],  # fastv + aai (kept-key weights gathered)
    ["truncate:layer=2,keep=4", "pai"],
])
def test_compatible_combinations_run(vlm, specs):
    results = _generate(vlm, specs, n=3)
    for row, result in enumerate(results):
        # Oracle 1: the batch equals each input run alone (left padding and the other row change nothing).
        alone = _generate(vlm, specs, [IMAGES[row]], [PROMPTS[row]], n=3)[0]
        assert result.token_ids == alone.token_ids
        np.testing.assert_allclose(result.scores, alone.scores, atol=2e-4)
        # Oracle 2: neither method is silently dropped. Teacher-forced on the combination's tokens, the
        # combination scores them differently from each method alone and from no steering.
        both = _forced_logprobs(vlm, specs, row, result.token_ids)
        np.testing.assert_allclose(both, result.scores, atol=2e-4)
        for single in (None, specs[:1], specs[1:]):
            other = _forced_logprobs(vlm, single, row, result.token_ids)
            assert np.abs(np.asarray(other) - both).max() > 1e-4, f"{specs} acts like {single}"


def _forced_logprobs(vlm, specs, row, tokens):
    """Log-probabilities of `tokens` for input `row` alone under `specs`, fed token by token."""
    batch = vlm.encode([IMAGES[row]], [PROMPTS[row]])
    scores = []
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, vlm.resolve_interventions(specs)) as run:
        logits = run.prefill()
        for step, token in enumerate(tokens):
            scores.append(float(torch.log_softmax(logits.float(), -1)[0, token]))
            if step < len(tokens) - 1:
                logits = run.advance(torch.tensor([token]))
    return scores


def test_bad_parameters_raise_input_errors():
    for spec in ["fastv:k=0", "fastv:ratio=1.5", "truncate:layer=0,keep=2", "vcd:noise_step=1000",
                 "aai:reference=cls", "pai:alpha=x"]:
        with pytest.raises(InputError):
            INTERVENTIONS.parse(spec)


def test_registry_builds_every_method():
    assert {"pai", "aai", "truncate", "fastv", "vcd"} <= set(INTERVENTIONS.names())
    pai = INTERVENTIONS.parse("pai:alpha=0.3,cfg=true,gamma=2,start=1")
    assert (pai.alpha, pai.cfg, pai.gamma, pai.start, pai.end) == (0.3, True, 2.0, 1, 32)
    aai = INTERVENTIONS.from_config({"name": "aai", "alpha": 0.5, "warmup_steps": 3})
    assert (aai.alpha, aai.beta, aai.warmup_steps) == (0.5, 1.0, 3)
    fastv = INTERVENTIONS.parse("fastv:k=3,ratio=0.75,mode=mask")
    assert (fastv.k, fastv.ratio, fastv.mode, fastv.rank_per_row) == (3, 0.75, "mask", False)


class _FailingDecoding(DecodingMethod):
    def decode(self, run, max_new_tokens, eos_ids, pad_id):
        run.expand(2)
        logits = run.prefill()
        run.advance(logits.argmax(-1))
        raise RuntimeError("boom")


def _hook_ids(model) -> set:
    return {(name, kind, key) for name, module in model.named_modules()
            for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
            for key in hooks}


def test_model_state_restored_after_an_exception(vlm, baseline):
    model = vlm.model
    before = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    specs = ["fastv:k=1", "aai:start=0,end=2", "pai:start=2,cfg=true,gamma=2", "truncate:layer=3", "vcd"]
    batch = vlm.encode(IMAGES, PROMPTS)
    hooks_before = _hook_ids(model)  # transformers' own output-capturing hooks stay installed after a forward
    with pytest.raises(RuntimeError, match="boom"):
        vlm.generate_batch(batch, 4, _FailingDecoding(), [_intervention(s) for s in specs])
    after = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    assert after == before
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert _hook_ids(model) == hooks_before

    # An exception inside the vision pass of AAI also restores the vision tower's attention implementation.
    def fail(*args):
        raise RuntimeError("vision failure")

    handle = vlm.adapter.vision_tower().register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="vision failure"):
            _generate(vlm, "aai", n=2)
    finally:
        handle.remove()
    assert model.config.vision_config._attn_implementation == before[1]
    # And the model still generates the baseline afterwards.
    assert _tokens(_generate(vlm, None, n=4)) == [r.token_ids[:4] for r in baseline]


# --- specs are immutable, state lives in the run ------------------------------------------------------------------

STATEFUL = ["pai:alpha=2.0,cfg=true,gamma=2", "aai:alpha=3.0,warmup=false", "fastv:k=1,ratio=0.5",
            "fastv:k=1,ratio=0.5,rerank=every_step", "truncate:layer=2,keep=4", "vcd:alpha=1.0"]


def _greedy_interleaved(vlm, method, n=4):
    """Two runs sharing one spec instance, stepped alternately by hand (greedy)."""
    runs = [GenerationRun(vlm.model, vlm.adapter, vlm.encode([im], [p]), [method]) for im, p in zip(IMAGES, PROMPTS)]
    tokens: list[list[int]] = [[], []]
    with torch.no_grad(), runs[0], runs[1]:
        logits = [run.prefill() for run in runs]
        for step in range(n):
            for i, run in enumerate(runs):
                chosen = logits[i].argmax(-1)
                tokens[i].append(int(chosen))
                if step < n - 1:
                    logits[i] = run.advance(chosen)
    return tokens


@pytest.mark.parametrize("spec", STATEFUL)
def test_one_spec_instance_serves_two_runs_at_once(vlm, spec):
    """The same instance in two interleaved runs and in two threads gives what each input gets alone."""
    method = _intervention(spec)
    alone = [vlm.generate(im, p, max_new_tokens=4, interventions=[method]).token_ids
             for im, p in zip(IMAGES, PROMPTS)]
    baseline = [vlm.generate(im, p, max_new_tokens=4).token_ids for im, p in zip(IMAGES, PROMPTS)]
    assert alone != baseline, "the steering must be visible for a mix-up to show"
    interleaved = _greedy_interleaved(vlm, method)
    for row in range(2):
        assert interleaved[row][: len(alone[row])] == alone[row]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda i: vlm.generate(IMAGES[i % 2], PROMPTS[i % 2], max_new_tokens=4,
                                                        interventions=[method]).token_ids, range(4)))
    assert threaded == alone * 2


def test_specs_are_frozen():
    for name in INTERVENTIONS.names():
        cls = INTERVENTIONS.get(name)
        assert dataclasses.fields(cls) == () or cls.__dataclass_params__.frozen, name
    pai = _intervention("pai")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pai.alpha = 1.0


def test_conflicts_are_checked_once_before_any_intervention_starts(vlm):
    prepared = []

    @dataclasses.dataclass
    class Recorder(Intervention):
        def prepare(self, run):
            prepared.append(run)

    with pytest.raises(InputError, match="pai and aai both re-weight"):
        _generate(vlm, [Recorder(), _intervention("pai"), _intervention("aai")], n=2)
    assert prepared == []
    assert INTERVENTIONS.get("pai").conflicts_with == ("aai",)
    assert INTERVENTIONS.get("fastv").conflicts_with == ("truncate",)


@pytest.mark.parametrize("specs, message", [
    (["codebook:path=cb.pt,keep_ratio=0.5", "codebook:path=cb.pt,threshold=0.5"], "'codebook' is given 2 times"),
    (["vcd", "codebook:path=cb.pt,keep_ratio=0.5"], "codebook pruning and vcd"),
    (["codebook:path=cb.pt,keep_ratio=0.5", "aai"], "codebook pruning and aai"),
])
def test_codebook_conflicts_are_declared(vlm, specs, message):
    # Checked before any state exists: the codebook file is not even read.
    with pytest.raises(InputError, match=message):
        _generate(vlm, specs, n=2)


def test_hooks_called_half_registered_from_another_thread_leave_that_forward_alone(vlm, monkeypatch):
    """torch adds a kwargs pre-hook in two steps, so another thread's forward on the same model can call it
    without kwargs (seen as a TypeError in the two-thread test above): FastV's and the early-exit methods'
    hooks must then do nothing, as for any call that is not their run's."""
    hooks = []
    real = torch.nn.Module.register_forward_pre_hook

    def recording(module, hook, *, with_kwargs=False, **kw):
        hooks.append(hook)
        return real(module, hook, with_kwargs=with_kwargs, **kw)

    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", recording)
    for spec in ("fastv:k=1,ratio=0.5", "dola:layers=[1]"):
        hooks.clear()
        vlm.generate(IMAGES[0], PROMPTS[0], max_new_tokens=2, interventions=spec)
        assert hooks, spec
        hidden = torch.zeros(1, 3, vlm.model.config.text_config.hidden_size)
        for hook in hooks:  # outside the run, called the way torch calls a plain pre-hook
            assert hook(torch.nn.Identity(), (hidden,)) is None, spec
