"""Early-exit logits for methods that rewrite the LM head's output from intermediate layers (DoLa, DeCo).

`EarlyExitState` holds the inputs of chosen decoder layers (hidden states H_j, j in hidden-state numbering: H_0
is the input embedding, H_j the output of decoder layer j − 1) during the run's own forwards, and replaces the LM
head's output by `rewrite(final_logits, early_logits)` at every position the head projects. Every decoding method
thus sees the rewritten scores where it sees logits: greedy, sampling, beam search, OPERA's candidate forwards
and rollback re-runs. Forwards of other methods' branches (which run without the run's plan) are left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmscope.attention.engine import active_plan
from vlmscope.decoding.session import GenerationRun, Intervention
from vlmscope.errors import InputError
from vlmscope.interventions.base import InterventionState


class EarlyExitState(InterventionState):
    """Hooks that give `rewrite` the final logits [..., P, V] and the early-exit logits [J, ..., P, V]."""

    def __init__(self, spec: Intervention, run: GenerationRun, layers: list[int], apply_norm: bool) -> None:
        super().__init__(spec, run)
        self.early_layers = layers
        self.apply_norm = apply_norm
        self._handles: list[Any] = []
        self._states: dict[int, torch.Tensor] = {}
        self._norm: torch.nn.Module | None = None

    def rewrite(self, final_logits: torch.Tensor, early_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def setup(self, run: GenerationRun) -> None:
        if self._handles:
            return  # a second prefill of the same run: the hooks are in place
        layers = run.adapter.decoder_layers()
        head = run.model.get_output_embeddings()
        if head is None:
            raise InputError(f"{self.spec.name}: this model has no LM head to project early layers with")
        self._norm = run.adapter.decoder().norm if self.apply_norm else None
        for j in self.early_layers:
            self._handles.append(layers[j].register_forward_pre_hook(self._hold(j), with_kwargs=True))
        self._handles.append(head.register_forward_hook(self._rewrite))

    def _ours(self) -> bool:
        return active_plan() is self.run.plan

    def _hold(self, j: int) -> Any:
        # `kwargs` may be missing: torch registers a kwargs hook in two steps, and another thread's forward on the
        # same model can run it in between (that call is never ours).
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            if self._ours():
                self._states[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _rewrite(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self._ours():
            return None
        if len(self._states) != len(self.early_layers):
            missing = sorted(set(self.early_layers) - set(self._states))
            raise RuntimeError(f"{self.spec.name}: decoder layers {missing} did not run before the LM head")
        positions = output.shape[-2]  # the head projects the last `positions` states (logits_to_keep)
        early = []
        for j in self.early_layers:
            hidden = self._states[j][..., -positions:, :]
            if self._norm is not None:
                hidden = self._norm(hidden)
            early.append(torch.nn.functional.linear(hidden, module.weight, module.bias))
        self._states.clear()
        return self.rewrite(output.float(), torch.stack(early).float()).to(output.dtype)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._states.clear()
