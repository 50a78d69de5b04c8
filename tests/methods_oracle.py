"""Stock oracles shared by tests/test_methods_*.py (the mitigation methods of issue 18).

Everything here runs the plain model with uncached full forwards over prompt + generated tokens, built with the
processor directly, so the cache, the branches, beam reorders and OPERA's candidate forwards of vlmscope are all
under test when a method's decoding output is compared with these scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

PROMPTS = ["describe this image .", "what is in the image ? is there a cat on the table ?"]

# Penalty neutral and rollback off: OPERA then ranks as beam search, through its own candidate forwards.
BEAM = "beam:num_beams=3"
# Stock beam rules: the oracle normalises sequence scores as transformers 5.x does (faithful OPERA uses 4.29's).
OPERA_NEUTRAL = "opera:num_beams=3,penalty_weights=0,threshold=100,renormalize_candidates=false,beam_rules=stock"


def make_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))


IMAGES = [make_image(0), make_image(1)]


def processor_inputs(vlm, image: Image.Image | None, text: str) -> dict[str, torch.Tensor]:
    """The processor's (or, without an image, the tokenizer's) tensors for one rendered prompt."""
    if image is None:
        return dict(vlm.adapter.tokenizer([text], return_tensors="pt"))
    return dict(vlm.processor(images=[image], text=[text], return_tensors="pt"))


def render(vlm, prompt: str, with_image: bool = True, system: str | None = None) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def full_forward(vlm, inputs: dict[str, torch.Tensor], tokens: Sequence[int], hidden: bool = False):
    """One uncached stock forward over prompt + `tokens`; returns (logits at the positions that predict
    tokens[0..T] [T + 1, V], hidden states at those positions (tuple of [T + 1, D]) or None)."""
    inputs = dict(inputs)
    ids = torch.cat([inputs.pop("input_ids"), torch.tensor([list(tokens)], dtype=torch.long)], dim=1)
    mask = torch.ones_like(ids)
    inputs.pop("attention_mask", None)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, len(tokens), dtype=inputs["mm_token_type_ids"].dtype)], 1)
    prompt_len = ids.shape[1] - len(tokens)
    with torch.no_grad():
        out = vlm.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, **inputs)
    rows = slice(prompt_len - 1, None)
    states = tuple(h[0, rows].float() for h in out.hidden_states) if hidden else None
    return out.logits[0, rows].float(), states


ScoreOracle = Callable[[Image.Image, str, list[int]], torch.Tensor]


def assert_scores_match(results, images, prompts, oracle: ScoreOracle, atol: float = 2e-4) -> None:
    """Every result's per-token log-probabilities (and its mean, the sequence score with length_penalty 1)
    equal the log-softmax of the oracle's scores for that input at each generated position."""
    for result, image, prompt in zip(results, images, prompts):
        tokens = list(result.token_ids)
        assert tokens, "empty hypothesis"
        scores = oracle(image, prompt, tokens)  # [T + 1, V]
        want = [float(torch.log_softmax(scores[t], -1)[tok]) for t, tok in enumerate(tokens)]
        np.testing.assert_allclose(result.scores, want, atol=atol)
        if result.decoding.startswith(("beam", "opera")):
            assert result.sequence_score == pytest.approx(sum(want) / len(want), abs=atol)


def generate(vlm, spec, images=IMAGES, prompts=PROMPTS, n=6, decoding="greedy"):
    return vlm.generate(list(images), list(prompts), max_new_tokens=n, decoding=decoding, interventions=spec)
