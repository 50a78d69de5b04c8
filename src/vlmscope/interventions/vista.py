"""VISTA, Visual Information Steering with Token-logit Augmentation (Li et al., ICML 2025; code LzVv123456/VISTA).

Two parts, both on by default:

- **VSV** (visual steering vector), built once per input before decoding: the prompt with the image (pos) and
  without it (neg, `adapter.encode_text_only`) run through the unmodified model; the output of every decoder
  layer l at the last prompt position gives v^l = h^l_pos − h^l_neg (fp32). Then every steered layer's MLP output
  x, at every position of every forward (prefill included), becomes
  x' = ‖x‖·normalize(normalize(x) + λ·(1 + max(0, cos(x, −v^l)))·normalize(v^l)): the norm is kept and the push
  is stronger where x points away from v.
- **SLA** (self-logits augmentation): ℓ = (1 − γ)·ℓ_N + γ·mean_l W_U·h_l over the window of decoder layers
  [sla_start, sla_end) (their raw outputs, no final norm), at every position the LM head projects.

Reference quirks and choices:
- The reference fits a "rank-1 PCA" over a single demonstration, whose centred data is zero, and adds the
  arbitrary component to Δ; v^l = Δ^l here (the component carries no information).
- The paper says the vector is added to the residual stream; the code edits the MLP output before the residual
  add, which we follow.
- λ: the paper (and run_chair.sh) use 0.17 for LLaVA; run_pope.sh 0.01; the author reports 0.1–0.15 working
  better in the released code. Default 0.17. γ = 0.3, window 25..30 (`sla_start=25, sla_end=31`); the window's
  end is clipped so that its last layer is not the final one (whose output is only seen through the final norm).
- The reference asserts batch size 1; here every row (input or beam) has its own vectors.
See docs/methods/vista.md.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlmscope.attention.engine import active_plan
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._early_exit import EarlyExitState
from vlmscope.interventions.base import INTERVENTIONS, Intervention
from vlmscope.models.adapters import Adapter, Batch


def steer_mlp_output(x: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """VSV's norm-preserving push of MLP outputs x [..., D] towards v [..., D] (broadcast over positions)."""
    xf, vf = x.float(), v.float()
    x_unit, v_unit = F.normalize(xf, dim=-1), F.normalize(vf, dim=-1)
    push = 1.0 + torch.clamp(-(x_unit * v_unit).sum(-1, keepdim=True), min=0.0)
    steered = F.normalize(x_unit + lam * push * v_unit, dim=-1) * xf.norm(dim=-1, keepdim=True)
    return steered.to(x.dtype)


def sla_logits(final_logits: torch.Tensor, window_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 − γ)·ℓ_N + γ·mean over the window [W, ..., V]."""
    return (1.0 - gamma) * final_logits + gamma * window_logits.mean(dim=0)


# The capture hooks sit on shared modules: only the forward of the context (thread) that set this records.
_RECORDING: contextvars.ContextVar[dict[int, torch.Tensor] | None] = contextvars.ContextVar(
    "vlmscope_vista_recording", default=None)


def last_position_layer_outputs(model: Any, adapter: Adapter, batch: Batch) -> torch.Tensor:
    """Every decoder layer's output at the last prompt position, unsteered, fp32: [L, N, D]."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(adapter.decoder_layers()):
        def hook(module: torch.nn.Module, args: tuple, output: Any, idx: int = idx) -> None:
            if _RECORDING.get() is outputs:
                hidden = output[0] if isinstance(output, tuple) else output
                outputs[idx] = hidden[:, -1].float()
        handles.append(layer.register_forward_hook(hook))
    token = _RECORDING.set(outputs)
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=adapter.position_ids(batch), use_cache=False, logits_to_keep=1,
                  **batch.model_inputs)
    finally:
        _RECORDING.reset(token)
        for handle in handles:
            handle.remove()
    return torch.stack([outputs[i] for i in range(len(outputs))])


