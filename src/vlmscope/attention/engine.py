"""The attention engine: one registered attention function that runs a per-layer plan.

transformers 5.x picks the attention function by name on every forward
(`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`). We register one function under
the key "vlmscope" together with a mask builder (without the mask registration transformers silently drops the
causal/padding mask for unknown keys).

Two scopes, so that no forward pays for a module walk:
- `attention_engine(model)`: switches the language model's attention implementation to "vlmscope" (one walk
  over the modules) and restores it when the last user leaves. It is reference-counted per model under a lock
  (`switched_attention`, also used for AAI's eager vision tower): a `GenerationRun` enters it once, nested
  and concurrent entries (other threads) only count, so one thread can never switch the model back while
  another still runs a plan.
- `attention_plan(model, plan)`: makes `plan` the active plan of the current thread/task (a `ContextVar`),
  entering the engine if no enclosing scope did. Entering it per forward costs a lock and a counter, not a
  walk. Two threads with two plans on one model each see their own plan (the implementation is switched for
  as long as either runs). On a clean exit it raises `UnsupportedModelError` when operations are registered on
  layers whose attention never called the engine (a class that cannot switch its attention implementation,
  modules without `layer_idx`, a plan built for another model): the engine never silently does nothing.

Layers without operations in the active plan (or any call while no plan is active) go to stock SDPA, so an idle
engine equals stock SDPA. Layers with operations run eager math with, in this order:
mask → key masks → logit edits → softmax (fp32, cast back as stock eager) → captures → retain_grad → P·V.
Attention arguments that this eager math does not implement (softcap, sinks, a sliding window, ...) raise on
a layer with operations and pass through to SDPA on idle layers. `output_attentions=True` works under a plan:
such a forward runs every layer eagerly and returns its probabilities (after the layer's operations).

transformers internals this module relies on (each is covered by a test in tests/test_engine.py):
- `transformers.integrations.sdpa_attention.sdpa_attention_forward(module, q, k, v, mask, dropout=, scaling=,
  **kwargs)`: the stock SDPA path of idle layers (test_idle_engine_equals_stock_sdpa).
- `transformers.masking_utils.sdpa_mask`, registered for our key through `AttentionMaskInterface`
  (test_idle_engine_equals_stock_sdpa, on a left-padded batch).
- `config._attn_implementation` of the text sub-config, read to restore it (test_state_restored_after_exception)
  and to detect that `set_attn_implementation` skipped a class that cannot switch (it only logs a warning;
  test_model_class_that_cannot_switch_raises_in_every_entry_point).
- attention modules' `layer_idx` and `num_key_value_groups` attributes (test_decoder_attention_modules).
- the attention-function call convention: query/key/value `[B, heads, len, dim]`, output `[B, len, heads, dim]`
  plus weights, extra arguments as keyword arguments (test_attention_call_convention).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmscope.errors import UnsupportedModelError

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
        # Per-layer original prompt positions of the prompt keys a layer holds [B, P_l] (FastV's physical drop;
        # absent: the layer holds every prompt key). Read by ops that index prompt keys (AAI's weights).
        self.layer_key_positions: dict[int, torch.Tensor] = {}
        self._module_ids = {id(m) for m in attention_modules} if attention_modules is not None else None
        self.calls = 0  # eager calls made, for tests and benchmarks
        self.ran_layers: set[int] = set()  # layers whose attention called the engine under this plan

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

    def layers_not_run(self) -> list[int]:
        """Layers with operations whose attention never called the engine under this plan."""
        return sorted(idx for idx, ops in self.layers.items() if not ops.empty() and idx not in self.ran_layers)

    def check_ran(self, model: torch.nn.Module | None = None) -> None:
        """Raise `UnsupportedModelError` when operations sit on layers that never ran through the engine."""
        missing = self.layers_not_run()
        if not missing:
            return
        name = type(model).__name__ if model is not None else "this model"
        why = ("its attention modules did not call the vlmscope attention function (an attention class that "
               "does not use transformers' AttentionInterface, modules without layer_idx, or a plan built for "
               "another model)")
        if model is not None and not _engine_switched(model):
            why = ("transformers could not switch its attention implementation (set_attn_implementation skipped "
                   "the class: it does not use AttentionInterface)")
        raise UnsupportedModelError(f"{name}: attention operations on layers {missing} never ran: {why}; "
                                    "vlmscope cannot steer or explain this model class")


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
    plan: AttentionPlan | None,
    full_query_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention for `query` rows (which are the last rows of a `full_query_len` forward).

    Returns (output [B, heads, rows, dim], probabilities [B, heads, rows, keys]).
    """
    layer_idx = module.layer_idx
    batch, heads, q, dim = query.shape
    kv_heads, kv = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Query heads sharing a KV head run as extra rows of that head: the same products without copying K/V.
    logits = torch.matmul(query.reshape(batch, kv_heads, groups * q, dim), key.transpose(2, 3))
    logits = logits.view(batch, heads, q, kv) * scaling
    full_mask = _additive_mask(attention_mask, full_query_len, kv, logits.dtype, logits.device)
    if full_mask is not None:
        logits = logits + full_mask[..., -q:, :]
    min_value = torch.finfo(logits.dtype).min
    logits = torch.clamp(logits, min=min_value)
    if plan is None:  # output_attentions without a plan: plain eager attention
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs.reshape(batch, kv_heads, groups * q, kv), value)
        return out.view(batch, heads, q, value.shape[-1]), probs
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
    out = torch.matmul(probs.reshape(batch, kv_heads, groups * q, kv), value)
    return out.view(batch, heads, q, value.shape[-1]), probs


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


