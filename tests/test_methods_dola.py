"""DoLa (contrasting layers). Oracles: the hand computations of docs/methods/dola.md, HF's candidate-layer rule
(transformers 4.43–4.55 `_dola_decoding`), and an HF-style re-computation (F.kl_div, the relative-top filter)
from the stock model's `output_hidden_states`, under greedy, beam search and OPERA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
from vlmscope.interventions.dola import candidate_layers, dola_scores, layer_divergence


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return tiny_llava


def test_layer_choice_hand_computed():
    final = torch.tensor([-1.3, 1.1, -1.8])
    early = torch.tensor([[0.2, -1.0, 2.9], [2.8, -1.7, 0.4]])  # A, B
    ref = layer_divergence(final, early, "reference")
    jsd = layer_divergence(final, early, "jsd")
    torch.testing.assert_close(ref, torch.tensor([0.3206, 0.3290]), atol=1e-4, rtol=0)
    torch.testing.assert_close(jsd, torch.tensor([0.5041, 0.4849]), atol=1e-4, rtol=0)
    scores = dola_scores(final, early, "reference")  # picks B: only token 1 survives the filter
    assert torch.isinf(scores[[0, 2]]).all()
    assert float(scores[1]) == pytest.approx(4.4609, abs=1e-4)
    picked_a = dola_scores(final, early, "jsd")
    want_a = torch.log_softmax(final, -1)[1] - torch.log_softmax(early[0], -1)[1]
    assert float(picked_a[1]) == pytest.approx(float(want_a), abs=1e-5)


def test_full_contrast_hand_computed():
    final = torch.tensor([3.0, 2.0, 0.0, -1.0])
    early = torch.tensor([[0.5, 0.4, 0.3, 0.2], [3.0, 1.0, 0.5, -1.0]])  # layers 2 and 4
    scores = dola_scores(final, early)
    # j* = 2; threshold max log p + ln 0.1 = -2.6644 keeps tokens 0 and 1
    torch.testing.assert_close(scores[:2], torch.tensor([0.8807, -0.0193]), atol=1e-4, rtol=0)
    assert torch.isinf(scores[2:]).all()
    # Rows of a batch pick their layers independently.
    batch = dola_scores(torch.stack([final, final.flip(0)]), torch.stack([early, early.flip(-1)], dim=1))
    torch.testing.assert_close(batch[0], scores)
    torch.testing.assert_close(batch[1], scores.flip(0))


def test_candidate_layers_follow_hf():
    assert candidate_layers("high", 32, False) == list(range(16, 32, 2))
    assert candidate_layers("low", 32, False) == list(range(0, 16, 2))
    assert candidate_layers("low", 32, True) == list(range(2, 16, 2))
    assert candidate_layers("high", 48, False) == list(range(28, 48, 2))
    assert candidate_layers("low", 48, False) == list(range(0, 20, 2))
    assert candidate_layers("low", 4, True) == [2]
    assert candidate_layers((3, 1), 4, False) == [1, 3]
    with pytest.raises(InputError, match="0..3"):
        candidate_layers((4,), 4, False)


def _hf_dola(final, premature, relative_top=0.1):
    """HF's `_dola_select_contrast` + `_relative_top_filter`, for one row (so the batch mean is the row)."""
    if premature.shape[0] == 1:
        base = premature[0]
    else:
        m = 0.5 * (F.softmax(final, -1)[None] + F.softmax(premature, -1))
        kl1 = F.kl_div(F.log_softmax(final, -1)[None], m, reduction="none").mean(-1)
        kl2 = F.kl_div(F.log_softmax(premature, -1), m, reduction="none").mean(-1)
        base = premature[int((0.5 * (kl1 + kl2)).argmax())]
    s, b = final.log_softmax(-1), base.log_softmax(-1)
    thresh = min(float(s.max()) + np.log(relative_top), float(s.sort(descending=True).values[0]))
    b[s < thresh] = -1e-3
    s[s < thresh] = -math.inf
    return s - b


def _dola_oracle(vlm, layers, norm=False):
    head = vlm.model.get_output_embeddings()
    final_norm = vlm.adapter.decoder().norm

    def oracle(image, prompt, tokens):
        logits, hidden = full_forward(vlm, processor_inputs(vlm, image, render(vlm, prompt)), tokens, hidden=True)
        rows = []
        with torch.no_grad():
            for t in range(len(tokens) + 1):
                early = torch.stack([head(final_norm(hidden[j][t]) if norm else hidden[j][t]) for j in layers])
                rows.append(_hf_dola(logits[t], early))
        return torch.stack(rows)
    return oracle


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_dola_steers_every_decoding_as_hidden_states_say(vlm, decoding):
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, "dola:layers=[0,1,2]", [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _dola_oracle(vlm, [0, 1, 2]))


def test_static_normed_and_batched(vlm):
    results = generate(vlm, "dola:layers=[2],premature_norm=true", decoding=BEAM)  # left-padded batch of two
    assert_scores_match(results, IMAGES, PROMPTS, _dola_oracle(vlm, [2], norm=True))


def test_dola_changes_output_and_leaves_no_hooks(vlm):
    head = vlm.model.get_output_embeddings()
    assert [r.token_ids for r in generate(vlm, "dola:layers=[1]", n=6)] != [
        r.token_ids for r in generate(vlm, None, n=6)]
    assert not head._forward_hooks
    assert all(not layer._forward_pre_hooks for layer in vlm.adapter.decoder_layers())
    with pytest.raises(InputError, match="dola and vcd"):
        generate(vlm, ["dola", "vcd"])
    assert not head._forward_hooks


def test_dola_under_opera_rollback_equals_inputs_alone(vlm):
    from test_interventions_branches import _opera_with_column

    together = _opera_with_column(vlm, "dola:layers=[0,1,2]", IMAGES, PROMPTS)
    # Row 0 rolls back at the constructed column; row 1 meets EOS before it (11 tokens).
    assert together[0].extras["opera"]["rollbacks"] > 0
    for row, result in enumerate(together):
        alone = _opera_with_column(vlm, "dola:layers=[0,1,2]", [IMAGES[row]], [PROMPTS[row]])[0]
        assert result.token_ids == alone.token_ids
        assert result.sequence_score == pytest.approx(alone.sequence_score, abs=1e-4)
        assert result.extras["opera"]["rollback_events"] == alone.extras["opera"]["rollback_events"]
    unsteered = _opera_with_column(vlm, None, IMAGES, PROMPTS)
    assert [r.token_ids for r in together] != [r.token_ids for r in unsteered]
