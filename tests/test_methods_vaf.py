"""VAF / ClearSight (visual amplification fusion). Oracles: the hand computation of docs/methods/vaf.md and a
from-scratch eager attention with the paper's score scaling, registered as the stock model's attention
implementation, for greedy, beam search and OPERA; α = β = 1 equals the unsteered model."""

from __future__ import annotations

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
from vlmscope.attention.engine import EditContext
from vlmscope.errors import InputError
from vlmscope.interventions import INTERVENTIONS
from vlmscope.interventions.vaf import rows_after_image, vaf_key_factors


@pytest.fixture(scope="module")
def vlm():
    from vlmscope.models.tiny import build_tiny

    model, processor = build_tiny("llava")  # its own model: the oracle switches its attention implementation
    return VLM(model, processor, "tiny-llava")


def test_edit_hand_computed():
    spec = INTERVENTIONS.parse("vaf:alpha=1.15,beta=0.95,start=0,end=1")
    state = spec.start_run(None)
    image = torch.tensor([[False, False, True, True, True, False]])
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.3]).view(1, 1, 1, 6)
    ctx = EditContext(0, 1, 1, 6, image, None)
    edited = state._edit(scores.clone(), ctx)
    torch.testing.assert_close(edited.flatten(), torch.tensor([0.95, 0.0, 2.3, -1.15, 0.575, 0.3]))
    before, after = torch.softmax(scores.flatten(), -1), torch.softmax(edited.flatten(), -1)
    torch.testing.assert_close(before, torch.tensor([0.1878, 0.0691, 0.5105, 0.0254, 0.1139, 0.0933]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(after, torch.tensor([0.1521, 0.0588, 0.5866, 0.0186, 0.1045, 0.0794]),
                               atol=1e-4, rtol=0)
    assert float(after[2:5].sum()) == pytest.approx(0.7097, abs=1e-4)
    assert after[3] < before[3] and after[4] < before[4]  # sharpened, not uniformly boosted
    # Prefill: the system and image rows are untouched, rows after the image are edited; masked stays masked.
    assert rows_after_image(image, 6).tolist() == [[False, False, False, False, False, True]]
    assert rows_after_image(image, 2).tolist() == [[False, True]]  # the last 2 of 6 positions
    factors = vaf_key_factors(image, 2.0, 0.5)
    assert factors.tolist() == [[0.5, 0.5, 2.0, 2.0, 2.0, 1.0]]
    masked = torch.full((1, 1, 1, 6), torch.finfo(torch.float32).min)
    assert torch.equal(state._edit(masked.clone(), ctx), masked)


_ORACLE = {"layers": (), "alpha": 1.0, "beta": 1.0, "image": None}


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention from scratch; on the VAF layers, scores of rows after the image scaled per key."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    q, kv = scores.shape[-2:]
    if module.layer_idx in _ORACLE["layers"]:
        image = _ORACLE["image"][:kv]
        where = image.nonzero().flatten()
        factor = torch.ones(kv)
        factor[: int(where[0])] = _ORACLE["beta"]
        factor[image] = _ORACLE["alpha"]
        after = torch.arange(kv - q, kv) > int(where[-1])
        scores = torch.where(after[:, None], scores * factor, scores)
    if attention_mask is not None:
        mask = attention_mask[..., :kv]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _vaf_oracle(vlm, layers, alpha, beta):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("vaf_oracle", _oracle_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("vaf_oracle", eager_mask)

    def oracle(image, prompt, tokens):
        inputs = processor_inputs(vlm, image, render(vlm, prompt))
        ids = inputs["input_ids"][0]
        _ORACLE.update(layers=tuple(layers), alpha=alpha, beta=beta,
                       image=torch.cat([ids == vlm.adapter.image_token_id, torch.zeros(len(tokens), dtype=bool)]))
        previous = vlm.model.config.text_config._attn_implementation
        vlm.model.set_attn_implementation({"text_config": "vaf_oracle"})
        try:
            logits, _ = full_forward(vlm, inputs, tokens)
        finally:
            vlm.model.set_attn_implementation({"text_config": previous})
        return logits
    return oracle


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_vaf_steers_every_decoding_as_the_scratch_attention_says(vlm, decoding):
    spec = "vaf:alpha=3,beta=0.5,start=1,end=3"  # strong factors: a tiny model must feel them
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, spec, [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _vaf_oracle(vlm, [1, 2], 3.0, 0.5))


def test_batch_and_identity(vlm):
    results = generate(vlm, "vaf:alpha=2,beta=0.8,start=0,end=4", decoding=BEAM)  # left-padded batch
    assert_scores_match(results, IMAGES, PROMPTS, _vaf_oracle(vlm, [0, 1, 2, 3], 2.0, 0.8))
    plain = generate(vlm, None, n=8)
    same = generate(vlm, "vaf:alpha=1,beta=1,start=0,end=4", n=8)
    assert [r.token_ids for r in same] == [r.token_ids for r in plain]
    for a, b in zip(same, plain):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    assert [r.token_ids for r in results] != [r.token_ids for r in generate(vlm, None, decoding=BEAM)]


def test_layers_and_conflicts(vlm):
    with pytest.raises(InputError, match="vaf: start layer 9"):
        generate(vlm, "vaf")  # the reference's layers 9..14 do not exist in a 4-layer model
    with pytest.raises(InputError, match="vaf and pai"):
        generate(vlm, ["vaf:start=1,end=3", "pai:start=2"])
    generate(vlm, ["vaf:start=0,end=2", "pai:start=2"], n=2)  # disjoint layers compose


def test_vaf_under_opera_rollback_equals_inputs_alone(vlm):
    from test_interventions_branches import _opera_with_column

    spec = "vaf:alpha=3,beta=0.5,start=1,end=3"
    together = _opera_with_column(vlm, spec, IMAGES, PROMPTS)
    assert sum(r.extras["opera"]["rollbacks"] for r in together) > 0
    for row, result in enumerate(together):
        alone = _opera_with_column(vlm, spec, [IMAGES[row]], [PROMPTS[row]])[0]
        assert result.token_ids == alone.token_ids
        assert result.sequence_score == pytest.approx(alone.sequence_score, abs=1e-4)
        assert result.extras["opera"]["rollback_events"] == alone.extras["opera"]["rollback_events"]


@pytest.mark.parametrize("arch", ["llava-next", "qwen2-vl"])
def test_other_families_identity_and_effect(tiny_vlm, arch):
    other = tiny_vlm(arch)
    plain = generate(other, None, IMAGES[:1], PROMPTS[:1], n=6)
    same = generate(other, "vaf:alpha=1,beta=1,start=0,end=2", IMAGES[:1], PROMPTS[:1], n=6)
    assert same[0].token_ids == plain[0].token_ids
    assert same[0].scores == pytest.approx(plain[0].scores, abs=1e-5)
    steered = generate(other, "vaf:alpha=20,beta=0.1,start=0,end=2", IMAGES[:1], PROMPTS[:1], n=6)
    assert steered[0].scores != pytest.approx(plain[0].scores, abs=1e-3)
