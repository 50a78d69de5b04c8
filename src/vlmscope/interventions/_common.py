"""Pieces shared by the decoding-time interventions (PAI, AAI, truncation, FastV, VCD).

- `layer_span`: validate and clip a [start, end) decoder-layer range to the model's depth.
- `Branch`: an auxiliary forward branch (VCD's noised image, PAI's image-free prompt) with its own KV cache,
  run on the unmodified model and reordered together with the main beams.
- `scale_image_logits`: the shared edit `L ← a·|L| + b·L` on the image keys of the last query row.
- kept-key positions: FastV removes keys from the cache of later layers; other methods that index prompt keys
  (AAI's per-token weights) look up which original prompt positions a layer still holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlmscope.attention.engine import (
    AttentionPlan,
    EditContext,
    active_plan,
    attention_plan,
    decoder_attention_modules,
)
from vlmscope.decoding.session import InterventionState
from vlmscope.errors import InputError
from vlmscope.models.adapters import Adapter, Batch
from vlmscope.models.families_seed import model_forward

# --- layer ranges ---------------------------------------------------------------------------------------------


def layer_span(adapter: Adapter, start: int, end: int, method: str) -> range:
    """Decoder layers [start, end), `end` clipped to the model's depth (the references assume 32 layers)."""
    depth = adapter.num_layers
    if start < 0 or end < 0:
        raise InputError(f"{method}: layer range [{start}, {end}) must be non-negative")
    if start >= depth:
        raise InputError(f"{method}: start layer {start} is past this model's decoder layers 0..{depth - 1}; "
                         f"choose start < {depth}")
    end = min(end, depth)
    if end <= start:
        raise InputError(f"{method}: empty layer range [{start}, {end}); choose start < end")
    return range(start, end)


# --- the shared logit edit ---------------------------------------------------------------------------------------


def scale_image_logits(logits: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                       edit_dtype: str, ctx: EditContext) -> torch.Tensor:
    """Return `scale·|L| + shift·L` on the decoding rows' first `scale.shape[-1]` keys (the prompt), else `L`.

    Decoding rows: the last query row of the prefill; every row of a later forward. A later forward with
    several rows is one that decodes several positions at once (OPERA's candidates, a rollback's re-run of the
    response), and each of those rows is a step that the method steers.

    `scale` and `shift` are [N, 1, 1, P] weights, 0 and 1 on keys that are not edited; `shift=None` means 1
    everywhere (L + scale·|L|, PAI). When the layer has key masks (truncation, FastV's mask mode), entries
    already at the dtype minimum are left alone, so a large weight can never revive a masked image key.
    Decode steps run this for every edited layer, so it works in place (2–3 kernels) unless autograd is on.
    """
    if edit_dtype == "float32" and logits.dtype != torch.float32:
        logits = logits.float()
    elif logits.requires_grad:
        logits = logits.clone()
    # In the prefill only the last row: when another operation makes the layer run eagerly on every row, the
    # edit still receives all rows.
    head = logits[..., -1:, : scale.shape[-1]] if ctx.is_prefill else logits[..., : scale.shape[-1]]
    magnitude = head.abs()
    ops = ctx.plan.layers.get(ctx.layer_idx)
    if ops is not None and ops.key_masks:
        magnitude.masked_fill_(head == torch.finfo(head.dtype).min, 0.0)
        if shift is not None:
            shift = shift.masked_fill(head == torch.finfo(head.dtype).min, 1.0)
    if shift is not None:
        head.mul_(shift)
    head.addcmul_(magnitude, scale)
    return logits


def remove_capture(plan: AttentionPlan, layer: int, capture: Any) -> None:
    """Take a capture out of the plan (by identity: dataclass equality would compare tensors)."""
    ops = plan.layers.get(layer)
    if ops is not None:
        ops.captures[:] = [c for c in ops.captures if c is not capture]


# --- kept prompt-key positions per layer (published by FastV's physical drop) ------------------------------------
# They live on the run's plan (`plan.layer_key_positions`), so two runs never see each other's.


def set_key_positions(plan: AttentionPlan, layer: int, positions: torch.Tensor | None) -> None:
    """Record that `layer`'s prompt keys are the original prompt positions `positions` [N, P_l] (None: all)."""
    if positions is None:
        plan.layer_key_positions.pop(layer, None)
    else:
        plan.layer_key_positions[layer] = positions


def key_positions(plan: AttentionPlan, layer: int) -> torch.Tensor | None:
    """Original prompt positions of `layer`'s prompt keys [N, P_l], or None when the layer holds them all."""
    return plan.layer_key_positions.get(layer)


def clear_key_positions(plan: AttentionPlan) -> None:
    plan.layer_key_positions.clear()


def layer_prompt_weights(plan: AttentionPlan, layer: int, weights: torch.Tensor) -> torch.Tensor:
    """Per-prompt-position weights [N, P] restricted to the prompt keys `layer` actually holds."""
    positions = key_positions(plan, layer)
    if positions is None:
        return weights
    return weights.gather(1, positions.to(weights.device))


