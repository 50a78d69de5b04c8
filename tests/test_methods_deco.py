"""DeCo (dynamic correction). Oracles: the hand computation of docs/methods/deco.md and a re-computation from the
stock model's normed `output_hidden_states`, under greedy, beam search and OPERA (with rollbacks: a batch equals
its inputs alone)."""

from __future__ import annotations

import numpy as np
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
from vlmscope.interventions.deco import candidate_mask, deco_scores


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return tiny_llava


def test_hand_computed():
    final = torch.tensor([4.0, 3.5, 3.0, 1.0, 0.0, -1.0])
    early = torch.tensor([[1.0, 3.0, 0.5, 0.0, 0.0, 0.0], [2.0, 1.0, 2.5, 0.0, 0.0, 0.0]])  # layers 20, 21
    assert candidate_mask(final, 20, 0.9).tolist() == [True, True, True, False, False, False]  # cum. 0.9635
    assert candidate_mask(final, 2, 0.9).tolist() == [True, True, False, False, False, False]  # top-k caps
    assert candidate_mask(final, 20, 0.4).tolist() == [True, False, False, False, False, False]
    probs = torch.softmax(early, -1)[:, :3]
    torch.testing.assert_close(probs, torch.tensor([[0.0990, 0.7316, 0.0601], [0.2922, 0.1075, 0.4817]]),
                               atol=1e-4, rtol=0)
    scores = deco_scores(final, early, alpha=0.6)  # j* = 20, p_max = 0.7316
    torch.testing.assert_close(scores[:3], torch.tensor([4.4390, 4.8170, 3.2195]), atol=1e-4, rtol=0)
    assert torch.isinf(scores[3:]).all() and int(scores.argmax()) == 1
    # Rows choose their own layer and p_max.
    both = deco_scores(torch.stack([final, final]), torch.stack([early, early.flip(0)], dim=1), alpha=0.6)
    torch.testing.assert_close(both[0], scores)
    torch.testing.assert_close(both[1], scores)  # the same grid maximum, found in the other layer


def _deco_oracle(vlm, layers, alpha, top_k=20, top_p=0.9):
    head = vlm.model.get_output_embeddings()
    norm = vlm.adapter.decoder().norm

    def oracle(image, prompt, tokens):
        logits, hidden = full_forward(vlm, processor_inputs(vlm, image, render(vlm, prompt)), tokens, hidden=True)
        rows = []
        with torch.no_grad():
            for t in range(len(tokens) + 1):
                final = logits[t]
                probs, order = torch.softmax(final, -1).sort(descending=True)
                size = 1
                while size < top_k and float(probs[:size].sum()) < top_p:
                    size += 1
                cand = order[:size]
                best = (-1.0, None)
                for j in layers:
                    early = head(norm(hidden[j][t]))
                    p = float(torch.softmax(early, -1)[cand].max())
                    if p > best[0]:
                        best = (p, early)
                row = torch.full_like(final, float("-inf"))
                row[cand] = (final + alpha * best[0] * best[1])[cand]
                rows.append(row)
        return torch.stack(rows)
    return oracle


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_deco_steers_every_decoding_as_hidden_states_say(vlm, decoding):
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, "deco:start=1,end=4,alpha=2", [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _deco_oracle(vlm, [1, 2, 3], 2.0))


def test_batch_other_params_and_effect(vlm):
    results = generate(vlm, "deco:start=0,end=3,alpha=1,top_k=5,top_p=0.5", decoding=BEAM)
    assert_scores_match(results, IMAGES, PROMPTS, _deco_oracle(vlm, [0, 1, 2], 1.0, 5, 0.5))
    assert [r.token_ids for r in generate(vlm, "deco:start=1,alpha=3", n=6)] != [
        r.token_ids for r in generate(vlm, None, n=6)]
    assert not vlm.model.get_output_embeddings()._forward_hooks


def test_layers_and_conflicts(vlm):
    with pytest.raises(InputError, match="deco: start 20"):
        generate(vlm, "deco")  # the reference's layers 20..28 do not exist in a 4-layer model
    with pytest.raises(InputError, match="deco and dola"):
        generate(vlm, ["deco:start=1", "dola"])


def test_deco_under_opera_rollback_equals_inputs_alone(vlm):
    from test_interventions_branches import _opera_with_column

    spec = "deco:start=1,end=4,alpha=2"
    together = _opera_with_column(vlm, spec, IMAGES, PROMPTS)
    assert sum(r.extras["opera"]["rollbacks"] for r in together) > 0
    for row, result in enumerate(together):
        alone = _opera_with_column(vlm, spec, [IMAGES[row]], [PROMPTS[row]])[0]
        assert result.token_ids == alone.token_ids
        # DeCo's cut leaves -inf entries; OPERA's re-choice at a rollback position must still give finite
        # scores (it once shifted by a -inf minimum and scored NaN).
        assert np.isfinite(result.scores).all() and np.isfinite(result.sequence_score)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-4)
        np.testing.assert_allclose([result.sequence_score], [alone.sequence_score], atol=1e-4)
        assert result.extras["opera"]["rollback_events"] == alone.extras["opera"]["rollback_events"]
