"""DoLa, Decoding by Contrasting Layers (Chuang et al., ICLR 2024; code voidism/DoLa, HF `_dola_decoding`).

The LM head is applied to premature hidden states H_j (j in hidden-state numbering: H_0 is the input embedding,
H_j for j ≥ 1 the output of decoder layer j − 1) and contrasted with the final logits q_N:

- j* is the candidate whose distribution diverges most from the final one. `divergence="reference"` is what both
  reference codes compute and call JSD: ½[KL(M‖P_N) + KL(M‖P_j)] averaged over the vocabulary, M = ½(P_N + P_j);
  `"jsd"` is the textbook ½[KL(P_N‖M) + KL(P_j‖M)]. One candidate is static DoLa.
- Relative-top filter on log P_N: keep tokens with log P_N ≥ max log P_N + log(relative_top) (at least
  `min_tokens_to_keep`); the scores are log P_N − log P_{j*} there and −inf elsewhere.

Premature states get no final norm (`premature_norm=false`, both reference codes, voidism/DoLa#9).

How: `_early_exit.EarlyExitState` holds the candidate layers' inputs (H_j) and replaces the LM head's output by the
DoLa scores at every position it projects, so every decoding method (greedy, sampling, beam search, OPERA's
candidate and rollback forwards) sees DoLa scores where it sees logits.

Defaults as HF: `layers="high"` (HF's recommendation for short answers; `"low"` for long reasoning), i.e.
range(N/2, N, 2) for N ≤ 40 layers, else range(N − 20, N, 2); `"low"` is range(s, N/2, 2) (else range(s, 20, 2))
with s = 2 when the embeddings are tied to the LM head (H_0 would project to the identity) and 0 otherwise.
relative_top = 0.1. The references pick one premature layer for the whole batch (HF averages the divergence over
the batch); here every row picks its own, so a batch gives the same result as its inputs alone. The reference
recommends a repetition penalty of 1.2; that is a decoding option, not part of this spec. See docs/methods/dola.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._early_exit import EarlyExitState
from vlmscope.interventions.base import INTERVENTIONS, Intervention
from vlmscope.models.adapters import Adapter


def candidate_layers(layers: str | tuple[int, ...], num_layers: int, tied_embeddings: bool) -> list[int]:
    """Premature hidden-state indices for `layers` ("low", "high" or explicit indices), as HF chooses them."""
    if not isinstance(layers, str):
        chosen = sorted(set(int(j) for j in layers))
        if not chosen or chosen[0] < 0 or chosen[-1] >= num_layers:
            raise InputError(f"dola: premature layers must be hidden-state indices in 0..{num_layers - 1} "
                             f"(the final layer {num_layers} is the mature one), got {list(layers)}")
        return chosen
    start = 2 if tied_embeddings else 0
    if layers == "low":
        if start == num_layers // 2:
            return [start]
        return list(range(start, num_layers // 2, 2)) if num_layers <= 40 else list(range(start, 20, 2))
    return (list(range(num_layers // 2, num_layers, 2)) if num_layers <= 40
            else list(range(num_layers - 20, num_layers, 2)))


def layer_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor, divergence: str) -> torch.Tensor:
    """Divergence of every premature distribution from the final one: [J, ..., V] and [..., V] -> [J, ...]."""
    p_final = torch.softmax(final_logits, dim=-1)
    p_early = torch.softmax(premature_logits, dim=-1)
    log_final = torch.log_softmax(final_logits, dim=-1)
    log_early = torch.log_softmax(premature_logits, dim=-1)
    mean = 0.5 * (p_final + p_early)
    if divergence == "reference":
        # F.kl_div(log P, M) = Σ M (log M − log P) = KL(M‖P), averaged over the vocabulary (both references).
        kl_final = torch.xlogy(mean, mean) - mean * log_final
        kl_early = torch.xlogy(mean, mean) - mean * log_early
        return 0.5 * (kl_final.mean(-1) + kl_early.mean(-1))
    log_mean = torch.log(mean)
    kl_final = (p_final * (log_final - log_mean)).sum(-1)
    kl_early = (p_early * (log_early - log_mean)).sum(-1)
    return 0.5 * (kl_final + kl_early)


def dola_scores(final_logits: torch.Tensor, premature_logits: torch.Tensor, divergence: str = "reference",
                relative_top: float = 0.1, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """DoLa's next-token scores from the final logits [..., V] and the candidates' logits [J, ..., V]."""
    final_logits = final_logits.float()
    premature_logits = premature_logits.float()
    if premature_logits.shape[0] == 1:
        base = premature_logits[0]
    else:
        chosen = layer_divergence(final_logits, premature_logits, divergence).argmax(dim=0)  # [...]
        index = chosen[None, ..., None].expand(1, *final_logits.shape)
        base = premature_logits.gather(0, index)[0]
    log_final = torch.log_softmax(final_logits, dim=-1)
    log_base = torch.log_softmax(base, dim=-1)
    top = log_final.topk(min_tokens_to_keep, dim=-1).values[..., -1:]
    threshold = torch.minimum(top, log_final.max(dim=-1, keepdim=True).values + math.log(relative_top))
    return (log_final - log_base).masked_fill(log_final < threshold, float("-inf"))


@INTERVENTIONS.register("dola")
@dataclass(frozen=True)
class DoLa(Intervention):
    layers: Literal["low", "high"] | tuple[int, ...] = "high"
    divergence: Literal["reference", "jsd"] = "reference"
    relative_top: float = 0.1
    premature_norm: bool = False

    repeatable = False
    # Contrastive-branch methods contrast the *plain* model's logits with a branch that DoLa does not see.
    conflicts_with: ClassVar[tuple[str, ...]] = ("vcd", "icd", "m3id")

    def __post_init__(self) -> None:
        if not 0.0 < self.relative_top <= 1.0:
            raise ValueError("relative_top must be in (0, 1]")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        return (f"dola and {other.name} cannot run together: {other.name}'s second branch would contrast the "
                "plain model with DoLa's scores; use one of them")

    def premature_layers(self, adapter: Adapter) -> list[int]:
        tied = bool(getattr(adapter.text_config, "tie_word_embeddings", False)
                    or getattr(adapter.model.config, "tie_word_embeddings", False))
        return candidate_layers(self.layers, adapter.num_layers, tied)

    def start_run(self, run: GenerationRun) -> _DoLaRun:
        return _DoLaRun(self, run)


class _DoLaRun(EarlyExitState):
    """DoLa's per-run state: the early-exit hooks."""

    spec: DoLa

    def __init__(self, spec: DoLa, run: GenerationRun) -> None:
        super().__init__(spec, run, spec.premature_layers(run.adapter), spec.premature_norm)

    def rewrite(self, final_logits: torch.Tensor, early_logits: torch.Tensor) -> torch.Tensor:
        return dola_scores(final_logits, early_logits, self.divergence, self.relative_top)