# --- auxiliary branches -------------------------------------------------------------------------------------------


class Branch:
    """A second sequence fed the same generated tokens as the main run, with its own `DynamicCache`.

    It runs the unmodified model: no attention-plan operations, no FastV dropping (those hooks act only while
    the main run's plan is active). Positions follow the session's rule (last prompt position + 1 per step).
    """

    def __init__(self, model: Any, adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 model_inputs: dict[str, Any] | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.input_ids = input_ids
        self.prompt_mask = attention_mask
        self.attention_mask = attention_mask
        self.model_inputs = dict(model_inputs or {})
        self.cache: Any = None
        self.last_positions: torch.Tensor | None = None
        self.forwards = 0

    @contextlib.contextmanager
    def _stock(self) -> Iterator[None]:
        # Normally called between main forwards (no plan active). If a caller forwards the branch while a plan is
        # active, an empty plan shields it from the main run's operations and hooks.
        if active_plan() is None:
            yield
            return
        with attention_plan(self.model, AttentionPlan(decoder_attention_modules(self.model))):
            yield

    def prefill(self) -> torch.Tensor:
        from transformers import DynamicCache

        self.attention_mask = self.prompt_mask
        batch = Batch(self.input_ids, self.attention_mask, self.model_inputs,
                      torch.zeros_like(self.input_ids, dtype=torch.bool), [], [])
        positions = self.adapter.position_ids(batch)
        self.last_positions = positions[..., -1]
        self.cache = DynamicCache(config=self.model.config)
        with self._stock():
            out = model_forward(self.model, input_ids=self.input_ids, attention_mask=self.attention_mask,
                                position_ids=positions, past_key_values=self.cache, use_cache=True,
                                return_dict=True, logits_to_keep=1,
                                **self.model_inputs)
        self.forwards += 1
        return out.logits[:, -1, :].float()

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.view(-1, 1).to(self.input_ids.device)
        ones = torch.ones(tokens.shape[0], 1, dtype=self.attention_mask.dtype, device=tokens.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.last_positions = self.last_positions + 1
        with self._stock():
            out = model_forward(self.model, input_ids=tokens, attention_mask=self.attention_mask,
                                position_ids=self.last_positions[..., None], past_key_values=self.cache,
                                use_cache=True, return_dict=True)
        self.forwards += 1
        return out.logits[:, -1, :].float()

    def step(self, new_tokens: torch.Tensor | None) -> torch.Tensor:
        """Prefill on the main run's prefill (`new_tokens is None`), else feed the main run's new tokens."""
        return self.prefill() if new_tokens is None or self.cache is None else self.advance(new_tokens)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is None:
            return
        index = index.to(self.input_ids.device)
        self.cache.reorder_cache(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        dim = 1 if self.last_positions.dim() == 2 else 0
        self.last_positions = self.last_positions.index_select(dim, index)

    def close(self) -> None:
        self.cache = None


def plausibility_cut(reference: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """`values` with −inf where `reference` < log(beta) + max(reference) (adaptive plausibility constraint).

    On logits this keeps tokens with p ≥ beta·max p; on log-probs it is the same set. beta = 0 keeps all.
    """
    if beta <= 0:
        return values
    cutoff = torch.log(torch.tensor(beta, dtype=reference.dtype, device=reference.device))
    cutoff = cutoff + reference.max(dim=-1, keepdim=True).values
    return values.masked_fill(reference < cutoff, float("-inf"))


class BranchContrastState(InterventionState):
    """Per-run state of a method that replaces the next-token scores by a contrast with a second branch (VCD,
    ICD, M3ID, SID): the branch is built at each prefill (`build_branch`), follows beam reorders and is closed
    with the run; `contrast` combines the main scores with the branch's."""

    def __init__(self, spec: Any, run: Any) -> None:
        super().__init__(spec, run)
        self._branch: Branch | None = None

    def build_branch(self, run: Any) -> Branch:
        raise NotImplementedError

    def contrast(self, logits: torch.Tensor, branch_logits: torch.Tensor, run: Any) -> torch.Tensor:
        raise NotImplementedError

    def setup(self, run: Any) -> None:
        if self._branch is not None:
            self._branch.close()  # a second prefill of the same run restarts the branch
        self._branch = self.build_branch(run)

    def process_logits(self, logits: torch.Tensor, run: Any, new_tokens: torch.Tensor | None) -> torch.Tensor:
        if self._branch is None:
            return logits
        return self.contrast(logits, self._branch.step(new_tokens), run)

    def reorder(self, index: torch.Tensor) -> None:
        if self._branch is not None:
            self._branch.reorder(index)

    def close(self) -> None:
        if self._branch is not None:
            self._branch.close()
        self._branch = None
