"""One generation over a batch: inputs, the KV cache, positions, the attention plan and the interventions.

Decoding methods (greedy, beam search, OPERA, ...) drive a `GenerationRun` through four verbs: `expand(n)`
(before the prefill), `prefill()`, `advance(tokens)` and `reorder(index)`; each forward returns the last
position's logits after every intervention has processed them. Interventions contribute attention-plan
operations, forward hooks and extra branches (VCD, CFG) through the `Intervention` protocol below.

Specs and state: an intervention (like a decoding method) is an immutable spec, a frozen dataclass of its
parameters. Everything a run computes lives in a per-run object: entering a `GenerationRun` calls
`spec.start_run(run)` for every intervention, which returns a fresh `InterventionState`; the run drives the
states (`prepare`, `setup`, `process_logits`, `reorder`, `close`) and drops them on exit. So one spec instance
serves any number of runs, also at the same time (two threads, or two runs interleaved by hand). A state reads
its spec's parameters as its own attributes (`state.alpha` is `state.spec.alpha`), so a method's code reads
the same in either place. `run.state(spec)` returns the state a spec got in this run.

Conflicts are declared on the classes and checked once per run, before any state is made: `repeatable = False`
refuses two instances of one class; `conflicts_with` names the methods a class cannot run with, and its
`conflict(other, adapter)` returns the reason (or None where the given parameters do compose, e.g. PAI and AAI
on disjoint layers). A declaration on either side counts.

The model's attention implementation is switched once per run (`attention_engine`, entered in `__enter__`);
each forward only activates the run's plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from vlmscope.attention.engine import (
    AttentionPlan,
    attention_engine,
    attention_plan,
    decoder_attention_modules,
)
from vlmscope.errors import InputError
from vlmscope.models.adapters import Adapter, Batch
from vlmscope.models.families_seed import model_forward


class InterventionLifecycle:
    """The hooks a run calls on an intervention's per-run state, in this order.

    `prepare` (may rewrite the batch, before expansion), `setup` (add plan ops, hooks and branches; after
    expansion, before the prefill), then for every forward `process_logits`; `reorder` follows beam reorders;
    `close` undoes everything, also after an exception.
    """

    def prepare(self, run: GenerationRun) -> None:
        pass

    def setup(self, run: GenerationRun) -> None:
        pass

    def process_logits(self, logits: torch.Tensor, run: GenerationRun, new_tokens: torch.Tensor | None
                       ) -> torch.Tensor:
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class Intervention(InterventionLifecycle):
    """Base class of steering methods: an immutable spec. Subclasses are frozen dataclasses registered in
    `vlmscope.interventions`, whose `start_run(run)` returns their per-run `InterventionState`.

    The default `start_run` returns the instance itself, for quick custom interventions that implement the
    lifecycle on the instance (such an instance then serves one run at a time); every built-in method has its
    own state class.
    """

    name = "intervention"
    # False when the method keeps state that cannot follow a rollback (OPERA) or beam reorder.
    supports_rollback = True
    supports_beams = True
    # Whether two instances of the class may run together; the built-in methods say no.
    repeatable: ClassVar[bool] = True
    # Registered names of the methods this one cannot run with (narrowed by `conflict`).
    conflicts_with: ClassVar[tuple[str, ...]] = ()

    def start_run(self, run: GenerationRun) -> InterventionLifecycle:
        return self

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        """Why this spec cannot run with `other` (a method named in `conflicts_with`), or None if they compose."""
        return f"{self.name} and {other.name} cannot run together: use one of them"


class InterventionState(InterventionLifecycle):
    """What one intervention computes during one run. Parameters read through to the spec."""

    def __init__(self, spec: Intervention, run: GenerationRun) -> None:
        self.spec = spec
        self.run = run

    def __getattr__(self, name: str) -> Any:
        # Only called for names the state does not have: the spec's parameters and helper methods.
        if name == "spec":
            raise AttributeError(name)
        return getattr(self.spec, name)


def check_combination(interventions: Sequence[Intervention], adapter: Adapter) -> None:
    """Raise InputError for combinations the classes declare impossible (once per run, before any state)."""
    specs = list(interventions)
    for i, first in enumerate(specs):
        for second in specs[i + 1:]:
            if type(first) is type(second) and not type(first).repeatable:
                count = sum(type(s) is type(first) for s in specs)
                raise InputError(f"intervention {first.name!r} is given {count} times: give it once")
            for owner, other in ((first, second), (second, first)):
                if other.name in type(owner).conflicts_with:
                    reason = owner.conflict(other, adapter)
                    if reason:
                        raise InputError(reason)
                    break


class GenerationRun:
    def __init__(self, model: Any, adapter: Adapter, batch: Batch,
                 interventions: Sequence[Intervention] = (), capture_plan: AttentionPlan | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.batch = batch
        self.interventions = list(interventions)  # the specs, as given
        self.states: list[InterventionLifecycle] = []  # their per-run states, made on entry
        self.plan = capture_plan or AttentionPlan(decoder_attention_modules(model))
        self.plan.image_mask = batch.image_mask
        self.device = batch.input_ids.device
        self.num_beams = 1
        self.cache: Any = None
        self.attention_mask: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None  # [N] or [3, N]
        self.prompt_len = batch.input_ids.shape[1]
        self.step = 0
        self.inputs_embeds: torch.Tensor | None = None  # set by interventions that rewrite the prompt
        self.position_ids: torch.Tensor | None = None
        self.extra_forward_kwargs: dict[str, Any] = {}
        # Set by an intervention in `prepare` (FastV's rerank=every_step): every `advance` recomputes the whole
        # sequence (prompt + generated tokens) without a KV cache, as stock `generate(use_cache=False)` does.
        self.recompute_full_sequence = False
        self._generated: torch.Tensor | None = None  # [N, t] tokens fed so far (recompute mode only)
        self._stack = contextlib.ExitStack()
        self.image_tokens = batch.image_mask.sum(dim=1).tolist()

    # --- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> GenerationRun:
        if self.states:
            raise InputError("a GenerationRun runs once: make a new one for another generation")
        check_combination(self.interventions, self.adapter)
        self._stack.__enter__()
        try:
            self._stack.enter_context(attention_engine(self.model))
            for spec in self.interventions:
                state = spec.start_run(self)
                self.states.append(state)
                self._stack.callback(state.close)
                state.prepare(self)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def state(self, spec: Intervention) -> InterventionLifecycle:
        """The per-run state `spec` got in this run."""
        for given, state in zip(self.interventions, self.states):
            if given is spec:
                return state
        raise KeyError(f"{spec!r} is not an intervention of this run")

    def enter_context(self, cm: Any) -> Any:
        return self._stack.enter_context(cm)

    def replace_batch(self, batch: Batch) -> None:
        """Swap in a rewritten prompt (in `prepare`, before expansion), e.g. after dropping image tokens.

        The fields derived from the batch (the plan's image mask, the prompt length, the per-row image-token
        counts) follow the new batch; positions default to the new attention mask unless `position_ids` is set.
        """
        self.batch = batch
        self.plan.image_mask = batch.image_mask
        self.device = batch.input_ids.device
        self.prompt_len = batch.input_ids.shape[1]
        self.image_tokens = batch.image_mask.sum(dim=1).tolist()

    def expand(self, n: int) -> None:
        """Repeat every row n times (beams), before the prefill."""
        self.num_beams = n
        if n == 1:
            return
        batch = self.batch
        rep = {}
        grid = batch.model_inputs.get("image_grid_thw")
        # InternVL packs every input's tiles in one [tiles, C, H, W] tensor; its adapter says how many per input.
        views = getattr(self.adapter, "packed_views_per_row", None)
        for key, value in batch.model_inputs.items():
            if key == "pixel_values" and (grid is not None or views is not None):
                # Qwen packs all images' patches in one [patches, dim] tensor: repeat per image.
                sizes = grid.prod(-1).tolist() if grid is not None else views(batch)
                chunks = value.split(sizes, dim=0)
                rep[key] = torch.cat([c for c in chunks for _ in range(n)], dim=0)
            else:
                rep[key] = _repeat_rows(value, n, batch.batch_size)
        self.batch = Batch(
            batch.input_ids.repeat_interleave(n, 0), batch.attention_mask.repeat_interleave(n, 0), rep,
            batch.image_mask.repeat_interleave(n, 0),
            [s for s in batch.image_sizes for _ in range(n)], [p for p in batch.prompts for _ in range(n)],
        )
        self.plan.image_mask = self.batch.image_mask
        if self.inputs_embeds is not None:
            self.inputs_embeds = self.inputs_embeds.repeat_interleave(n, 0)
        if self.position_ids is not None:
            dim = 1 if self.position_ids.dim() == 3 else 0
            self.position_ids = self.position_ids.repeat_interleave(n, dim)

    # --- forwards -------------------------------------------------------------------------------------
    def _forward(self, **kwargs: Any) -> torch.Tensor:
        with attention_plan(self.model, self.plan):
            out = model_forward(self.model, **kwargs, **self.extra_forward_kwargs, use_cache=True, return_dict=True)
        return out.logits[:, -1, :].float()

    def prefill(self) -> torch.Tensor:
        from transformers import DynamicCache

        for state in self.states:
            state.setup(self)
        batch = self.batch
        self.cache = DynamicCache(config=self.model.config)
        self.attention_mask = batch.attention_mask
        positions = self.position_ids if self.position_ids is not None else self.adapter.position_ids(batch)
        self.last_positions = positions[..., -1]
        self.plan.step = self.step = 0
        kwargs: dict[str, Any] = dict(attention_mask=self.attention_mask, position_ids=positions,
                                      past_key_values=self.cache, logits_to_keep=1)
        if self.inputs_embeds is not None:
            kwargs["inputs_embeds"] = self.inputs_embeds
        else:
            kwargs["input_ids"] = batch.input_ids
            kwargs.update(batch.model_inputs)
        logits = self._forward(**kwargs)
        return self._process(logits, None)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row; returns the processed logits for the next position."""
        tokens = tokens.view(-1, 1).to(self.device)
        n = tokens.shape[0]
        self.attention_mask = torch.cat(
            [self.attention_mask, torch.ones(n, 1, dtype=self.attention_mask.dtype, device=self.device)], dim=1
        )
        self.last_positions = self.last_positions + 1
        positions = self.last_positions[..., None]
        self.step += 1
        self.plan.step = self.step
        if self.recompute_full_sequence:
            return self._process(self._recompute(tokens), tokens.view(-1))
        logits = self._forward(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions,
                               past_key_values=self.cache)
        return self._process(logits, tokens.view(-1))

    def _recompute(self, tokens: torch.Tensor) -> torch.Tensor:
        """One forward over the prompt and every generated token, with no cache kept between steps."""
        if self.inputs_embeds is not None:
            raise InputError("recomputing the full sequence needs token ids, but an intervention rewrote the "
                             "prompt embeddings: drop one of the two interventions")
        batch = self.batch
        placeholders = batch.input_ids[batch.image_mask.bool()].unique()
        if bool(torch.isin(tokens, placeholders).any()):
            # Fed back as ids, a generated image placeholder would be read as another image.
            raise InputError(f"the model generated its image placeholder token {placeholders.tolist()}, which a "
                             "full-sequence recompute would read as an image: use fastv:rerank=prefill")
        self._generated = tokens if self._generated is None else torch.cat([self._generated, tokens], dim=1)
        prompt_positions = self.position_ids if self.position_ids is not None else self.adapter.position_ids(batch)
        steps = torch.arange(1, self._generated.shape[1] + 1, device=self.device)
        positions = torch.cat([prompt_positions, prompt_positions[..., -1:] + steps], dim=-1)
        return self._forward(input_ids=torch.cat([batch.input_ids, self._generated], dim=1),
                             attention_mask=self.attention_mask, position_ids=positions, logits_to_keep=1,
                             **batch.model_inputs)

    def _process(self, logits: torch.Tensor, new_tokens: torch.Tensor | None) -> torch.Tensor:
        for state in self.states:
            logits = state.process_logits(logits, self, new_tokens)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder / select cache rows (beam search). `index` indexes the current rows."""
        index = index.to(self.device)
        if self.recompute_full_sequence:
            raise InputError("this run recomputes the full sequence at every step (fastv:rerank=every_step) and "
                             "cannot reorder rows: use greedy or sample decoding, or fastv:rerank=prefill")
        self.cache.reorder_cache(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        dim = 1 if self.last_positions.dim() == 2 else 0
        self.last_positions = self.last_positions.index_select(dim, index)
        self.plan.reorder(index)
        for state in self.states:
            state.reorder(index)


def _repeat_rows(value: Any, n: int, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.repeat_interleave(n, 0)
    return value
