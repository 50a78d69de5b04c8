"""The attention engine: one registered attention function that runs a per-layer plan.

transformers 5.x picks the attention function by name on every forward
(`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`). We register one function under
the key "vlmscope" together with a mask builder (without the mask registration transformers silently drops the
causal/padding mask for unknown keys). The active `AttentionPlan` lives in a `ContextVar`, so `generate`, our own
loops and backward passes need no extra kwargs and two models in one process do not interfere.

Layers without operations in the active plan (or any call while no plan is active) go to stock SDPA, so an idle
engine costs one dictionary lookup per layer. Layers with operations run eager math with, in this order:
mask → key masks → logit edits → softmax (fp32, cast back as stock eager) → captures → retain_grad → P·V.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_KEY = "vlmscope"

_ACTIVE_PLAN: contextvars.ContextVar[AttentionPlan | None] = contextvars.ContextVar(
    "vlmscope_attention_plan", default=None
)


@dataclass
class EditContext:
    """What a logit edit or key mask needs to know about the current attention call."""

    layer_idx: int
    step: int  # generation step: 0 for the prefill, then 1, 2, ...
    query_len: int
    key_len: int
    image_keys: torch.Tensor | None  # bool [B, key_len], True at image key positions
    plan: AttentionPlan

    @property
    def is_prefill(self) -> bool:
        return self.step == 0


LogitEdit = Callable[[torch.Tensor, EditContext], torch.Tensor]
KeyMask = Callable[[EditContext], "torch.Tensor | None"]


@dataclass
class Capture:
    """Keep part of the attention probabilities of one layer.

    rows: "last" keeps the last query row of every forward (what each generated token attended to),
    "all" keeps every query row. columns: "image" keeps only the image keys (requires the same number of image
    tokens in every batch row), "all" keeps every key. head_reduce: None keeps the selected heads,
    "mean"/"max" reduce over them on the device. Each forward appends one tensor `[B, heads|1, rows, cols]`
    to `records` together with its step in `steps`.
    """

    heads: Sequence[int] | None = None
    rows: Literal["last", "all"] = "last"
    columns: Literal["image", "all"] = "all"
    head_reduce: Literal["mean", "max"] | None = None
    to_cpu: bool = False
    dtype: torch.dtype | None = torch.float32
    records: list[torch.Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def clear(self) -> None:
        self.records.clear()
        self.steps.clear()


@dataclass
class LayerOps:
    captures: list[Capture] = field(default_factory=list)
    logit_edits: list[LogitEdit] = field(default_factory=list)
    key_masks: list[KeyMask] = field(default_factory=list)
    retain_grad: bool = False
    retained: list[torch.Tensor] = field(default_factory=list)
    # When every op only needs the last query row, the prefill can run the other rows through SDPA.
    last_row_only: bool = True

    def empty(self) -> bool:
        return not (self.captures or self.logit_edits or self.key_masks or self.retain_grad)


class AttentionPlan:
    """Per-layer operations for one model, plus the step counter and image-key positions they refer to."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module] | None = None) -> None:
        self.layers: dict[int, LayerOps] = {}
        self.step = 0
        # bool [B, prompt_len]: True where the prompt holds image tokens. Keys beyond the prompt are text.
        self.image_mask: torch.Tensor | None = None
        # Per-layer override of the image mask (FastV removes keys from the cache of later layers).
        self.layer_image_masks: dict[int, torch.Tensor] = {}
        self._module_ids = {id(m) for m in attention_modules} if attention_modules is not None else None
        self.calls = 0  # eager calls made, for tests and benchmarks

    def owns(self, module: torch.nn.Module) -> bool:
        return self._module_ids is None or id(module) in self._module_ids

    def layer(self, idx: int) -> LayerOps:
        if idx not in self.layers:
            self.layers[idx] = LayerOps()
        return self.layers[idx]

    def add_capture(self, idx: int, capture: Capture) -> Capture:
        ops = self.layer(idx)
        ops.captures.append(capture)
        if capture.rows != "last":
            ops.last_row_only = False
        return capture

    def add_edit(self, idx: int, edit: LogitEdit, last_row_only: bool = True) -> None:
        ops = self.layer(idx)
        ops.logit_edits.append(edit)
        ops.last_row_only &= last_row_only

    def add_key_mask(self, idx: int, mask: KeyMask) -> None:
        ops = self.layer(idx)
        ops.key_masks.append(mask)
        ops.last_row_only = False

    def set_retain_grad(self, idx: int) -> None:
        ops = self.layer(idx)
        ops.retain_grad = True
        ops.last_row_only = False

    def image_keys(self, layer_idx: int, key_len: int, device: torch.device) -> torch.Tensor | None:
        """Image-key mask padded (with False) or cut to `key_len`, for one layer."""
        mask = self.layer_image_masks.get(layer_idx, self.image_mask)
        if mask is None:
            return None
        mask = mask.to(device)
        if mask.shape[1] >= key_len:
            return mask[:, :key_len]
        pad = torch.zeros(mask.shape[0], key_len - mask.shape[1], dtype=torch.bool, device=device)
        return torch.cat([mask, pad], dim=1)

    def reorder(self, index: torch.Tensor) -> None:
        """Follow a beam reorder / batch selection of the cache rows."""
        if self.image_mask is not None:
            self.image_mask = self.image_mask.index_select(0, index.to(self.image_mask.device))
        for key, mask in list(self.layer_image_masks.items()):
            self.layer_image_masks[key] = mask.index_select(0, index.to(mask.device))


