"""The first-token scores of the construction pipeline.

`reference_divergence` is the leave-one-out divergence exactly as the reference's `calculate_jsd` computes
it: both logit vectors are restricted to run A's top-10 vocabulary ids, P = softmax(A_top), Q = softmax(B_top),
M = (P + Q) / 2 and D = ½·[mean_v M log(M/P) + mean_v M log(M/Q)]: the reverse KL terms KL(M‖P), KL(M‖Q),
averaged over the 10 entries instead of summed. It is not the textbook JSD (`textbook_jsd`), but the shipped
thresholds (2e-3, 1.8e-3) are calibrated on it.
"""

from __future__ import annotations

from typing import Literal

import torch


def _restricted(logits_a: torch.Tensor, logits_b: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = logits_a.float()
    b = logits_b.float()
    if a.dim() == 1:
        a, b = a[None], b[None]
    ids = torch.topk(a, min(top_k, a.shape[-1]), dim=-1).indices
    p = a.gather(-1, ids).softmax(dim=-1)
    q = b.gather(-1, ids).softmax(dim=-1)
    return p, q


def reference_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """D per row of [..., V] logits (a scalar tensor for 1-D inputs)."""
    p, q = _restricted(logits_a, logits_b, top_k)
    m = (p + q) / 2
    kl_mp = (m * (m.log() - p.log())).mean(dim=-1)
    kl_mq = (m * (m.log() - q.log())).mean(dim=-1)
    out = 0.5 * (kl_mp + kl_mq)
    return out[0] if logits_a.dim() == 1 else out


def textbook_jsd(logits_a: torch.Tensor, logits_b: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """½·[KL(P‖M) + KL(Q‖M)] on the same top-k restriction (summed, not averaged)."""
    p, q = _restricted(logits_a, logits_b, top_k)
    m = (p + q) / 2
    out = 0.5 * ((p * (p.log() - m.log())).sum(-1) + (q * (q.log() - m.log())).sum(-1))
    return out[0] if logits_a.dim() == 1 else out


def divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, kind: Literal["reference", "jsd"] = "reference",
               top_k: int = 10) -> torch.Tensor:
    if kind == "reference":
        return reference_divergence(logits_a, logits_b, top_k)
    if kind == "jsd":
        return textbook_jsd(logits_a, logits_b, top_k)
    raise ValueError(f"unknown divergence {kind!r}; use 'reference' or 'jsd'")


def top1_probability(logits: torch.Tensor, top_k: int = 50) -> torch.Tensor:
    """The top-1 probability renormalised over the top_k highest logits (the single-token test's score)."""
    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1).values
    return top.softmax(dim=-1)[..., 0]
