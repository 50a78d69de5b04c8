"""AAI, "Align Attention with Image" (reference code Maccusl/AAI): PAI's boost weighted per image token.

Reference map (Maccusl/AAI extract.py, LLaVA-1.5): the vision tower's **last** self-attention layer, mean over
heads, CLS row and column dropped, summed over the patch queries, i.e. the attention each patch receives:
vis_ref[j] = Σ_i mean_h A_h[i, j]. Weights r = vis_ref / (mean(vis_ref) + 1e-8). On decoder layers [start, end)
the last query row's pre-softmax logits over the image keys become α·|r_j|·|L| + β·L (β = 1, r ≡ 1 is PAI).

Warm-up (reference quirk, default `warmup=true`): the reference records the position of the first call and edits
only when the current position is more than 5 past it, so the prefill and decode steps 1..5 are unedited and the
first 6 generated tokens equal the unsteered ones. We gate on the generation step (edit when step >
`warmup_steps`), which matches the reference for batch row 0 and is robust to left padding. `warmup=false`
edits every forward from the prefill on, like PAI.
Under OPERA a rollback re-runs the response in one forward whose rows share one step number, so the warm-up
positions are edited there too (an approximation of a token-by-token replay; `warmup=false` has no such gap).

Per family: LLaVA-1.5 as the reference (with `vision_feature_select_strategy="full"` the CLS token is an image
token and is kept, as the reference does for Shikra). LLaVA-NeXT: the same map on every crop (base view and
tiles), laid out with the model's own packing (`pack_image_features`), newline tokens get r = 1. Qwen2-VL has no
CLS-based tower attention in this form: AAI raises; use PAI. `reference="uniform"` (r ≡ 1) needs no vision pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.attention.engine import EditContext, switched_attention
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._common import (
    layer_prompt_weights,
    layer_span,
    scale_image_logits,
)
from vlmscope.interventions.base import INTERVENTIONS, Intervention, InterventionState
from vlmscope.models.adapters import Adapter, Batch


@INTERVENTIONS.register("aai")
@dataclass(frozen=True)
class AAI(Intervention):
    alpha: float = 0.3
    beta: float = 1.0
    start: int = 2
    end: int = 32
    warmup: bool = True
    warmup_steps: int = 5
    reference: Literal["vision", "uniform"] = "vision"
    edit_dtype: Literal["model", "float32"] = "model"

    repeatable = False

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0 (use warmup=false to edit from the prefill on)")

    def layers(self, adapter: Adapter) -> range:
        return layer_span(adapter, self.start, self.end, "aai")

    def start_run(self, run: GenerationRun) -> _AAIRun:
        return _AAIRun(self, run)


class _AAIRun(InterventionState):
    """AAI's per-run state: the vision reference map and the per-row / per-layer weights."""

    spec: AAI

    def __init__(self, spec: AAI, run: GenerationRun) -> None:
        super().__init__(spec, run)
        self._reset()

    def _reset(self) -> None:
        self._run: GenerationRun | None = None
        self.vis_ref: list[torch.Tensor] | None = None  # per input row, one value per image token
        self._scale: torch.Tensor | None = None  # [N, P]: α|r| at image positions, 0 elsewhere
        self._shift: torch.Tensor | None = None  # [N, P]: β at image positions, 1 elsewhere (None if β = 1)
        self._layer_weights: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def prepare(self, run: GenerationRun) -> None:
        self.layers(run.adapter)
        self._reset()
        if self.reference == "vision":
            # Before beam expansion: one vision pass per input, not per beam.
            self.vis_ref = vision_reference(run.model, run.adapter, run.batch)

    def setup(self, run: GenerationRun) -> None:
        if self._run is run:
            self._layer_weights.clear()
            return
        self._run = run
        batch = run.batch
        n, length = batch.image_mask.shape
        device = batch.input_ids.device
        r = torch.zeros(n, length, dtype=torch.float32, device=device)
        for row in range(n):
            positions = batch.image_mask[row].nonzero().flatten()
            if self.vis_ref is None:
                r[row, positions] = 1.0
            else:
                ref = self.vis_ref[row // run.num_beams].to(device, torch.float32)
                if ref.numel() != positions.numel():
                    raise InputError(f"aai: {ref.numel()} reference weights for {positions.numel()} image tokens "
                                     "in this prompt: one image per prompt is supported")
                r[row, positions] = ref / (ref.mean() + 1e-8)
        image = batch.image_mask.to(device)
        self._scale = self.alpha * r.abs()
        self._shift = None if self.beta == 1.0 else torch.where(image, torch.full_like(r, self.beta),
                                                                torch.ones_like(r))
        for layer in self.layers(run.adapter):
            run.plan.add_edit(layer, self._edit, last_row_only=True)

    def _edit(self, logits: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        if self.warmup and ctx.step <= self.warmup_steps:
            return logits
        weights = self._layer_weights.get(ctx.layer_idx)
        if weights is None:
            scale = layer_prompt_weights(ctx.plan, ctx.layer_idx, self._scale)[:, None, None, :]
            shift = None
            if self._shift is not None:
                shift = layer_prompt_weights(ctx.plan, ctx.layer_idx, self._shift)[:, None, None, :]
            dtype = torch.float32 if self.edit_dtype == "float32" else logits.dtype
            weights = (scale.to(logits.device, dtype), None if shift is None else shift.to(logits.device, dtype))
            self._layer_weights[ctx.layer_idx] = weights
        return scale_image_logits(logits, weights[0], weights[1], self.edit_dtype, ctx)

    def reorder(self, index: torch.Tensor) -> None:
        self._layer_weights.clear()
        if self._scale is not None:
            self._scale = self._scale.index_select(0, index.to(self._scale.device))
        if self._shift is not None:
            self._shift = self._shift.index_select(0, index.to(self._shift.device))

    def close(self) -> None:
        self._reset()


# --- the vision reference map ------------------------------------------------------------------------------------


@contextlib.contextmanager
def eager_vision(model: Any) -> Iterator[None]:
    """Run the vision tower with eager attention (SDPA returns no weights); the previous setting is restored."""
    config = model.config
    if "vision_config" not in getattr(config, "sub_configs", {}) or config.vision_config is None:
        raise InputError("aai: this model has no vision sub-config to switch to eager attention")
    # Reference-counted: two runs in two threads share the switch instead of undoing each other's.
    with switched_attention(model, "vision_config", "eager"):
        yield


def _received_attention(tower: Any, pixel_values: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    """[n, patches]: per image, the last layer's head-mean attention each patch receives from all patch queries."""
    out = tower(pixel_values, output_attentions=True, return_dict=True)
    attentions = getattr(out, "attentions", None)
    if not attentions:
        raise InputError("aai: the vision tower returned no attention weights")
    last = attentions[-1].float().mean(dim=1)  # [n, T, T]
    if drop_cls:
        last = last[:, 1:, 1:]
    return last.sum(dim=1)


def vision_reference(model: Any, adapter: Adapter, batch: Batch) -> list[torch.Tensor]:
    """AAI's vis_ref for every row of `batch`, one value per image token of that row (in token order)."""
    family = adapter.family
    if family not in ("llava", "llava_next"):
        raise InputError(f"aai: no vision reference map is defined for {family} models (LLaVA-1.5 and "
                         "LLaVA-NeXT are supported); use pai, or aai:reference=uniform")
    config = model.config
    drop_cls = getattr(config, "vision_feature_select_strategy", "default") == "default"
    tower = adapter.vision_tower()
    pixel_values = batch.model_inputs["pixel_values"]
    counts = batch.image_mask.sum(dim=1).tolist()
    refs: list[torch.Tensor] = []
    with torch.no_grad(), eager_vision(model):
        if family == "llava":
            received = _received_attention(tower, pixel_values, drop_cls)
            refs = [received[row] for row in range(received.shape[0])]
        else:
            refs = [_next_reference(model, tower, pixel_values[row], batch.model_inputs["image_sizes"][row],
                                    drop_cls) for row in range(batch.batch_size)]
    for row, ref in enumerate(refs):
        if ref.numel() != counts[row]:
            raise InputError(f"aai: the vision reference has {ref.numel()} values for {counts[row]} image "
                             "tokens; one image per prompt is supported")
    return refs


def _next_reference(model: Any, tower: Any, crops: torch.Tensor, image_size: torch.Tensor,
                    drop_cls: bool) -> torch.Tensor:
    """LLaVA-NeXT: the map of every crop, packed (unpadded tiles, newline per row) as the model packs features."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    inner = getattr(model, "model", model)
    if not hasattr(inner, "pack_image_features"):
        raise InputError("aai: this LLaVA-NeXT class has no pack_image_features; use pai")
    n_crops = image_size_to_num_patches(image_size=image_size, grid_pinpoints=config.image_grid_pinpoints,
                                        patch_size=config.vision_config.image_size)
    received = _received_attention(tower, crops[:n_crops], drop_cls)  # [n_crops, side²]
    newline = torch.full((1,), float("nan"), dtype=received.dtype, device=received.device)
    packed, _ = inner.pack_image_features([received[:, :, None]], image_size[None], config.vision_feature_select_strategy,
                                          image_newline=newline)
    values = (packed[0] if isinstance(packed, list | tuple) else packed).flatten()
    # Newline tokens carry no patch: give them the mean, so their weight r is exactly 1.
    is_newline = torch.isnan(values)
    return torch.where(is_newline, values[~is_newline].mean(), values)
