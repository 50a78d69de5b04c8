"""VAF / ClearSight, Visual Amplification Fusion (Yin, Si, Wang; CVPR 2025; code ustc-hyin/ClearSight).

In the middle decoder layers [start, end) (the reference: 8 < i < 15, i.e. 9..14), the pre-softmax attention
scores S = QKᵀ/√d of every query row that comes after the image are scaled per key: image keys by α
(enhancement), system keys (everything before the image: BOS, system message, "USER: ") by β (suppression); the
other keys and the rows of the system prompt and of the image itself are untouched. Applied in every forward
(the prefill and each decode step), for all heads of the layer, so every decoding method composes with it.

Scores are scaled, not probabilities: a negative image score becomes more negative, so the image block is
sharpened rather than uniformly boosted. Masked scores (padding, other methods' key masks) stay masked.

Reference quirks: the spans are hard-coded for the LLaVA-1.5 vicuna_v1 prompt with 576 image tokens
(system = [0, 35), image = [35, 611)); here they come from each row's image-token positions, so other templates,
left padding and other image-token counts work. The paper restricts the edit to "visual perception heads"; the
released code edits all heads, which we follow. Defaults as the README and infer_pope.sh: α = 1.15, β = 0.95
(the argparse defaults are 1, i.e. off). See docs/methods/vaf.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmscope.attention.engine import EditContext
from vlmscope.decoding.session import GenerationRun
from vlmscope.interventions._common import layer_span
from vlmscope.interventions.base import INTERVENTIONS, Intervention, InterventionState
from vlmscope.models.adapters import Adapter


def vaf_key_factors(image_keys: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per-key score factors [B, K]: α on image keys, β on the keys before the first image key, 1 elsewhere."""
    keys = image_keys.shape[-1]
    first = image_keys.float().argmax(dim=-1)  # first image key of every row
    system = torch.arange(keys, device=image_keys.device)[None, :] < first[:, None]
    factors = torch.ones(image_keys.shape, dtype=torch.float32, device=image_keys.device)
    factors = factors.masked_fill(system, beta)
    return factors.masked_fill(image_keys, alpha)


def rows_after_image(image_keys: torch.Tensor, query_len: int) -> torch.Tensor:
    """bool [B, q]: which of the last `query_len` positions come after the row's last image key."""
    keys = image_keys.shape[-1]
    last = keys - 1 - image_keys.flip(-1).float().argmax(dim=-1)
    rows = torch.arange(keys - query_len, keys, device=image_keys.device)
    return rows[None, :] > last[:, None]


@INTERVENTIONS.register("vaf")
@dataclass(frozen=True)
class VAF(Intervention):
    alpha: float = 1.15
    beta: float = 0.95
    start: int = 9
    end: int = 15

    repeatable = False
    conflicts_with: ClassVar[tuple[str, ...]] = ("pai", "aai")

    def layers(self, adapter: Adapter) -> range:
        return layer_span(adapter, self.start, self.end, "vaf")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        overlap = set(self.layers(adapter)) & set(other.layers(adapter))  # type: ignore[attr-defined]
        if not overlap:
            return None
        return (f"vaf and {other.name} both re-weight image attention on layers {min(overlap)}..{max(overlap)}: "
                "use one of them, or give them disjoint layer ranges")

    def start_run(self, run: GenerationRun) -> _VAFRun:
        return _VAFRun(self, run)


class _VAFRun(InterventionState):
    """VAF's per-run state: the registered edits."""

    spec: VAF

    def __init__(self, spec: VAF, run: GenerationRun) -> None:
        super().__init__(spec, run)
        self._run: GenerationRun | None = None

    def prepare(self, run: GenerationRun) -> None:
        self.layers(run.adapter)

    def setup(self, run: GenerationRun) -> None:
        if self._run is run:  # a second prefill of the same run: the edits are already in the plan
            return
        self._run = run
        for layer in self.layers(run.adapter):
            # Every row after the image is edited, so the prefill runs these layers eagerly on all rows.
            run.plan.add_edit(layer, self._edit, last_row_only=False)

    def _edit(self, logits: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        if ctx.image_keys is None:
            return logits
        image_keys = ctx.image_keys.to(logits.device)
        factors = vaf_key_factors(image_keys, self.alpha, self.beta)  # [B, K]
        rows = rows_after_image(image_keys, logits.shape[-2])  # [B, q]
        weight = torch.where(rows[:, None, :, None], factors[:, None, None, :], 1.0).to(logits.dtype)
        masked = logits == torch.finfo(logits.dtype).min
        return torch.where(masked, logits, logits * weight)

    def close(self) -> None:
        self._run = None
