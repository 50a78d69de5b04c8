"""PAI, "Paying More Attention to Image" (Liu et al., ECCV 2024; reference code LALBJ/PAI).

Attention boost: on decoder layers [start, end), the pre-softmax logits of the last query row over the image keys
become L + α·|L| (every image logit moves up), in every forward: the prefill (its last row predicts the first
token) and each decode step.

Optional CFG refinement (`cfg=true`): a second branch runs the same prompt without the image
(`adapter.encode_text_only`) on the unmodified model with its own KV cache; with s and u the log-softmax of the
conditional and unconditional logits, the next-token scores are γ·(s − u) + u, set to −inf where
s < log(0.1) + max s. γ = 1 means no CFG and no extra forward (as the reference).

Reference quirks and their options:
- `skip_prefill_with_cfg=true` (default, faithful): with CFG on, the reference's conditional prefill runs without
  the boost (LALBJ/PAI#22); the boost starts at the first decode step. `false` boosts the prefill too.
- `cfg_reorder_uncond_cache=true` (default, fix): under beam search the unconditional cache follows the beams.
  `false` reproduces the reference, whose unconditional cache keeps its original row order while it is fed the
  reordered beams' tokens (histories get mixed).
- γ defaults to 1.1 (the README command); the argparse default of the reference script is 2. With γ = 1 the
  reference never re-enables the boost (its processor returns before the toggle), so with the faithful default
  `cfg=true,gamma=1` runs neither the branch nor the boost (checked against the reference in
  tests/test_parity_pai.py); `skip_prefill_with_cfg=false` boosts every forward.
- The unconditional branch runs the unmodified model: no attention edits, key masks or FastV dropping of other
  interventions apply to it (the reference disables the boost there).
- `cfg_beam_raw_scores=false` (default): our beam search log-softmaxes the CFG scores like every other score, so
  beam scores stay log-probabilities. `true` (faithful) adds γ(s−u)+u to the beam scores unnormalised, as HF
  4.37's beam search adds its processors' output (`final_log_scores`; with `cfg_reorder_uncond_cache=false` this
  reproduces the reference token for token, tests/test_parity_pai.py). OPERA's loop always renormalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlmscope.attention.engine import EditContext
from vlmscope.decoding.session import GenerationRun
from vlmscope.interventions._common import (
    Branch,
    layer_span,
    plausibility_cut,
    scale_image_logits,
)
from vlmscope.interventions.base import INTERVENTIONS, Intervention, InterventionState
from vlmscope.models.adapters import Adapter


@INTERVENTIONS.register("pai")
@dataclass(frozen=True)
class PAI(Intervention):
    alpha: float = 0.2
    start: int = 2
    end: int = 32
    cfg: bool = False
    gamma: float = 1.1
    cfg_beta: float = 0.1
    skip_prefill_with_cfg: bool = True
    cfg_reorder_uncond_cache: bool = True
    cfg_beam_raw_scores: bool = False
    edit_dtype: Literal["model", "float32"] = "model"

    repeatable = False
    conflicts_with = ("aai",)

    def __post_init__(self) -> None:
        if self.cfg_beta < 0 or self.cfg_beta >= 1:
            raise ValueError("cfg_beta must be in [0, 1)")

    @property
    def supports_rollback(self) -> bool:  # type: ignore[override]
        # A CFG branch cannot follow a rollback of the main cache (OPERA); the attention boost alone can.
        return not self._uses_branch()

    def _uses_branch(self) -> bool:
        return self.cfg and self.gamma != 1.0

    @property
    def final_log_scores(self) -> bool:
        """Beam search adds this intervention's processed scores as given (read by `decoding.beam`)."""
        return self._uses_branch() and self.cfg_beam_raw_scores

    def layers(self, adapter: Adapter) -> range:
        return layer_span(adapter, self.start, self.end, "pai")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        overlap = set(self.layers(adapter)) & set(other.layers(adapter))  # type: ignore[attr-defined]
        if not overlap:
            return None
        return (f"pai and aai both re-weight image attention on layers {min(overlap)}..{max(overlap)}: "
                "use one of them, or give them disjoint layer ranges")

    def start_run(self, run: GenerationRun) -> _PAIRun:
        return _PAIRun(self, run)


class _PAIRun(InterventionState):
    """PAI's per-run state: the CFG branch and the per-layer boost weights."""

    spec: PAI

    def __init__(self, spec: PAI, run: GenerationRun) -> None:
        super().__init__(spec, run)
        self._reset()

    def _reset(self) -> None:
        self._run: GenerationRun | None = None
        self._branch: Branch | None = None
        self._weights: dict[int, torch.Tensor] = {}

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def prepare(self, run: GenerationRun) -> None:
        self.layers(run.adapter)

    def setup(self, run: GenerationRun) -> None:
        if self._run is run:  # a second prefill of the same run: ops are already in the plan
            self._weights.clear()
            return
        self._reset()
        self._run = run
        # Registered even for alpha=0 (an identity edit on the eager path), so alpha=0 exercises the machinery.
        for layer in self.layers(run.adapter):
            run.plan.add_edit(layer, self._edit, last_row_only=True)
        if self._uses_branch():
            ids, mask = run.adapter.encode_text_only(run.batch.prompts, device=run.device)
            inputs = {}
            if "mm_token_type_ids" in run.batch.model_inputs:
                # Qwen2-VL marks image tokens per position; the image-free prompt has none.
                inputs["mm_token_type_ids"] = torch.zeros_like(ids)
            self._branch = Branch(run.model, run.adapter, ids, mask, inputs)

    def _edit(self, logits: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        if self.cfg and self.skip_prefill_with_cfg and (ctx.is_prefill or not self._uses_branch()):
            # The reference's layers carry use_cfg=True until its CFG processor's first unconditional pass; with
            # gamma=1 that pass never runs, so the boost never starts.
            return logits
        weights = self._weights.get(ctx.layer_idx)
        if weights is None:
            plan = ctx.plan
            mask = plan.layer_image_masks.get(ctx.layer_idx, plan.image_mask)
            dtype = torch.float32 if self.edit_dtype == "float32" else logits.dtype
            weights = (self.alpha * mask.to(logits.device, torch.float32))[:, None, None, :].to(dtype)
            self._weights[ctx.layer_idx] = weights
        return scale_image_logits(logits, weights, None, self.edit_dtype, ctx)

    def process_logits(self, logits: torch.Tensor, run: GenerationRun, new_tokens: torch.Tensor | None
                       ) -> torch.Tensor:
        if self._branch is None:
            return logits
        uncond = torch.log_softmax(self._branch.step(new_tokens), dim=-1)
        cond = torch.log_softmax(logits, dim=-1)
        guided = self.gamma * (cond - uncond) + uncond
        return plausibility_cut(cond, guided, self.cfg_beta)

    def reorder(self, index: torch.Tensor) -> None:
        self._weights.clear()
        if self._branch is not None and self.cfg_reorder_uncond_cache:
            self._branch.reorder(index)

    def close(self) -> None:
        if self._branch is not None:
            self._branch.close()
        self._reset()

