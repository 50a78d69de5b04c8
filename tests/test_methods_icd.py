"""ICD (instruction contrastive decoding). Oracles: the hand computation of docs/methods/icd.md, the processor's
own tokens of the disturbed prompt, and uncached stock forwards of both prompts for greedy, beam search and OPERA.
"""

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

from vlmscope.errors import InputError
from vlmscope.interventions import INTERVENTIONS
from vlmscope.interventions.icd import DISTURBANCES, contrast_scores, disturbed_inputs
from vlmscope.registry import spec_string

DISTURB = "You are a confused object detector."


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return tiny_llava


def test_contrast_hand_computed():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    disturbed = torch.tensor([1.0, 1.5, -1.0, 0.0])
    scores = contrast_scores(logits, disturbed, alpha=1.0, beta=0.1)
    # cut-off 2 + ln 0.1 = -0.3026 masks token 3; (1+1)·ℓ - ℓ' = [3, 0.5, 1] on the rest
    assert torch.isinf(scores[3])
    torch.testing.assert_close(scores[:3], torch.tensor([3.0, 0.5, 1.0]))
    probs = torch.softmax(scores, -1)
    torch.testing.assert_close(probs, torch.tensor([0.8214, 0.0674, 0.1112, 0.0]), atol=1e-4, rtol=0)


def _disturbed_text(vlm, prompt, placement):
    if placement == "system":
        return render(vlm, prompt, system=DISTURB)
    return render(vlm, f"{DISTURB} {prompt}")


@pytest.mark.parametrize("placement", ["system", "after_image"])
def test_disturbed_prompt_equals_the_processors_own(vlm, placement):
    batch = vlm.encode(IMAGES, PROMPTS)
    ids, mask, _ = disturbed_inputs(vlm.adapter, batch, DISTURB, placement)
    for row in range(2):
        want = processor_inputs(vlm, IMAGES[row], _disturbed_text(vlm, PROMPTS[row], placement))["input_ids"][0]
        assert ids[row][mask[row].bool()].tolist() == want.tolist()
        assert int(mask[row].sum()) == len(want)  # left padded: the rest is padding
        normal = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        got = want.tolist()
        if placement == "system":
            # Only the system span differs: the normal prompt follows the inserted system text unchanged.
            assert got[-len(normal) + 1:] == normal[1:] and got[0] == normal[0]
        else:
            image_end = max(i for i, t in enumerate(normal) if t == vlm.adapter.image_token_id) + 1
            assert got[:image_end] == normal[:image_end]


def _icd_oracle(vlm, alpha, beta, placement="system"):
    def oracle(image, prompt, tokens):
        clean, _ = full_forward(vlm, processor_inputs(vlm, image, render(vlm, prompt)), tokens)
        text = _disturbed_text(vlm, prompt, placement)
        disturbed, _ = full_forward(vlm, processor_inputs(vlm, image, text), tokens)
        want = (1 + alpha) * clean - alpha * disturbed
        return want.masked_fill(clean < math.log(beta) + clean.max(-1, keepdim=True).values, float("-inf"))
    return oracle


SPEC = f"icd:alpha=1,beta=0.1,disturbance={DISTURB}"


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_icd_steers_every_decoding_as_stock_forwards_say(vlm, decoding):
    # One input per call, so a beam's rows are one input's; the batch case is checked below.
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, SPEC, [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _icd_oracle(vlm, 1.0, 0.1))


def test_after_image_placement_and_batch(vlm):
    spec = f"icd:alpha=0.5,beta=0.2,disturbance={DISTURB},placement=after_image"
    results = generate(vlm, spec, decoding=BEAM)  # a left-padded batch of two, beams reordered
    assert_scores_match(results, IMAGES, PROMPTS, _icd_oracle(vlm, 0.5, 0.2, "after_image"))


def test_icd_changes_the_output_and_alpha0_is_plain_sampling(vlm):
    plain = generate(vlm, None, decoding="sample:seed=3", n=8)
    off = generate(vlm, "icd:alpha=0,beta=0", decoding="sample:seed=3", n=8)
    assert [r.token_ids for r in off] == [r.token_ids for r in plain]
    for a, b in zip(off, plain):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    steered = generate(vlm, "icd:alpha=3", decoding="greedy", n=8)
    assert [r.token_ids for r in steered] != [r.token_ids for r in generate(vlm, None, n=8)]


def test_spec_presets_conflicts_and_rollback(vlm):
    spec = INTERVENTIONS.parse("icd")
    assert spec_string(spec) == "icd:alpha=1.0,beta=0.1,disturbance=confused,placement=system"
    assert "confused objects detector" in DISTURBANCES["confused"]
    with pytest.raises(InputError, match="icd and vcd"):
        generate(vlm, ["icd", "vcd"])
    with pytest.raises(InputError, match="rollback"):
        generate(vlm, "icd", decoding="opera:num_beams=2", n=40)
    with pytest.raises((InputError, ValueError), match="beta"):
        INTERVENTIONS.parse("icd:beta=1")
