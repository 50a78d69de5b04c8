"""SID, Self-Introspective Decoding (Huo et al., ICLR 2025; code huofushuo/SID).

The contrast branch is the model itself with most image tokens hidden (CT2S, context and text-aware token
selection): a second branch with its own KV cache sees the same inputs; in each of its forwards, the attention of
decoder layer `layer − 1` (mean over heads, the forward's last query row) over the image keys ranks the image
tokens, and for layers ≥ `layer` every image key except the `keep` *least* attended is masked, for every query row
of that forward. The selection is redone each step from the new token's row (in the prefill: the last prompt
token); earlier cache entries keep the masks they were computed under, as in the reference.

Scores: (1 + α)·ℓ − α·ℓ_sid, set to −inf where ℓ < log β + max ℓ.

Reference quirks and choices:
- α: the CLI's `--cd-alpha 1` is never passed, so the reference runs with its fallback α = 0.5; default 0.5.
- The reference's greedy path takes the argmax of the contrast with no cut-off (β ignored); its sampling path
  cuts at β = 0.1. Default β = 0.1; `beta=0` reproduces the reference's greedy.
- The reference ranks with batch row 0 for the whole batch; here every row (input or beam) ranks its own tokens.
- keep = 100 (POPE script; the CHAIR script uses 50), layer = 2; layer 0 (random tokens) is not offered.
- The image span comes from each row's image-token positions rather than a hard-coded template offset.
See docs/methods/sid.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmscope.attention.engine import (
    AttentionPlan,
    Capture,
    EditContext,
    attention_plan,
    decoder_attention_modules,
)
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._common import Branch, BranchContrastState, plausibility_cut
from vlmscope.interventions.base import INTERVENTIONS, Intervention
from vlmscope.models.adapters import Adapter


def least_attended_mask(attention: torch.Tensor, image_keys: torch.Tensor, keep: int) -> torch.Tensor:
    """bool [B, K]: the image keys to hide, i.e. all but the `keep` with the smallest `attention` [B, K]."""
    ranked = attention.float().masked_fill(~image_keys, float("inf"))
    count = min(keep, ranked.shape[-1])
    kept = torch.zeros_like(image_keys)
    kept.scatter_(1, ranked.topk(count, dim=-1, largest=False).indices, True)
    return image_keys & ~kept


class _SIDBranch(Branch):
    """A branch whose forwards run a plan of their own: the ranking capture and the image-key masks."""

    def __init__(self, *args: Any, image_mask: torch.Tensor, layer: int, keep: int, depth: int) -> None:
        super().__init__(*args)
        self.plan = AttentionPlan(decoder_attention_modules(self.model))
        self.plan.image_mask = image_mask
        self.keep = keep
        self.capture = self.plan.add_capture(layer - 1, Capture(rows="last", head_reduce="mean"))
        self._hidden: torch.Tensor | None = None
        for idx in range(layer, depth):
            self.plan.add_key_mask(idx, self._mask)

    def _mask(self, ctx: EditContext) -> torch.Tensor | None:
        if self._hidden is None:
            attention = self.capture.records[-1][:, 0, -1, :]  # [B, K] of layer − 1 in this forward
            image = ctx.image_keys
            if image is None:
                return None
            self._hidden = least_attended_mask(attention.to(image.device), image[:, : attention.shape[-1]],
                                               self.keep)
        return self._hidden

    @contextlib.contextmanager
    def _stock(self) -> Iterator[None]:
        self.capture.clear()
        self._hidden = None
        with attention_plan(self.model, self.plan):
            yield
        self.capture.clear()
        self._hidden = None

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.plan.reorder(index)


@INTERVENTIONS.register("sid")
@dataclass(frozen=True)
class SID(Intervention):
    alpha: float = 0.5
    beta: float = 0.1
    layer: int = 2
    keep: int = 100

    # The branch's cache cannot follow a rollback of the main cache (OPERA).
    supports_rollback = False
    repeatable = False
    conflicts_with: ClassVar[tuple[str, ...]] = ("vcd", "icd", "m3id", "dola", "deco", "vista")

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError("beta must be in [0, 1)")
        if self.keep < 1:
            raise ValueError("keep must be >= 1")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        return f"sid and {other.name} both replace the next-token scores: use one of them"

    def check_layer(self, adapter: Adapter) -> None:
        if not 1 <= self.layer < adapter.num_layers:
            raise InputError(f"sid: layer must be in 1..{adapter.num_layers - 1} for this model (the ranking "
                             f"reads layer − 1, the masks act from `layer` on), got {self.layer}")

    def start_run(self, run: GenerationRun) -> _SIDRun:
        return _SIDRun(self, run)


class _SIDRun(BranchContrastState):
    """SID's per-run state: the self-introspective branch."""

    spec: SID

    def prepare(self, run: GenerationRun) -> None:
        self.check_layer(run.adapter)

    def build_branch(self, run: GenerationRun) -> _SIDBranch:
        batch = run.batch
        return _SIDBranch(run.model, run.adapter, batch.input_ids, batch.attention_mask, batch.model_inputs,
                          image_mask=batch.image_mask, layer=self.layer, keep=self.keep,
                          depth=run.adapter.num_layers)

    def contrast(self, logits: torch.Tensor, introspective: torch.Tensor, run: GenerationRun) -> torch.Tensor:
        return plausibility_cut(logits, (1.0 + self.alpha) * logits - self.alpha * introspective, self.beta)