def active_plan() -> AttentionPlan | None:
    return _ACTIVE_PLAN.get()


def _additive_mask(
    attention_mask: torch.Tensor | None, q: int, kv: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Turn any of the mask forms transformers passes (None / bool / float) into an additive float mask."""
    min_value = torch.finfo(dtype).min
    if attention_mask is None:
        if q == 1:
            return None
        # Causal with the queries aligned to the end of the keys (cache offset kv - q).
        rows = torch.arange(q, device=device)[:, None] + (kv - q)
        cols = torch.arange(kv, device=device)[None, :]
        allowed = cols <= rows
        return torch.zeros(q, kv, dtype=dtype, device=device).masked_fill(~allowed, min_value)[None, None]
    mask = attention_mask[..., -q:, :kv] if attention_mask.shape[-2] >= q else attention_mask[..., :kv]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, min_value)
    return mask.to(dtype)


def _eager_rows(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    ops: LayerOps,
    plan: AttentionPlan,
    full_query_len: int,
) -> torch.Tensor:
    """Eager attention for `query` rows (which are the last rows of a `full_query_len` forward)."""
    layer_idx = module.layer_idx
    groups = getattr(module, "num_key_value_groups", 1)
    key_states = repeat_kv(key, groups)
    value_states = repeat_kv(value, groups)
    q = query.shape[2]
    kv = key_states.shape[2]
    logits = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    full_mask = _additive_mask(attention_mask, full_query_len, kv, logits.dtype, logits.device)
    if full_mask is not None:
        logits = logits + full_mask[..., -q:, :]
    min_value = torch.finfo(logits.dtype).min
    logits = torch.clamp(logits, min=min_value)
    image_keys = plan.image_keys(layer_idx, kv, logits.device)
    ctx = EditContext(layer_idx, plan.step, full_query_len, kv, image_keys, plan)
    for key_mask in ops.key_masks:
        blocked = key_mask(ctx)
        if blocked is not None:
            logits = logits.masked_fill(blocked[:, None, None, :kv].to(logits.device), min_value)
    for edit in ops.logit_edits:
        logits = edit(logits, ctx)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    for capture in ops.captures:
        _record(capture, probs, image_keys, plan.step)
    if ops.retain_grad and probs.requires_grad:
        probs.retain_grad()
        ops.retained.append(probs)
    plan.calls += 1
    return torch.matmul(probs, value_states)


def _record(capture: Capture, probs: torch.Tensor, image_keys: torch.Tensor | None, step: int) -> None:
    with torch.no_grad():
        sel = probs[:, :, -1:, :] if capture.rows == "last" else probs
        if capture.heads is not None:
            sel = sel[:, list(capture.heads)]
        if capture.columns == "image":
            if image_keys is None:
                raise RuntimeError("image columns requested but the plan has no image mask")
            counts = image_keys.sum(dim=1)
            if not bool((counts == counts[0]).all()):
                raise RuntimeError("image-column capture needs the same number of image tokens in every row")
            index = image_keys.nonzero()[:, 1].view(image_keys.shape[0], -1)
            index = index[:, None, None, :].expand(sel.shape[0], sel.shape[1], sel.shape[2], -1)
            sel = torch.gather(sel, 3, index)
        if capture.head_reduce == "mean":
            sel = sel.float().mean(dim=1, keepdim=True)
        elif capture.head_reduce == "max":
            sel = sel.max(dim=1, keepdim=True).values
        if capture.dtype is not None:
            sel = sel.to(capture.dtype)
        if capture.to_cpu:
            sel = sel.cpu()
        capture.records.append(sel.detach())
        capture.steps.append(step)


def vlmscope_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: stock SDPA unless the active plan has ops for this layer."""
    plan = _ACTIVE_PLAN.get()
    layer_idx = getattr(module, "layer_idx", None)
    ops = None
    if plan is not None and layer_idx is not None and plan.owns(module):
        ops = plan.layers.get(layer_idx)
    kwargs.pop("output_attentions", None)
    if ops is None or ops.empty():
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q = query.shape[2]
    if q > 1 and ops.last_row_only:
        # Rows are independent: all but the last go through SDPA, the last one through the eager ops.
        head_out, _ = _sdpa_prefix(module, query[:, :, :-1], key, value, attention_mask, scaling, q, dropout)
        last = _eager_rows(module, query[:, :, -1:], key, value, attention_mask, scaling, ops, plan, q)
        out = torch.cat([head_out, last.transpose(1, 2)], dim=1)
        return out.contiguous(), None
    out = _eager_rows(module, query, key, value, attention_mask, scaling, ops, plan, q)
    if dropout and module.training:
        raise RuntimeError("vlmscope attention ops do not support attention dropout in training mode")
    return out.transpose(1, 2).contiguous(), None


def _sdpa_prefix(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    full_q: int,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    """SDPA for the first full_q-1 query rows of a prefill (they end one key before the last)."""
    kv = key.shape[2]
    rows = query.shape[2]
    if attention_mask is None and kv == full_q:
        # Upper-left causal alignment over the first `rows` keys is exactly the causal pattern of these rows.
        return sdpa_attention_forward(
            module, query, key[:, :, :rows], value[:, :, :rows], None, dropout=dropout, scaling=scaling
        )
    if attention_mask is None:
        add = _additive_mask(None, full_q, kv, query.dtype, query.device)
        mask = add[..., :rows, :]
    else:
        mask = attention_mask[..., -full_q:, :kv][..., :rows, :]
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)


AttentionInterface.register(ATTN_KEY, vlmscope_attention)
AttentionMaskInterface.register(ATTN_KEY, sdpa_mask)


def _text_config_names(model: torch.nn.Module) -> dict[str, str]:
    """Sub-config key → current attention implementation of the language model's config."""
    config = model.config
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return {"text_config": text_config._attn_implementation or "sdpa"}
    return {"": config._attn_implementation or "sdpa"}


@contextlib.contextmanager
def attention_plan(model: torch.nn.Module, plan: AttentionPlan) -> Iterator[AttentionPlan]:
    """Run `model` with `plan` active; the model's attention implementation is restored on exit."""
    previous = _text_config_names(model)
    _set_impl(model, {k: ATTN_KEY for k in previous})
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE_PLAN.reset(token)
        _set_impl(model, previous)


def _set_impl(model: torch.nn.Module, names: dict[str, str]) -> None:
    if "" in names:
        model.set_attn_implementation(names[""])
    else:
        model.set_attn_implementation(names)


def decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules of the language model, ordered by `layer_idx`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    found = {}
    for module in decoder.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "num_key_value_groups") and idx not in found:
            found[idx] = module
    return [found[i] for i in sorted(found)]