# Keyword arguments of the attention call that do not change its math (anything else must be implemented by the
# eager path before a layer with operations may see it). LLaVA-OneVision's outer model hands `logits_to_keep`
# down to its decoder layers, where it only reaches the attention call's **kwargs.
_PASSIVE_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "logits_to_keep"})
_NO_OPS = LayerOps()


def _unsupported_kwargs(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    extra = {k: v for k, v in kwargs.items() if v is not None and k not in _PASSIVE_KWARGS}
    if extra:
        shown = ", ".join(f"{k}={v if not isinstance(v, torch.Tensor) else 'tensor'}" for k, v in extra.items())
        raise UnsupportedModelError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) passes attention arguments that "
            f"vlmscope's eager attention does not implement ({shown}): operations on this layer would be wrong; "
            "put no operations on such layers"
        )


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
        plan.ran_layers.add(layer_idx)
        ops = plan.layers.get(layer_idx)
    want_weights = bool(kwargs.pop("output_attentions", False))
    if ops is None or ops.empty():
        if want_weights:
            # Stock eager returns the probabilities: compute them here rather than return None silently.
            _unsupported_kwargs(module, kwargs)
            return _eager_all_rows(module, query, key, value, attention_mask, scaling, dropout, _NO_OPS, None)
        if _packable(module, query, attention_mask, kwargs):
            return _packed_sdpa(query, key, value, attention_mask, scaling, dropout if module.training else 0.0)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _unsupported_kwargs(module, kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q = query.shape[2]
    if want_weights:
        return _eager_all_rows(module, query, key, value, attention_mask, scaling, dropout, ops, plan)
    if not (ops.captures or ops.logit_edits or ops.retain_grad):
        # Key masks only (truncation, FastV's mask mode): nothing needs the probabilities, so the blocked keys
        # join the attention mask and the layer stays on SDPA (no [B, H, q, kv] logits in the prefill).
        return _key_masked_sdpa(module, query, key, value, attention_mask, scaling, ops, plan,
                                dropout if module.training else 0.0)
    if q > 1 and ops.last_row_only:
        # Rows are independent: all but the last go through SDPA, the last one through the eager ops.
        head_out, _ = _sdpa_prefix(module, query[:, :, :-1], key, value, attention_mask, scaling, q, dropout)
        last, _ = _eager_rows(module, query[:, :, -1:], key, value, attention_mask, scaling, ops, plan, q)
        out = torch.cat([head_out, last.transpose(1, 2)], dim=1)
        return out.contiguous(), None
    out, _ = _eager_all_rows(module, query, key, value, attention_mask, scaling, dropout, ops, plan)
    return out, None


def _eager_all_rows(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None, dropout: float, ops: LayerOps,
                    plan: AttentionPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
    if dropout and module.training:
        raise RuntimeError("vlmscope attention ops do not support attention dropout in training mode")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out, probs = _eager_rows(module, query, key, value, attention_mask, scaling, ops, plan, query.shape[2])
    return out.transpose(1, 2).contiguous(), probs


def _key_masked_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, ops: LayerOps, plan: AttentionPlan,
                     dropout: float) -> tuple[torch.Tensor, None]:
    q, kv = query.shape[2], key.shape[2]
    image_keys = plan.image_keys(module.layer_idx, kv, query.device)
    ctx = EditContext(module.layer_idx, plan.step, q, kv, image_keys, plan)
    blocked = None
    for key_mask in ops.key_masks:
        keys = key_mask(ctx)
        if keys is not None:
            keys = keys[:, :kv].to(query.device)
            blocked = keys if blocked is None else blocked | keys
    mask = _additive_mask(attention_mask, q, kv, query.dtype, query.device)
    if blocked is not None:
        if mask is None:
            mask = torch.zeros(1, 1, q, kv, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(blocked[:, None, None, :], torch.finfo(query.dtype).min)
    plan.calls += 1
    if mask is not None and _packable(module, query, mask, {}):
        return _packed_sdpa(query, key, value, mask, scaling, dropout)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)


def _packable(module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None,
              kwargs: dict[str, Any]) -> bool:
    """Grouped-query attention with several masked query rows (padded prefill, multi-token decoding).

    Stock SDPA then copies K/V once per query head (`repeat_kv`), i.e. the whole cache of the layer per forward.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    return (groups > 1 and query.shape[2] > 1 and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1
            and all(kwargs.get(k) is None for k in ("position_bias", "cache", "softcap", "is_causal")))


def _packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                 scaling: float | None, dropout: float) -> tuple[torch.Tensor, None]:
    """SDPA with the query heads sharing a KV head folded into extra query rows of that head (exact, no copy)."""
    batch, heads, rows, dim = query.shape
    kv_heads, kv = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    packed = query.reshape(batch, kv_heads, groups * rows, dim)
    mask = attention_mask[..., -rows:, :kv].expand(batch, 1, rows, kv)
    mask = mask[:, :, None].expand(batch, 1, groups, rows, kv).reshape(batch, 1, groups * rows, kv)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.view(batch, heads, rows, value.shape[-1]).transpose(1, 2).contiguous(), None


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


@dataclass
class _Switch:
    users: int
    implementation: str
    previous: str
    switched: bool


_ENGINE_LOCK = threading.Lock()
_SWITCHES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Switch]] = weakref.WeakKeyDictionary()


def _current_impl(model: torch.nn.Module, sub_config: str) -> str:
    config = model.config if sub_config == "" else getattr(model.config, sub_config)
    return config._attn_implementation or "sdpa"


def _text_key(model: torch.nn.Module) -> str:
    return next(iter(_text_config_names(model)))


@contextlib.contextmanager
def switched_attention(model: torch.nn.Module, sub_config: str, implementation: str) -> Iterator[bool]:
    """Hold one attention implementation of `model` ("" = the model's own config, else a sub-config key such as
    "text_config" or "vision_config") while any user is inside; yields whether transformers applied it.

    Reference-counted per (model, sub-config) under a lock: the first entry switches (one walk over the
    modules), nested and concurrent entries only count, the last exit restores the previous implementation,
    also after an exception. Two users asking for different implementations of one sub-config at the same time
    are refused.
    """
    with _ENGINE_LOCK:
        table = _SWITCHES.setdefault(model, {})
        use = table.get(sub_config)
        if use is None:
            previous = _current_impl(model, sub_config)
            _set_impl(model, {sub_config: implementation})
            use = table[sub_config] = _Switch(0, implementation, previous,
                                              _current_impl(model, sub_config) == implementation)
        elif use.implementation != implementation:
            raise UnsupportedModelError(
                f"{type(model).__name__}: {sub_config or 'the model'} attention is held on {use.implementation!r} "
                f"by another run; it cannot run {implementation!r} at the same time (run them one after the other)"
            )
        use.users += 1
    try:
        yield use.switched
    finally:
        with _ENGINE_LOCK:
            use.users -= 1
            if use.users == 0:
                table.pop(sub_config, None)
                _set_impl(model, {sub_config: use.previous})


def _engine_switched(model: torch.nn.Module) -> bool:
    use = _SWITCHES.get(model, {}).get(_text_key(model))
    return use.switched if use is not None else _current_impl(model, _text_key(model)) == ATTN_KEY


@contextlib.contextmanager
def attention_engine(model: torch.nn.Module) -> Iterator[None]:
    """Route `model`'s language-model attention through the engine while any user is inside (see
    `switched_attention`: one switch for the outermost of nested and concurrent users)."""
    with switched_attention(model, _text_key(model), ATTN_KEY):
        yield


def engine_users(model: torch.nn.Module) -> int:
    """How many scopes currently hold `model` on the engine (0: its own attention implementation)."""
    use = _SWITCHES.get(model, {}).get(_text_key(model))
    return use.users if use is not None else 0


@contextlib.contextmanager
def attention_plan(model: torch.nn.Module, plan: AttentionPlan) -> Iterator[AttentionPlan]:
    """Run `model` with `plan` active in this thread; the model's attention implementation is restored when the
    outermost engine scope exits. Raises on a clean exit if operations sat on layers that never ran."""
    with attention_engine(model):
        token = _ACTIVE_PLAN.set(plan)
        try:
            yield plan
        finally:
            _ACTIVE_PLAN.reset(token)
        plan.check_ran(model)


def _set_impl(model: torch.nn.Module, names: dict[str, str]) -> None:
    if "" in names and len(names) == 1:
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
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no self-attention modules with layer_idx and num_key_value_groups in its "
            "decoder: vlmscope cannot steer or explain this model class"
        )
    return [found[i] for i in sorted(found)]
