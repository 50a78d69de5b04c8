"""FastV (Chen et al., ECCV 2024; reference code pkunlp-icler/FastV): drop unimportant image tokens after layer K.

Ranking: the head-mean attention probabilities of the last prompt query at decoder layer k−1, over the image
keys (captured in the prefill). The `round(n_img·(1−ratio))` best image tokens are kept; every text token stays.

`mode=drop` (default): the dropped tokens really leave the sequence for layers ≥ k. Forward pre-hooks on those
decoder layers gather, in the prefill, the hidden states (at layer k), the (cos, sin) position embeddings, the
position ids and the 4-D mask (rows and columns), so the kept tokens keep their original RoPE positions; in
decode steps they gather the mask's key columns (the cache of layers ≥ k holds only the kept prompt keys, while
the mask is sized from layer 0). Pruning happens once, in the prefill ("static", as the reference's KV-cache
port): every later token sees the same pruned set. Saves prefill compute and KV-cache memory.
`mode=mask`: the same selection as a dtype-min mask on the dropped image keys for layers ≥ k; no speed-up,
it is the correctness reference of the drop mode.

`rerank=prefill` (default) ranks once, as above. `rerank=every_step` is the reference's `use_cache=False` path
(its `demo-hf.py`): every decode step recomputes the whole sequence (prompt + generated tokens) with no KV cache
(`GenerationRun.recompute_full_sequence`) and re-ranks the image tokens on the newest token's attention at layer
k−1, so the kept set may change from step to step; layers ≥ k see every text and generated token and the kept
image tokens at their original positions. No speed-up (each step costs a prefill); it runs with greedy and
sample decoding and no other intervention.

`rank_per_row=false` (default, reference): batch row 0's ranking (in image-token order) is used for every row,
as the reference assumes batch size 1. `rank_per_row=true` ranks every row on its own attention (the fix for
batches). Both modes update `plan.layer_image_masks` for layers ≥ k so other operations see only the kept image
keys, and `image_tokens` reports the kept image tokens. The hooks act only during the main run's forwards (not on
VCD/CFG branches) and are always removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from vlmscope.attention.engine import AttentionPlan, Capture, EditContext, active_plan
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._common import (
    clear_key_positions,
    remove_capture,
    set_key_positions,
)
from vlmscope.interventions.base import INTERVENTIONS, Intervention, InterventionState
from vlmscope.models.adapters import Adapter


@INTERVENTIONS.register("fastv")
@dataclass(frozen=True)
class FastV(Intervention):
    k: int = 2
    ratio: float = 0.5
    mode: Literal["drop", "mask"] = "drop"
    rank_per_row: bool = False
    rerank: Literal["prefill", "every_step"] = "prefill"

    repeatable = False
    conflicts_with = ("truncate",)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1: the ranking uses the attention of layer k-1")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError("ratio (the fraction of image tokens dropped) must be in [0, 1]")
        if self.rerank not in ("prefill", "every_step"):
            raise ValueError("rerank must be 'prefill' (rank once) or 'every_step' (the reference's "
                             "use_cache=False path)")

    @property
    def supports_beams(self) -> bool:  # type: ignore[override]
        # Re-ranking recomputes the sequence without a cache; beam reorders would need one.
        return self.rerank == "prefill"

    @property
    def supports_rollback(self) -> bool:  # type: ignore[override]
        return self.rerank == "prefill"

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        if other.keep > 0 and other.layer < adapter.num_layers:  # type: ignore[attr-defined]
            return ("fastv and truncate:keep>0 both select which image tokens later layers see: use one of them, "
                    "or truncate with keep=0")
        return None

    def start_run(self, run: GenerationRun) -> _FastVRun:
        return _FastVRun(self, run)


class _FastVRun(InterventionState):
    """FastV's per-run state: the ranking capture, the kept positions and the decoder-layer hooks."""

    spec: FastV

    def __init__(self, spec: FastV, run: GenerationRun) -> None:
        super().__init__(spec, run)
        self._reset()

    def _reset(self) -> None:
        self._run: GenerationRun | None = None
        self._plan: AttentionPlan | None = None
        self._capture: Capture | None = None
        self._keep: torch.Tensor | None = None  # bool [N, P]: prompt positions kept for layers >= k
        self._keep_idx: torch.Tensor | None = None  # [N, P'] kept positions, ascending (drop mode)
        self._dropped: torch.Tensor | None = None  # bool [N, P]: dropped image positions (mask mode)
        self._prompt_len = 0
        self._full_len = 0  # the sequence length of the last ranked forward (the prompt, or prompt + t)
        self._depth = 0
        self.kept_image_tokens: list[int] | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def prepare(self, run: GenerationRun) -> None:
        depth = run.adapter.num_layers
        if self.k >= depth:
            raise InputError(f"fastv: k={self.k} is past this model's decoder layers 0..{depth - 1}; "
                             f"choose 1 <= k < {depth}")
        # Qwen3-VL's DeepStack adds vision features at the image positions of its first layers: a shorter
        # sequence there would break it, so drop only from the first layer past them.
        fed = int(getattr(run.adapter, "vision_fed_layers", lambda: 0)())
        if self.mode == "drop" and self.k < fed:
            raise InputError(f"fastv: this {run.adapter.family} model adds vision features to decoder layers "
                             f"0..{fed - 1} (DeepStack), so image tokens cannot be dropped before layer {fed}: "
                             f"choose k >= {fed}, or fastv:mode=mask")
        counts = run.batch.image_mask.sum(dim=1)
        if (self.mode == "drop" or not self.rank_per_row) and not bool((counts == counts[0]).all()):
            raise InputError("fastv: the rows have different numbers of image tokens; use fastv:mode=mask,"
                             "rank_per_row=true or one input at a time")
        if self.rerank == "every_step":
            others = [i.name for i in run.interventions if i is not self.spec]
            if others:
                raise InputError(f"fastv:rerank=every_step recomputes the sequence at every step and runs alone, "
                                 f"not with {', '.join(others)}: drop them or use fastv:rerank=prefill")
            run.recompute_full_sequence = True
        self._reset()

    def setup(self, run: GenerationRun) -> None:
        if self.rerank == "every_step" and run.num_beams > 1:
            raise InputError("fastv:rerank=every_step recomputes the sequence without a KV cache and cannot "
                             "follow beams: use greedy or sample decoding, or fastv:rerank=prefill")
        if self._run is not run:
            self._run = run
            self._plan = run.plan
            self._depth = run.adapter.num_layers
            self._prompt_len = run.batch.input_ids.shape[1]
            layers = run.adapter.decoder_layers()
            # Layer k's hook ranks (both modes); the drop mode also gathers on every layer from k on.
            hooked = range(self.k, self._depth) if self.mode == "drop" else [self.k]
            run.enter_context(_pre_hooks({i: layers[i] for i in hooked}, self._pre_hook))
            if self.mode == "mask":
                for layer in range(self.k, self._depth):
                    run.plan.add_key_mask(layer, self._blocked)
        if self._capture is None:
            self._capture = run.plan.add_capture(self.k - 1, Capture(rows="last", columns="all",
                                                                     head_reduce="mean"))

    def process_logits(self, logits: torch.Tensor, run: GenerationRun, new_tokens: torch.Tensor | None
                       ) -> torch.Tensor:
        if self.rerank == "every_step":
            return logits  # the capture stays: every forward re-ranks
        if new_tokens is None and self._capture is not None:
            remove_capture(run.plan, self.k - 1, self._capture)  # ranked once per prefill
            self._capture = None
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        if self._keep is None:
            return
        index = index.to(self._keep.device)
        self._keep = self._keep.index_select(0, index)
        if self._dropped is not None:
            self._dropped = self._dropped.index_select(0, index)
        if self._keep_idx is not None:
            self._keep_idx = self._keep_idx.index_select(0, index)
            for layer in range(self.k, self._depth):
                set_key_positions(self._plan, layer, self._keep_idx)

    def close(self) -> None:
        if self._plan is not None:
            clear_key_positions(self._plan)
        self._reset()

    # --- ranking -------------------------------------------------------------------------------------------------
    def _rank(self, plan: AttentionPlan) -> None:
        if self._capture is None or not self._capture.records:
            raise RuntimeError("fastv: the attention of layer k-1 was not captured in this prefill")
        scores = self._capture.records[-1][:, 0, -1, :].float()  # [N, L]: L = P, or P + t when re-ranking
        self._capture.clear()  # only this forward's row is needed (re-ranking would otherwise pile them up)
        image = plan.image_keys(self.k - 1, scores.shape[1], scores.device)
        n = scores.shape[0]
        keep = ~image
        kept_counts = []
        if self.rank_per_row:
            for row in range(n):
                positions = image[row].nonzero().flatten()
                n_keep = _kept_count(positions.numel(), self.ratio)
                top = torch.topk(scores[row, positions], n_keep).indices
                keep[row, positions[top]] = True
                kept_counts.append(n_keep)
        else:
            # Reference: rank on batch row 0 and keep the same image-token indices in every row.
            first = image[0].nonzero().flatten()
            n_keep = _kept_count(first.numel(), self.ratio)
            top = torch.topk(scores[0, first], n_keep).indices
            for row in range(n):
                positions = image[row].nonzero().flatten()
                keep[row, positions[top]] = True
                kept_counts.append(n_keep)
        self._keep = keep
        image_layers = range(self.k, self._depth)
        if self.mode == "drop":
            self._keep_idx = keep.nonzero()[:, 1].view(n, -1)
            kept_image = image.gather(1, self._keep_idx)
            # The kept prompt positions (generated tokens, all kept, sort after them); equal in every row.
            prompt_kept = self._keep_idx[:, : int(keep[0, : self._prompt_len].sum())]
            for layer in image_layers:
                plan.layer_image_masks[layer] = kept_image
                set_key_positions(plan, layer, prompt_kept)
        else:
            self._dropped = image & ~keep
            for layer in image_layers:
                plan.layer_image_masks[layer] = image & keep
        run = self._run
        beams = max(1, run.num_beams) if run is not None else 1
        self.kept_image_tokens = kept_counts[::beams]
        if run is not None:
            run.image_tokens = list(self.kept_image_tokens)

    def _blocked(self, ctx: EditContext) -> torch.Tensor | None:
        """Mask mode: dtype-min on the dropped image keys (prompt part; generated keys stay visible)."""
        if self._dropped is None:
            return None
        dropped = self._dropped
        if ctx.key_len <= dropped.shape[1]:
            return dropped[:, : ctx.key_len]
        pad = torch.zeros(dropped.shape[0], ctx.key_len - dropped.shape[1], dtype=torch.bool,
                          device=dropped.device)
        return torch.cat([dropped, pad], dim=1)

    # --- the decoder-layer pre-hook ------------------------------------------------------------------------------
    def _pre_hook(self, layer: int, module: torch.nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        plan = active_plan()
        if plan is None or plan is not self._plan or kwargs is None:
            # A branch forward (VCD, CFG) or a foreign call: leave it alone. `kwargs` is missing only when torch
            # runs this hook half-registered (it adds a kwargs hook in two steps) from another thread's forward
            # on the same model, which is never this run's.
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        # A full-sequence forward: the prefill, or with rerank=every_step every forward.
        prefill = hidden.shape[1] > 1 and (plan.step == 0 or self.rerank == "every_step")
        if prefill and layer == self.k:
            self._full_len = hidden.shape[1]
            self._rank(plan)
        if self.mode != "drop":
            return None
        idx = self._keep_idx
        if idx is None:
            raise RuntimeError("fastv: no kept-token index (the prefill did not reach layer k)")
        full = self._full_len
        idx = idx.to(hidden.device)
        mask = kwargs.get("attention_mask")
        if prefill:
            if hidden.shape[1] == full:
                hidden = _take(hidden, idx, batch_dim=0, seq_dim=1)
                args = (hidden, *args[1:]) if args else args
                if not args:
                    kwargs["hidden_states"] = hidden
            embeddings = kwargs.get("position_embeddings")
            if embeddings is not None:
                kwargs["position_embeddings"] = tuple(
                    _take(e, idx, batch_dim=e.dim() - 3, seq_dim=e.dim() - 2) if e.shape[-2] == full else e
                    for e in embeddings
                )
            positions = kwargs.get("position_ids")
            if isinstance(positions, torch.Tensor) and positions.shape[-1] == full:
                kwargs["position_ids"] = _take(positions, idx, batch_dim=positions.dim() - 2,
                                               seq_dim=positions.dim() - 1)
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                if mask.shape[-2] == full:
                    mask = _take(mask, idx, batch_dim=0, seq_dim=2)
                kwargs["attention_mask"] = _take(mask, idx, batch_dim=0, seq_dim=3)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            tail = torch.arange(full, mask.shape[-1], device=idx.device).expand(idx.shape[0], -1)
            kwargs["attention_mask"] = _take(mask, torch.cat([idx, tail], dim=1), batch_dim=0, seq_dim=3)
        return args, kwargs


def _kept_count(n_image: int, ratio: float) -> int:
    return int(round(n_image * (1.0 - ratio)))


def _take(tensor: torch.Tensor, index: torch.Tensor, batch_dim: int, seq_dim: int) -> torch.Tensor:
    """Gather `tensor` along `seq_dim` with a per-row index [N, L'] (rows along `batch_dim`, size N or 1)."""
    n = index.shape[0]
    if tensor.shape[batch_dim] != n:
        shape = list(tensor.shape)
        shape[batch_dim] = n
        tensor = tensor.expand(*shape)
    view = [1] * tensor.dim()
    view[batch_dim] = n
    view[seq_dim] = index.shape[1]
    target = list(tensor.shape)
    target[seq_dim] = index.shape[1]
    return torch.gather(tensor, seq_dim, index.view(view).expand(*target))


@contextlib.contextmanager
def _pre_hooks(layers: dict[int, torch.nn.Module], hook: Any) -> Iterator[None]:
    handles = []
    try:
        for idx, module in layers.items():
            handles.append(module.register_forward_pre_hook(partial(hook, idx), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
