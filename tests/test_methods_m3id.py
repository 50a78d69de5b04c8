"""M3ID (mutual-information decoding). Oracles: the hand computation of docs/methods/m3id.md, the weight
schedule e^{λt} − 1, and uncached stock forwards of the image prompt and of the image-free prompt (built from the
chat template and tokenizer) under greedy, beam search and OPERA."""

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
from vlmscope.interventions.m3id import m3id_scores, m3id_weight


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return tiny_llava


def test_weight_schedule():
    for t, want in [(1, 0.0202), (5, 0.105), (50, 1.718282), (100, 6.389)]:
        assert m3id_weight(0.02, t) == pytest.approx(want, abs=1e-3)
    assert m3id_weight(0.02, 0) == 0.0


def test_scores_hand_computed():
    cond, uncond = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([2.5, 0.0, 0.0])
    scores = m3id_scores(cond, uncond, lam=0.02, t=50, beta=0.0)
    torch.testing.assert_close(scores, torch.tensor([-0.8468, 0.7306, -1.9877]), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.softmax(scores, -1), torch.tensor([0.1623, 0.7859, 0.0519]),
                               atol=1e-4, rtol=0)
    assert int(scores.argmax()) == 1 and int(cond.argmax()) == 0
    # A constant added to either input changes nothing (log-softmax inputs).
    torch.testing.assert_close(m3id_scores(cond + 3.0, uncond - 7.0, 0.02, 50, 0.0), scores)
    # The cut-off keeps tokens with p_c >= β·max p_c: p_c = [0.665, 0.245, 0.090]; β = 0.2 drops token 2.
    cut = m3id_scores(cond, uncond, 0.02, 50, 0.2)
    assert torch.isinf(cut[2]) and torch.equal(cut[:2], scores[:2])


def _m3id_oracle(vlm, lam, t0, beta):
    def oracle(image, prompt, tokens):
        cond, _ = full_forward(vlm, processor_inputs(vlm, image, render(vlm, prompt)), tokens)
        uncond, _ = full_forward(vlm, processor_inputs(vlm, None, render(vlm, prompt, with_image=False)), tokens)
        rows = []
        for t in range(len(tokens) + 1):
            c, u = torch.log_softmax(cond[t], -1), torch.log_softmax(uncond[t], -1)
            w = math.exp(lam * (t + t0)) - 1
            row = c + w * (c - u)
            rows.append(row.masked_fill(c < math.log(beta) + c.max(), float("-inf")) if beta > 0 else row)
        return torch.stack(rows)
    return oracle


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_m3id_steers_every_decoding_as_stock_forwards_say(vlm, decoding):
    # A large λ so that the contrast matters within a few tokens of a tiny model.
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, "m3id:lam=0.3", [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _m3id_oracle(vlm, 0.3, 1, 0.1))


def test_batch_t0_and_beta(vlm):
    results = generate(vlm, "m3id:lam=0.5,t0=0,beta=0", decoding=BEAM)  # left-padded batch, beams reordered
    assert_scores_match(results, IMAGES, PROMPTS, _m3id_oracle(vlm, 0.5, 0, 0.0))


def test_t0_zero_first_token_is_the_conditioned_models(vlm):
    plain = generate(vlm, None, n=1)
    first = generate(vlm, "m3id:lam=5,t0=0,beta=0", n=1)
    assert [r.token_ids for r in first] == [r.token_ids for r in plain]
    steered = generate(vlm, "m3id:lam=1", n=6)
    assert [r.token_ids for r in steered] != [r.token_ids for r in generate(vlm, None, n=6)]


def test_spec_checks(vlm):
    with pytest.raises((InputError, ValueError), match="t0"):
        INTERVENTIONS.parse("m3id:t0=2")
    with pytest.raises(InputError, match="m3id and icd"):
        generate(vlm, ["m3id", "icd"])
    with pytest.raises(InputError, match="rollback"):
        generate(vlm, "m3id", decoding="opera:num_beams=2", n=40)
