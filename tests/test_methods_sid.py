"""SID (self-introspective decoding). Oracles: the hand computations of docs/methods/sid.md, and a from-scratch
eager attention registered on the stock model that ranks image keys at layer K − 1 and hides all but the least
attended from layer K on, run incrementally on a stock cache, for greedy, beam search and OPERA."""

from __future__ import annotations

import math

import pytest
import torch
from methods_oracle import (
    BEAM,
    IMAGES,
    OPERA_NEUTRAL,
    PROMPTS,
    assert_scores_match,
    full_forward,
    generate,
    processor_inputs,
    render,
)

from vlmscope.api import VLM
from vlmscope.errors import InputError
from vlmscope.interventions.base import INTERVENTIONS
from vlmscope.interventions.sid import least_attended_mask
from vlmscope.models.families_seed import model_forward  # the cache under the installed name (5.24: `cache`)


@pytest.fixture(scope="module")
def vlm():
    from vlmscope.models.tiny import build_tiny

    model, processor = build_tiny("llava")  # its own model: the oracle switches its attention implementation
    return VLM(model, processor, "tiny-llava")


def test_selection_and_contrast_hand_computed():
    attention = torch.tensor([[0.9, 0.4, 0.1, 0.3, 0.05, 0.15, 0.7]])
    image = torch.tensor([[False, True, True, True, True, True, False]])  # image tokens 0..4 at keys 1..5
    hidden = least_attended_mask(attention, image, keep=2)
    assert hidden.tolist() == [[False, True, False, True, False, True, False]]  # keep tokens 3 and 1
    assert not least_attended_mask(attention, image, keep=9).any()  # keep >= image tokens: nothing hidden

    def contrast(alpha, beta):
        logits, sid = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([3.0, -6.0, 1.0])
        want = (1 + alpha) * logits - alpha * sid
        return want.masked_fill(logits < math.log(beta) + logits.max(), float("-inf")) if beta else want

    assert contrast(1, 0).tolist() == [3.0, 6.0, 1.0] and int(contrast(1, 0).argmax()) == 1
    assert int(contrast(1, 0.1).argmax()) == 0  # the cut keeps tokens 0 and 2 only
    assert contrast(0.5, 0).tolist() == [3.0, 3.0, 1.0]


_ORACLE = {"layer": 2, "keep": 4, "image": None, "attention": None}


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    q, kv = scores.shape[-2:]
    if attention_mask is not None:
        mask = attention_mask[..., :kv]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    if module.layer_idx >= _ORACLE["layer"]:
        image_keys = [i for i in range(kv) if i < len(_ORACLE["image"]) and _ORACLE["image"][i]]
        attention = _ORACLE["attention"]
        kept = sorted(image_keys, key=lambda i: float(attention[i]))[: _ORACLE["keep"]]
        for i in image_keys:
            if i not in kept:
                scores[..., i] = torch.finfo(scores.dtype).min
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if module.layer_idx == _ORACLE["layer"] - 1:
        _ORACLE["attention"] = probs[0, :, -1].float().mean(0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _introspective_logits(vlm, inputs, tokens):
    """The SID branch from scratch: stock cache, oracle attention, one token per forward."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("sid_oracle", _oracle_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sid_oracle", eager_mask)
    ids = inputs["input_ids"]
    _ORACLE["image"] = (ids[0] == vlm.adapter.image_token_id).tolist()
    previous = vlm.model.config.text_config._attn_implementation
    vlm.model.set_attn_implementation({"text_config": "sid_oracle"})
    rows = []
    try:
        cache = DynamicCache(config=vlm.model.config)
        with torch.no_grad():
            out = model_forward(vlm.model, **inputs, past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1].float())
            for t, token in enumerate(tokens):
                mask = torch.ones(1, ids.shape[1] + t + 1, dtype=torch.long)
                out = model_forward(vlm.model, input_ids=torch.tensor([[token]]), attention_mask=mask,
                                    past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1].float())
    finally:
        vlm.model.set_attn_implementation({"text_config": previous})
    return torch.stack(rows)


def _sid_oracle(vlm, alpha, beta, layer, keep):
    def oracle(image, prompt, tokens):
        _ORACLE.update(layer=layer, keep=keep)
        inputs = processor_inputs(vlm, image, render(vlm, prompt))
        clean, _ = full_forward(vlm, inputs, tokens)
        sid = _introspective_logits(vlm, inputs, tokens)
        want = (1 + alpha) * clean - alpha * sid
        if beta:
            want = want.masked_fill(clean < math.log(beta) + clean.max(-1, keepdim=True).values, float("-inf"))
        return want
    return oracle


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_sid_steers_every_decoding_as_the_scratch_branch_says(vlm, decoding):
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, "sid:keep=4,alpha=1", [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _sid_oracle(vlm, 1.0, 0.1, 2, 4))


def test_batch_reference_greedy_and_other_layer(vlm):
    results = generate(vlm, "sid:keep=6,alpha=0.5,beta=0,layer=1", decoding=BEAM)  # left-padded batch
    assert_scores_match(results, IMAGES, PROMPTS, _sid_oracle(vlm, 0.5, 0.0, 1, 6))
    # A wrong oracle (other layer) disagrees, so the comparison can fail.
    with pytest.raises(AssertionError):
        assert_scores_match(results, IMAGES, PROMPTS, _sid_oracle(vlm, 0.5, 0.0, 2, 6))


def test_spec_checks(vlm):
    assert INTERVENTIONS.parse("sid").keep == 100
    with pytest.raises(InputError, match="sid: layer"):
        generate(vlm, "sid:layer=4")
    with pytest.raises(InputError, match="sid and vcd"):
        generate(vlm, ["sid", "vcd"])
    with pytest.raises(InputError, match="rollback"):
        generate(vlm, "sid", decoding="opera:num_beams=2", n=40)
    plain = generate(vlm, None, n=6)
    assert [r.token_ids for r in generate(vlm, "sid:alpha=0,beta=0", n=6)] == [r.token_ids for r in plain]
