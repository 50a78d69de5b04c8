"""VISTA (visual steering vector + self-logits augmentation). Oracles: the hand computations of
docs/methods/vista.md, and stock forwards with test-side hooks: the layer outputs of the image and image-free
prompts give the vectors, an independent MLP hook steers an uncached full forward, and its hidden states give the
SLA window; compared under greedy, beam search and OPERA."""

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
from vlmscope.interventions.vista import sla_logits, steer_mlp_output


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return tiny_llava


def test_hand_computed():
    v = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(steer_mlp_output(torch.tensor([3.0, 4.0]), v, 0.1),
                               torch.tensor([3.2925, 3.7629]), atol=1e-4, rtol=0)
    got = steer_mlp_output(torch.tensor([-3.0, 4.0]), v, 0.1)  # pointing away: factor 1.6
    torch.testing.assert_close(got, torch.tensor([-2.4096, 4.3811]), atol=1e-4, rtol=0)
    assert float(got.norm()) == pytest.approx(5.0, abs=1e-5)
    x = torch.randn(3, 5)
    torch.testing.assert_close(steer_mlp_output(x, torch.randn(5), 0.0), x)  # λ = 0: identity
    torch.testing.assert_close(steer_mlp_output(x, torch.zeros(5), 0.5), x)  # zero vector: identity
    mixed = sla_logits(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([[0.0, 5.0, 0.0], [0.0, 3.0, 0.0]]), 0.3)
    torch.testing.assert_close(mixed, torch.tensor([1.4, 1.9, 0.0]))


def _layer_outputs(vlm, inputs):
    """Every decoder layer's output at the last position of a stock forward (test-side hooks)."""
    got, handles = {}, []
    for i, layer in enumerate(vlm.adapter.decoder_layers()):
        def hook(module, args, output, i=i):
            got[i] = (output[0] if isinstance(output, tuple) else output)[0, -1].float()
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            vlm.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[i] for i in sorted(got)])


def _vista_oracle(vlm, lam, gamma, window, steered):
    head = vlm.model.get_output_embeddings()

    def oracle(image, prompt, tokens):
        pos_inputs = processor_inputs(vlm, image, render(vlm, prompt))
        neg_inputs = processor_inputs(vlm, None, render(vlm, prompt, with_image=False))
        vectors = _layer_outputs(vlm, pos_inputs) - _layer_outputs(vlm, neg_inputs)  # [L, D]
        handles = []
        for i in steered:
            def steer(module, args, x, i=i):
                v = vectors[i]
                xu, vu = x / x.norm(dim=-1, keepdim=True), v / v.norm()
                factor = 1 + torch.clamp(-(xu * vu).sum(-1, keepdim=True), min=0)
                y = xu + lam * factor * vu
                return y / y.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)
            handles.append(vlm.adapter.decoder_layers()[i].mlp.register_forward_hook(steer))
        try:
            logits, hidden = full_forward(vlm, pos_inputs, tokens, hidden=True)
        finally:
            for h in handles:
                h.remove()
        if not window:
            return logits
        with torch.no_grad():
            window_logits = torch.stack([head(hidden[layer + 1]) for layer in window]).mean(0)
        return (1 - gamma) * logits + gamma * window_logits
    return oracle


SPEC = "vista:lam=0.5,gamma=0.3,sla_start=1,sla_end=3"


@pytest.mark.parametrize("decoding", ["greedy", BEAM, OPERA_NEUTRAL])
def test_vista_steers_every_decoding_as_stock_hooks_say(vlm, decoding):
    for image, prompt in zip(IMAGES, PROMPTS):
        results = generate(vlm, SPEC, [image], [prompt], decoding=decoding)
        assert_scores_match(results, [image], [prompt], _vista_oracle(vlm, 0.5, 0.3, [1, 2], range(4)))


def _hooks(vlm):
    modules = [vlm.model.get_output_embeddings()]
    for layer in vlm.adapter.decoder_layers():
        modules += [layer, layer.mlp]
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]


def test_batch_parts_and_no_leftovers(vlm):
    before = _hooks(vlm)
    spec = "vista:lam=1,gamma=0,steer_start=1,steer_end=3"  # VSV alone on layers 1..2, a left-padded batch
    results = generate(vlm, spec, decoding=BEAM)
    assert_scores_match(results, IMAGES, PROMPTS, _vista_oracle(vlm, 1.0, 0.0, [], [1, 2]))
    results = generate(vlm, "vista:lam=0,gamma=0.5,sla_start=0,sla_end=3", decoding=BEAM)  # SLA alone
    assert_scores_match(results, IMAGES, PROMPTS, _vista_oracle(vlm, 0.0, 0.5, [0, 1, 2], []))
    plain = generate(vlm, None, n=6)
    off = generate(vlm, "vista:lam=0,gamma=0", n=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in plain]
    assert [r.token_ids for r in generate(vlm, "vista:lam=2,gamma=0", n=6)] != [r.token_ids for r in plain]
    assert _hooks(vlm) == before


def test_window_checks_and_conflicts(vlm):
    with pytest.raises(InputError, match="vista: SLA window"):
        generate(vlm, "vista")  # the reference's window 25..30 does not exist in a 4-layer model
    with pytest.raises(InputError, match="vista and dola"):
        generate(vlm, [SPEC, "dola"])


def test_vista_under_opera_rollback_equals_inputs_alone(vlm):
    from test_interventions_branches import _opera_with_column

    together = _opera_with_column(vlm, SPEC, IMAGES, PROMPTS)
    assert sum(r.extras["opera"]["rollbacks"] for r in together) > 0
    for row, result in enumerate(together):
        alone = _opera_with_column(vlm, SPEC, [IMAGES[row]], [PROMPTS[row]])[0]
        assert result.token_ids == alone.token_ids
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-4)
        assert result.extras["opera"]["rollback_events"] == alone.extras["opera"]["rollback_events"]
