"""Information-flow truncation ("From Redundancy to Relevance", Zhang et al., NAACL 2025, §3.4).

From decoder layer `layer` on, no query attends to any image key, in the prefill and at every decode step
(the released code's K = 0 setting; its constant for LLaVA-1.5 POPE is layer 22, the default here). The image
tokens still run through every layer; they just stop feeding the text. A `layer` at or past the model's depth
truncates nothing. The caller's padding mask is kept (the released code drops it).

`keep=K` is the FastV-like variant of the paper's Eq. 12: the K image keys with the highest head-mean attention
from the last prompt query at layer−1 stay visible. They are ranked once, in the prefill (a capture on layer−1
in the same forward: layers run in order, so the ranking exists before layer `layer` needs it), per batch row.
Truncation masks keys; it does not remove tokens, so `image_tokens` still reports the tokens fed to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmscope.attention.engine import Capture, EditContext
from vlmscope.decoding.session import GenerationRun
from vlmscope.interventions._common import remove_capture
from vlmscope.interventions.base import INTERVENTIONS, Intervention, InterventionState


@INTERVENTIONS.register("truncate")
@dataclass(frozen=True)
class Truncate(Intervention):
    layer: int = 22
    keep: int = 0

    repeatable = False

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError("layer must be >= 0 (the first decoder layer whose queries lose the image)")
        if self.keep < 0:
            raise ValueError("keep must be >= 0")
        if self.keep > 0 and self.layer == 0:
            raise ValueError("keep>0 ranks image keys at layer-1: choose layer >= 1")

    def start_run(self, run: GenerationRun) -> _TruncateRun:
        return _TruncateRun(self, run)


class _TruncateRun(InterventionState):
    """Truncation's per-run state: the ranking capture and the kept image keys."""

    spec: Truncate

    def __init__(self, spec: Truncate, run: GenerationRun) -> None:
        super().__init__(spec, run)
        self._reset()

    def _reset(self) -> None:
        self._run: GenerationRun | None = None
        self._capture: Capture | None = None
        self._kept: torch.Tensor | None = None  # bool [N, P]: image keys kept visible (keep > 0)

    def prepare(self, run: GenerationRun) -> None:
        self._reset()

    def setup(self, run: GenerationRun) -> None:
        depth = run.adapter.num_layers
        if self.layer >= depth:
            return  # past the last layer: nothing to truncate
        if self._run is not run:
            self._run = run
            for layer in range(self.layer, depth):
                run.plan.add_key_mask(layer, self._blocked)
        if self.keep > 0 and self._capture is None:
            self._capture = run.plan.add_capture(self.layer - 1, Capture(rows="last", columns="all",
                                                                         head_reduce="mean"))

    def _blocked(self, ctx: EditContext) -> torch.Tensor | None:
        image = ctx.image_keys
        if image is None or self.keep == 0:
            return image
        if ctx.is_prefill and ctx.layer_idx == self.layer:
            self._rank(ctx)
        if self._kept is None:
            raise RuntimeError("truncate: no ranking of the image keys (the prefill did not run layer-1)")
        kept = self._kept.to(image.device)
        blocked = image.clone()
        blocked[:, : kept.shape[1]] &= ~kept
        return blocked

    def _rank(self, ctx: EditContext) -> None:
        if self._capture is None or not self._capture.records:
            raise RuntimeError("truncate: the layer-1 attention was not captured in this prefill")
        scores = self._capture.records[-1][:, 0, -1, :].float()  # [N, kv] at layer-1
        image = ctx.plan.image_keys(self.layer - 1, scores.shape[1], scores.device)
        scores = scores.masked_fill(~image, float("-inf"))
        k = min(self.keep, scores.shape[1])
        top = torch.topk(scores, k, dim=1).indices
        kept = torch.zeros_like(image).scatter_(1, top, True) & image  # rows with < K image keys keep them all
        self._kept = kept

    def process_logits(self, logits: torch.Tensor, run: GenerationRun, new_tokens: torch.Tensor | None
                       ) -> torch.Tensor:
        if new_tokens is None and self._capture is not None:
            # Ranked once per prefill: stop capturing for the decode steps.
            remove_capture(run.plan, self.layer - 1, self._capture)
            self._capture = None
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        if self._kept is not None:
            self._kept = self._kept.index_select(0, index.to(self._kept.device))

    def close(self) -> None:
        self._reset()
