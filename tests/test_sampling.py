"""Sampling draws from the distribution stock transformers' logits warpers define.

Oracle: a full stock forward over prompt + sampled tokens gives each step's logits; transformers'
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (in `generate`'s order) turn them into the
distribution to sample from. The package's sampler must pass exactly that distribution to `torch.multinomial`
at every step (captured by a spy), and every drawn token must lie in its support.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmscope.api import VLM

PROMPT = "describe this image ."


def make_image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(5).rand(40, 48, 3) * 255).astype("uint8"))


def stock_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def sample_with_spy(vlm: VLM, monkeypatch, spec: str, n: int, interventions=None):
    drawn: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(probs, num_samples, *args, **kwargs):
        drawn.append(probs.detach().clone())
        return real(probs, num_samples, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    result = vlm.generate(make_image(), PROMPT, max_new_tokens=n, decoding=spec, interventions=interventions)
    monkeypatch.setattr(torch, "multinomial", real)
    return result, drawn


def stock_step_logits(vlm: VLM, tokens: list[int], model_inputs: dict | None = None) -> torch.Tensor:
    """[len(tokens), V]: the stock logits that predicted each token (one uncached forward)."""
    batch = vlm.encode([make_image()], [PROMPT])
    ids = torch.cat([batch.input_ids, torch.tensor([tokens[:-1]], dtype=batch.input_ids.dtype)], dim=1)
    with torch.no_grad():
        out = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        **(model_inputs if model_inputs is not None else batch.model_inputs))
    prompt_len = batch.input_ids.shape[1]
    return out.logits[0, prompt_len - 1: prompt_len - 1 + len(tokens)].float()


def assert_draws_from(drawn: list[torch.Tensor], tokens: list[int], logits: torch.Tensor,
                      warpers: LogitsProcessorList) -> None:
    assert len(drawn) == len(tokens)
    ids = torch.zeros(1, 1, dtype=torch.long)  # the warpers used here ignore the input ids
    for step, (probs, token) in enumerate(zip(drawn, tokens)):
        expected = torch.softmax(warpers(ids, logits[step: step + 1].clone()), dim=-1)
        torch.testing.assert_close(probs.float(), expected, atol=2e-5, rtol=1e-4)
        assert expected[0, token] > 0, f"step {step}: token {token} is outside the warped support"


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8),
                                                       (1.5, 10, 0.9)])
def test_sampling_equals_the_stock_warpers(tiny_llava: VLM, monkeypatch, temperature: float, top_k: int,
                                           top_p: float) -> None:
    spec = f"sample:seed=3,temperature={temperature},top_k={top_k},top_p={top_p}"
    result, drawn = sample_with_spy(tiny_llava, monkeypatch, spec, 8)
    assert_draws_from(drawn, result.token_ids, stock_step_logits(tiny_llava, result.token_ids),
                      stock_warpers(temperature, top_k, top_p))
    if top_k:  # the cut is real: fewer tokens than the vocabulary remain
        assert all(int((p > 0).sum()) <= top_k for p in drawn)
    if top_p < 1.0:
        assert any(int((p > 0).sum()) < p.shape[-1] for p in drawn)
    # The same seed draws the same tokens.
    again, _ = sample_with_spy(tiny_llava, monkeypatch, spec, 8)
    assert again.token_ids == result.token_ids


def test_sampling_under_vcd_warps_the_contrasted_logits(tiny_llava: VLM, monkeypatch) -> None:
    from vlmscope.interventions.vcd import noised_model_inputs

    alpha, beta = 1.0, 0.1
    vcd = f"vcd:alpha={alpha},beta={beta},noise_seed=7"
    result, drawn = sample_with_spy(tiny_llava, monkeypatch, "sample:seed=4,top_k=20", 6, interventions=vcd)
    batch = tiny_llava.encode([make_image()], [PROMPT])
    clean = stock_step_logits(tiny_llava, result.token_ids)
    noised = stock_step_logits(tiny_llava, result.token_ids, noised_model_inputs(batch.model_inputs, 500, 7))
    # VCD (Leng et al.): (1 + alpha) clean - alpha noised, tokens below beta x the clean maximum cut off.
    contrasted = (1 + alpha) * clean - alpha * noised
    cutoff = np.log(beta) + clean.max(dim=-1, keepdim=True).values
    contrasted = contrasted.masked_fill(clean < cutoff, float("-inf"))
    assert_draws_from(drawn, result.token_ids, torch.log_softmax(contrasted, -1), stock_warpers(1.0, 20, 1.0))
