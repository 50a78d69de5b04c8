"""Decoding methods as registered dataclasses, and the per-input result they produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlmscope.registry import Registry

DECODINGS = Registry("decoding")


@dataclass
class Hypothesis:
    """The decoded continuation of one input row."""

    token_ids: list[int]
    scores: list[float]  # log-probability of each chosen token under the (processed) distribution
    sequence_score: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class DecodingMethod:
    """Base: `decode(run, max_new_tokens, eos_ids, pad_id) -> one Hypothesis per input row`.

    Subclasses are frozen dataclasses (immutable specs): whatever one decode computes (beam state, a random
    generator, OPERA's search) is made inside `decode`, so one instance serves any number of runs at once.
    """

    name = "decoding"

    def decode(self, run: Any, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> list[Hypothesis]:
        raise NotImplementedError


def trim_after_eos(tokens: list[int], scores: list[float], eos_ids: list[int]) -> tuple[list[int], list[float]]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1], scores[: i + 1]
    return tokens, scores


def eos_tensor(eos_ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(eos_ids or [-1], device=device)