@INTERVENTIONS.register("vista")
@dataclass(frozen=True)
class VISTA(Intervention):
    lam: float = 0.17
    gamma: float = 0.3
    sla_start: int = 25
    sla_end: int = 31
    steer_start: int = 0
    steer_end: int = 32

    repeatable = False
    conflicts_with: ClassVar[tuple[str, ...]] = ("vcd", "icd", "m3id", "dola", "deco")

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError("lam must be >= 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma must be in [0, 1]")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        return f"vista and {other.name} both rewrite the next-token scores: use one of them"

    def sla_window(self, adapter: Adapter) -> list[int]:
        """Decoder layers of the SLA window, clipped so that the last is not the final layer."""
        depth = adapter.num_layers
        end = min(self.sla_end, depth - 1)
        if self.gamma > 0 and not 0 <= self.sla_start < end:
            raise InputError(f"vista: SLA window [{self.sla_start}, {self.sla_end}) holds no decoder layer of "
                             f"0..{depth - 2} in this {depth}-layer model; choose sla_start < {depth - 1}")
        return list(range(self.sla_start, end)) if self.gamma > 0 else []

    def steered_layers(self, adapter: Adapter) -> list[int]:
        end = min(self.steer_end, adapter.num_layers)
        if not 0 <= self.steer_start < end:
            raise InputError(f"vista: empty steering range [{self.steer_start}, {self.steer_end}) for this "
                             f"{adapter.num_layers}-layer model")
        return list(range(self.steer_start, end))

    def start_run(self, run: GenerationRun) -> _VISTARun:
        return _VISTARun(self, run)


class _VISTARun(EarlyExitState):
    """VISTA's per-run state: the steering vectors and MLP hooks (VSV), the early-exit hooks (SLA)."""

    spec: VISTA

    def __init__(self, spec: VISTA, run: GenerationRun) -> None:
        # SLA reads decoder layer l's output as the input of layer l + 1 (hidden-state index l + 1).
        super().__init__(spec, run, [layer + 1 for layer in spec.sla_window(run.adapter)], apply_norm=False)
        self._steered = spec.steered_layers(run.adapter)
        self._vectors: torch.Tensor | None = None  # [L, N, D]
        self._mlp_handles: list[Any] = []

    def setup(self, run: GenerationRun) -> None:
        first = not self._mlp_handles and self._vectors is None
        if self.lam > 0:
            # Unsteered passes (no plan active: these hooks and other methods' plan ops stay off).
            pos = last_position_layer_outputs(run.model, run.adapter, run.batch)
            ids, mask = run.adapter.encode_text_only(run.batch.prompts, device=run.device)
            inputs = {}
            if "mm_token_type_ids" in run.batch.model_inputs:
                inputs["mm_token_type_ids"] = torch.zeros_like(ids)
            neg_batch = Batch(ids, mask, inputs, torch.zeros_like(ids, dtype=torch.bool), [], [])
            neg = last_position_layer_outputs(run.model, run.adapter, neg_batch)
            self._vectors = pos - neg
            if first:
                layers = run.adapter.decoder_layers()
                for idx in self._steered:
                    self._mlp_handles.append(layers[idx].mlp.register_forward_hook(self._steer(idx)))
        if self.gamma > 0:
            super().setup(run)

    def _steer(self, idx: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._vectors is None or not self._ours():
                return None
            return steer_mlp_output(output, self._vectors[idx].to(output.device)[:, None, :], self.lam)
        return hook

    def _ours(self) -> bool:
        return active_plan() is self.run.plan

    def rewrite(self, final_logits: torch.Tensor, early_logits: torch.Tensor) -> torch.Tensor:
        return sla_logits(final_logits, early_logits, self.gamma)

    def reorder(self, index: torch.Tensor) -> None:
        if self._vectors is not None:
            self._vectors = self._vectors.index_select(1, index.to(self._vectors.device))

    def close(self) -> None:
        for handle in self._mlp_handles:
            handle.remove()
        self._mlp_handles.clear()
        self._vectors = None
        super().close()
