"""M3ID, Multi-Modal Mutual-Information Decoding (Favero et al., CVPR 2024; no official code).

A second branch runs the same prompt without the image (`adapter.encode_text_only`, as PAI's CFG branch) on the
unmodified model with its own KV cache, fed the main run's tokens and reordered with the beams. With l_c and l_u
the log-softmax of the conditioned and the image-free logits, the t-th generated token is scored

    l* = l_c + ((1 − γ_t)/γ_t)·(l_c − l_u),   γ_t = exp(−λ·t),   i.e. l_c + (e^{λt} − 1)·(l_c − l_u),

then set to −inf where l_c < log β + max l_c (VCD's plausibility cut-off, which the third-party
re-implementations use in place of the paper's confidence gate, whose threshold is not published).

Defaults as sangminwoo/AvisC: λ = 0.02, t counted from `t0 = 1` (RITUAL counts from 0, which leaves the first
token uncorrected), β = 0.1. The references sample (T = 1); here sampling, greedy and beam search are the decoding
method's choice. See docs/methods/m3id.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmscope.decoding.session import GenerationRun
from vlmscope.interventions._common import Branch, BranchContrastState, plausibility_cut
from vlmscope.interventions.base import INTERVENTIONS, Intervention
from vlmscope.models.adapters import Adapter


def m3id_weight(lam: float, t: int) -> float:
    """(1 − γ_t)/γ_t = e^{λt} − 1, the weight of the pointwise mutual information at generated token t."""
    return math.expm1(lam * t)


def m3id_scores(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, lam: float, t: int, beta: float
                ) -> torch.Tensor:
    """l_c + (e^{λt} − 1)·(l_c − l_u) on log-softmaxed inputs, −inf where l_c < log β + max l_c."""
    cond = torch.log_softmax(cond_logits.float(), dim=-1)
    uncond = torch.log_softmax(uncond_logits.float(), dim=-1)
    return plausibility_cut(cond, cond + m3id_weight(lam, t) * (cond - uncond), beta)


def text_only_branch(run: GenerationRun) -> Branch:
    """A branch over the run's prompts without the image, on the unmodified model."""
    ids, mask = run.adapter.encode_text_only(run.batch.prompts, device=run.device)
    inputs = {}
    if "mm_token_type_ids" in run.batch.model_inputs:
        # Qwen2-VL marks image tokens per position; the image-free prompt has none.
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)
    return Branch(run.model, run.adapter, ids, mask, inputs)


@INTERVENTIONS.register("m3id")
@dataclass(frozen=True)
class M3ID(Intervention):
    lam: float = 0.02
    t0: int = 1
    beta: float = 0.1

    # The image-free branch's cache cannot follow a rollback of the main cache (OPERA).
    supports_rollback = False
    repeatable = False
    conflicts_with: ClassVar[tuple[str, ...]] = ("vcd", "icd")

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError("lam must be >= 0")
        if self.t0 not in (0, 1):
            raise ValueError("t0 must be 0 (RITUAL) or 1 (AvisC)")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError("beta must be in [0, 1)")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        return (f"m3id and {other.name} each replace the next-token scores by a contrast with a second branch: "
                "use one of them")

    def start_run(self, run: GenerationRun) -> _M3IDRun:
        return _M3IDRun(self, run)


class _M3IDRun(BranchContrastState):
    """M3ID's per-run state: the image-free branch."""

    spec: M3ID

    def build_branch(self, run: GenerationRun) -> Branch:
        return text_only_branch(run)

    def contrast(self, logits: torch.Tensor, branch_logits: torch.Tensor, run: GenerationRun) -> torch.Tensor:
        # run.step tokens are already generated, so these scores pick token number run.step + 1 (t0 = 1).
        return m3id_scores(logits, branch_logits, self.lam, run.step + self.t0, self.beta)
