"""Which visual tokens the codebook keeps: per-token redundancy scores and the keep rules.

Scores are computed in float32 on L2-normalised vectors. (The reference computes them in the model dtype;
fp16 rounding can flip tokens that sit exactly at the threshold.)
"""

from __future__ import annotations

from typing import Literal

import torch

Score = Literal["max_cosine", "double_softmax", "single_softmax"]


def redundancy_scores(features: torch.Tensor, prototypes: torch.Tensor, score: Score = "max_cosine") -> torch.Tensor:
    """[L] score per token: how close it is to the codebook (higher = more redundant).

    `max_cosine`: max over prototypes of the cosine similarity (reference `high_info_patch`).
    `single_softmax`: max over prototypes of softmax over prototypes of the cosines.
    `double_softmax`: max over prototypes of softmax over tokens ⊙ softmax over prototypes.
    """
    x = torch.nn.functional.normalize(features.float(), p=2, dim=-1)
    c = torch.nn.functional.normalize(prototypes.to(x.device).float(), p=2, dim=-1)
    sim = x @ c.T  # [L, N]
    if score == "max_cosine":
        return sim.max(dim=-1).values
    if score == "single_softmax":
        return sim.softmax(dim=-1).max(dim=-1).values
    if score == "double_softmax":
        return (sim.softmax(dim=0) * sim.softmax(dim=-1)).max(dim=-1).values
    raise ValueError(f"unknown score {score!r}")


def keep_mask(scores: torch.Tensor, threshold: float | None = None, keep_ratio: float | None = None,
              score: Score = "max_cosine") -> torch.Tensor:
    """bool [L]: True for the tokens to keep.

    threshold: keep tokens scoring strictly below it (adaptive count).
    keep_ratio with `max_cosine`: keep the round(L·ratio) lowest-scoring tokens (reference `fix_num`; ties go
    to the earlier token, a stable sort). With the softmax scores: keep tokens strictly below the k-th largest
    score, k = round(L·(1 − ratio)) (the reference's top-k rule; ties can keep fewer).
    """
    n = scores.shape[0]
    if threshold is not None:
        return scores < threshold
    if keep_ratio is None:
        raise ValueError("give a threshold or a keep_ratio")
    if score == "max_cosine":
        count = round(n * keep_ratio)
        order = torch.sort(scores, stable=True).indices[:count]
        mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
        mask[order] = True
        return mask
    k = round(n * (1 - keep_ratio))
    if k <= 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    kth = torch.topk(scores, k).values[-1]
    return scores < kth
