"""DeCo, Dynamic Correction Decoding (Wang et al., ICLR 2025; code zjunlp/Deco).

Preceding layers often still recognise the right object when the final layer hallucinates. Per position:
1. early-exit logits ℓ_j = W_U·norm(H_j) for the hidden-state indices j in [start, end) (the final norm *is*
   applied, unlike DoLa);
2. candidates C: the top-k (k = `top_k`) tokens of softmax ℓ_N, cut to the shortest prefix whose cumulative
   probability reaches `top_p`;
3. over the |layers| × |C| grid of p_j(y) = softmax(ℓ_j)(y), the maximum p_max at (j*, y*);
4. scores ℓ_N + α·p_max·ℓ_{j*} on C, −inf elsewhere.

Every row (input or beam) picks its own j* and p_max, as the reference's beam search does (its greedy and sampling
paths assume batch size 1). Runs through `_early_exit.EarlyExitState` (the LM head's output is rewritten), so
greedy, sampling, beam search and OPERA (with rollback) all see DeCo scores.

Defaults as the README and scripts for LLaVA-1.5: α = 0.6, layers 20..28 (`start=20, end=29`, hidden-state
indices: the outputs of decoder layers 19..27), top_k = 20, top_p = 0.9; the author suggests layers 15..24 for
other models. `end` is clipped to the model's depth. See docs/methods/deco.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._early_exit import EarlyExitState
from vlmscope.interventions.base import INTERVENTIONS, Intervention
from vlmscope.models.adapters import Adapter


def candidate_mask(final_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """bool [..., V]: the top-k tokens of softmax(final) cut to the shortest prefix with cumulative p >= top_p."""
    probs = torch.softmax(final_logits, dim=-1)
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    cumulative = values.cumsum(dim=-1)
    # Count of tokens before the cumulative probability reaches top_p, plus the one that reaches it.
    count = (cumulative < top_p).sum(dim=-1, keepdim=True) + 1
    keep = torch.arange(values.shape[-1], device=values.device) < count
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, indices, keep)


def deco_scores(final_logits: torch.Tensor, early_logits: torch.Tensor, alpha: float, top_k: int = 20,
                top_p: float = 0.9) -> torch.Tensor:
    """DeCo's scores from the final logits [..., V] and the early-exit logits [J, ..., V]."""
    candidates = candidate_mask(final_logits, top_k, top_p)
    early_probs = torch.softmax(early_logits, dim=-1).masked_fill(~candidates, -1.0)
    best_per_layer = early_probs.max(dim=-1).values  # [J, ...]
    p_max, layer = best_per_layer.max(dim=0)  # [...]
    index = layer[None, ..., None].expand(1, *final_logits.shape)
    chosen = early_logits.gather(0, index)[0]
    scores = final_logits + alpha * p_max[..., None] * chosen
    return scores.masked_fill(~candidates, float("-inf"))


@INTERVENTIONS.register("deco")
@dataclass(frozen=True)
class DeCo(Intervention):
    alpha: float = 0.6
    start: int = 20
    end: int = 29
    top_k: int = 20
    top_p: float = 0.9

    repeatable = False
    conflicts_with: ClassVar[tuple[str, ...]] = ("vcd", "icd", "m3id", "dola")

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        if other.name == "dola":
            return "deco and dola both rewrite the final logits from early layers: use one of them"
        return (f"deco and {other.name} cannot run together: {other.name}'s second branch would contrast the "
                "plain model with DeCo's scores; use one of them")

    def early_layers(self, adapter: Adapter) -> list[int]:
        """Hidden-state indices [start, end) clipped to the model's depth (H_1..H_{L−1} are layer outputs)."""
        depth = adapter.num_layers
        if self.start < 0 or self.start >= depth:
            raise InputError(f"deco: start {self.start} is not a hidden-state index of this model's "
                             f"{depth} layers; choose 0 <= start < {depth}")
        end = min(self.end, depth)
        if end <= self.start:
            raise InputError(f"deco: empty layer range [{self.start}, {end}); choose start < end")
        return list(range(self.start, end))

    def start_run(self, run: GenerationRun) -> _DeCoRun:
        return _DeCoRun(self, run)


class _DeCoRun(EarlyExitState):
    """DeCo's per-run state: the early-exit hooks."""

    spec: DeCo

    def __init__(self, spec: DeCo, run: GenerationRun) -> None:
        super().__init__(spec, run, spec.early_layers(run.adapter), apply_norm=True)

    def rewrite(self, final_logits: torch.Tensor, early_logits: torch.Tensor) -> torch.Tensor:
        return deco_scores(final_logits, early_logits, self.alpha, self.top_k, self.top_p)
