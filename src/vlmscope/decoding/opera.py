"""OPERA: over-trust penalty and retrospection-allocation beam search (Huang et al., CVPR 2024).

Rebuilt on our own decoding loop (`GenerationRun`) for stock transformers; the algorithm, the reference code's
deviations from the paper and its bugs are described in shared/reference/opera.md. With `faithful=True` (the
default) the reference's numerics and rules are reproduced:

- candidates: each beam's top `num_attn_candidates` logits (after interventions);
- the last decoder layer's attention, max over heads, each row renormalised over all keys;
- over-trust score of a candidate: max over response columns j of 1e-7 * prod_{i=j}^{t} scale_factor * w(i, j)
  (response rows plus the candidate row), rounded through float16 (saturates to +inf), see `opera_penalty`;
  during the first 10 response positions the penalty is instead minus the candidate's attention mass on the
  image tokens (a bonus for looking at the image);
- penalised candidate logits z - penalty_weights * penalty, computed literally (alpha = 0 with a saturated
  score gives NaN, as in the reference), log-softmax over the candidates only (`renormalize_candidates`,
  non-candidates held at -999), then transformers 4.29's beam bookkeeping (`beam.ReferenceBeamSearch`:
  running beams in topk order among the -999 filler's exact ties, lengths counting the reference's prompt
  input_ids; `beam_rules`);
- retrospection: the per-beam mode of the candidates' locations is recorded every step; when every beam's
  history holds the sample's modal location s more than `threshold` times and s >= 10, decoding returns to the
  state that chose response position s + 1 (or s once that position used up its `num_attn_candidates`
  rollbacks) and re-chooses it over the full vocabulary with the (beam, token) pairs chosen there before banned
  (-999 after shifting the logits' minimum to -999, as the reference does);
- the reference's `window_size`-long rollback counters and rejection lists: no rollback when s + 1 >=
  window_size, and a rollback to position window_size - 1 re-chooses from that step's saved penalised
  candidates with nothing banned (both are IndexErrors inside its bare `except`).

Checked token for token (rollbacks and per-step log-probs included) against the reference code itself:
tests/test_parity_opera.py, fixtures from tools/parity/opera/.

Fixed unconditionally (outputs unchanged wherever the reference does not crash): errors are never swallowed
(the reference wraps the rollback in a bare `except`, which also hides out-of-memory errors); candidate forwards
cannot corrupt the cache; every sample of a batch has its own rollback state; num_beams=1 works (the
reference asserts); a rollback target older than the kept history (only after more than window_size steps)
means no rollback (the reference raises after popping part of its history and goes on with it damaged).

`faithful=False` switches to cleaned-up rules: float32 scores (no float16 rounding or saturation), banned and
non-candidate tokens at -inf instead of -999, stock transformers 5.x beam rules (as the `beam` method),
penalty_weights=0 meaning no penalty, no window_size limit on rollback positions, the location history
follows the beams when they are reordered (the reference keeps it per row), rejection lists are cleared for every regenerated position (the reference
clears entries counted from the end of its 512-long list), and `window_size` limits the columns to the paper's
local window of the last `window_size` response tokens and the location count to the last `window_size` steps.

How it runs (cost per step close to stock beam search):
- The prompt, image included, is prefilled once per input (not once per beam) and its KV kept.
- Each step runs ONE forward for all beams x candidates: the candidates are fed as extra query positions
  sharing the beams' cache, all at the next position, with a 4-D mask letting each see the prefix and itself.
  The last layer's attention of these rows is captured through the engine (only that layer, max over heads).
  When every chosen token is one of its beam's candidates (always, unless a rollback re-choice or
  `renormalize_candidates=False` picks another token), the chosen candidates' KV entries and logits ARE the
  next step: no further forward. Otherwise the candidate entries are cropped and the chosen tokens fed.
- Column products are updated incrementally (a running sum of logs per column), O(response) per step.
- A rollback rebuilds the cache from the kept prompt KV plus one forward over every row's response tokens (the
  reference re-prefills prompt, image and response). In a batch, inputs whose response became shorter than
  another's hold masked gap entries between prompt and response, so each input rolls back on its own.
- A rollback returns to a state among the last `window_size` saved ones, as the reference's history; a target
  older than that (reachable only after ~window_size tokens, where the reference crashes inside its bare
  `except`) means no rollback.

Interventions are applied inside every forward: their attention ops run on all candidate rows (query_len = C,
`ctx.step` = the step the candidates would be fed at) and on the rebuild's rows, and `process_logits` is called
once per step with the chosen tokens, exactly as in `GenerationRun.advance`. A capture with rows="last" sees only
the last candidate's row. `supports_rollback=False` interventions are refused unless rollback is impossible
(threshold >= max_new_tokens - 10); rollback-safe interventions must not keep per-step state, since a rollback
recomputes a response in one multi-token forward. Nor may they find response keys by column: after a rollback
in a batch, a row's response starts after its gap entries (masked, at the dtype minimum in the logits an edit
sees), so response token j is at column prompt_len + j only in the row with the longest response. Prompt
columns never move (PAI, AAI, truncation and FastV edit or mask prompt keys only).

Each `Hypothesis.extras["opera"]` holds `rollbacks`, `decoding_steps` (steps including redone ones) and
`rollback_events` (step, summary location, target, re-chosen position, banned and newly chosen
(beam, token) pairs).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from vlmscope.attention.engine import Capture, attention_plan, decoder_attention_modules
from vlmscope.decoding.base import DECODINGS, DecodingMethod, Hypothesis
from vlmscope.decoding.beam import BeamSearch, BeamState, ReferenceBeamSearch
from vlmscope.decoding.opera_penalty import (
    over_trust,
    quantize_scores,
    smallest_mode,
    window_log_scores,
)
from vlmscope.errors import InputError, UnsupportedModelError
from vlmscope.models.adapters import TextAdapter, text_batch
from vlmscope.models.families_seed import model_forward

IMAGE_BONUS_POSITIONS = 10  # reference: image-attention bonus while the window (candidate included) has <= 10 rows
MIN_ROLLBACK_LOCATION = 10  # reference: never roll back to a summary token among the first 10 response tokens
REFERENCE_FILLER = -999.0  # the reference's stand-in for -inf


@DECODINGS.register("opera")
@dataclass(frozen=True)
class OperaDecoding(DecodingMethod):
    """OPERA beam search. Parameters and defaults as the reference code (shikiw/OPERA, `chair_eval.py`).

    num_beams: beams per input (1 allowed: the reference refuses it). scale_factor: sigma in the column product.
    threshold: a location must recur more than this many times for a rollback (set it >= max_new_tokens to
    disable rollback). num_attn_candidates: candidates per beam, also the rollback budget per position.
    penalty_weights: alpha. window_size: history length (and, with faithful=False, the local window).
    faithful: reproduce the reference's numerics and rules (see the module doc). renormalize_candidates: True as
    the reference (log-softmax over each beam's candidates only); False: penalised candidate logits are put
    back into the full logits and scored over the whole vocabulary (alpha=0 then is plain beam search).
    image_span: (start, end), end exclusive, in each input's own (unpadded) token positions: the image tokens
    for models without an image mask (plain language models); default: the batch's image tokens.
    beam_rules: the beam bookkeeping. "reference": transformers 4.29's `BeamSearchScorer` as the reference runs
    on (`beam.ReferenceBeamSearch`: ties kept in topk order, lengths counting the reference's prompt input_ids,
    its stopping test); "stock": the stock transformers 5.x rules of the `beam` method; "auto" (default):
    "reference" when faithful, else "stock".
    """

    num_beams: int = 5
    scale_factor: float = 50.0
    threshold: int = 15
    num_attn_candidates: int = 5
    penalty_weights: float = 1.0
    window_size: int = 512
    faithful: bool = True
    renormalize_candidates: bool = True
    length_penalty: float = 1.0
    early_stopping: bool = False
    image_span: tuple[int, int] | None = None
    beam_rules: str = "auto"

    def __post_init__(self) -> None:
        if self.beam_rules not in ("auto", "reference", "stock"):
            raise InputError(f"beam_rules must be auto, reference or stock, not {self.beam_rules!r}")
        if self.num_beams < 1:
            raise InputError("num_beams must be >= 1")
        if self.num_attn_candidates < 1:
            raise InputError("num_attn_candidates must be >= 1")
        if self.scale_factor <= 0:
            raise InputError("scale_factor must be > 0")
        if self.window_size < 2:
            raise InputError("window_size must be >= 2")
        if self.threshold < 0:
            raise InputError("threshold must be >= 0")
        if self.image_span is not None and not 0 <= self.image_span[0] < self.image_span[1]:
            raise InputError("image_span must be (start, end) with 0 <= start < end")
        if self.num_attn_candidates == 1 and self.renormalize_candidates:
            warnings.warn("OPERA with num_attn_candidates=1 and renormalized candidates: every candidate gets "
                          "log-prob 0, so the over-trust penalty has no effect (only rollbacks act)",
                          stacklevel=2)

    def rollback_possible(self, max_new_tokens: int) -> bool:
        """Whether any rollback can happen within `max_new_tokens` steps.

        A location s >= 10 can recur at most t - s + 1 times by step t (locations never exceed the step), so a
        rollback needs t >= threshold + 10 with t <= max_new_tokens - 1.
        """
        return max_new_tokens - 1 >= self.threshold + MIN_ROLLBACK_LOCATION

    def decode(self, run: Any, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> list[Hypothesis]:
        return _OperaSearch(self, run, max_new_tokens, list(eos_ids), pad_id).search()


# --- per-sample state ----------------------------------------------------------------------------------------

def _clone_state(state: BeamState) -> BeamState:
    return BeamState(*(None if getattr(state, f.name) is None else getattr(state, f.name).clone()
                       for f in fields(BeamState)))


@dataclass
class _Saved:
    """What is needed to return to the start of one step of one sample."""

    state: BeamState  # beams (tokens, log-probs, scores) and finished hypotheses before the step's choice
    column_logs: torch.Tensor  # [K, t] running column log-products of the beams
    locations: torch.Tensor  # [K, t + 1] location history including this step's locations
    choices: tuple[torch.Tensor, torch.Tensor] | None = None  # (source beam [K], token [K]) chosen at the step
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens [K, C], penalised logits [K, C])


@dataclass
class _Sample:
    state: BeamState
    rows: slice
    locations: torch.Tensor  # [K, capacity] location history (per row; per beam when not faithful)
    length: int = 0  # response tokens of the running beams = the step being decided
    active: bool = True
    history: OrderedDict[int, _Saved] = field(default_factory=OrderedDict)
    rollbacks_at: dict[int, int] = field(default_factory=dict)  # rollback budget used, per response position
    rejected: dict[int, torch.Tensor] = field(default_factory=dict)  # banned flat (beam * V + token) indices
    events: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    banned_now: torch.Tensor | None = None  # flat indices banned at the position being re-chosen
    scorer: BeamSearch | None = None  # beam bookkeeping rules (transformers 4.29's when faithful)


@dataclass
class _Rollback:
    target: int  # the reference's rollback position (budget and rejection lists are keyed by it)
    restore: int  # the response position actually re-chosen (the reference restores history[-2])
    location: int
    popped: int  # history entries the reference pops before restoring
    # The reference's last rejection list is at window_size - 1: a target there makes it raise (IndexError at
    # `reject_token_pos_gather[rollback_pos + 1]`) after restoring and re-prefilling, and its bare `except` then
    # re-chooses from the restored step's penalised candidates, with nothing banned.
    from_saved_candidates: bool = False


# --- the search ----------------------------------------------------------------------------------------------

class _OperaSearch:
    def __init__(self, cfg: OperaDecoding, run: Any, max_new_tokens: int, eos_ids: list[int], pad_id: int
                 ) -> None:
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if run.num_beams != 1 or run.cache is not None:
            raise InputError("OPERA expands the beams itself: pass a fresh GenerationRun (no expand/prefill)")
        self.cfg = cfg
        self.run = run
        self.max_new = max_new_tokens
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.beams = cfg.num_beams
        self.cands = cfg.num_attn_candidates
        self.batch = run.batch.batch_size
        self.rows = self.batch * self.beams
        self.beam_search = BeamSearch(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                                      early_stopping=cfg.early_stopping)
        self.filler = REFERENCE_FILLER if cfg.faithful else float("-inf")
        self.rollback_enabled = cfg.rollback_possible(max_new_tokens)
        self._check_interventions()
        self.last_layer = decoder_attention_modules(run.model)[-1].layer_idx
        self.image_mask = self._image_mask()  # bool [B, prompt_len]

    # --- checks ------------------------------------------------------------------------------------------
    def _check_interventions(self) -> None:
        for intervention in self.run.interventions:
            name = getattr(intervention, "name", type(intervention).__name__)
            if self.beams > 1 and not getattr(intervention, "supports_beams", True):
                raise InputError(f"intervention {name!r} does not support beam search: use OPERA with "
                                 "num_beams=1 or drop the intervention")
            if self.rollback_enabled and not getattr(intervention, "supports_rollback", True):
                raise InputError(f"intervention {name!r} cannot follow OPERA's rollbacks: set OPERA's threshold "
                                 f">= max_new_tokens ({self.max_new}) to disable rollback, or drop the "
                                 "intervention")

    def _image_mask(self) -> torch.Tensor:
        batch = self.run.batch
        if self.cfg.image_span is not None:
            start, end = self.cfg.image_span
            lengths = batch.attention_mask.sum(dim=1)
            width = batch.input_ids.shape[1]
            if int(lengths.min()) < end:
                raise InputError(f"image_span {self.cfg.image_span} ends past a prompt of {int(lengths.min())} "
                                 "tokens: give (start, end) inside every prompt")
            pads = (width - lengths)[:, None]
            positions = torch.arange(width, device=lengths.device)[None, :] - pads
            return (positions >= start) & (positions < end)
        mask = batch.image_mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise InputError("OPERA needs the image tokens of every input: give image_span=(start, end) "
                             "for models without image tokens")
        return mask

    # --- main loop ---------------------------------------------------------------------------------------
    def search(self) -> list[Hypothesis]:
        run = self.run
        logits = self.start()
        # One activation of the plan for the whole search: our own forwards call the model directly (the run
        # already holds the engine switch); run.advance nests its own activation, which costs no module walk.
        with attention_plan(run.model, run.plan):
            while any(s.active for s in self.samples):
                logits = self._step(logits)
        return [self._finish(s) for s in self.samples]

    def start(self) -> torch.Tensor:
        """Prefill each input once, keep its KV, expand to the beams; returns the first logits [N, V]."""
        run = self.run
        logits = run.prefill()
        self._check_cache()
        self.prompt_len = run.attention_mask.shape[1]
        self.prompt_kv = [(layer.keys.clone(), layer.values.clone()) for layer in run.cache.layers]
        self.prompt_logits = logits.clone()
        self.vocab_size = logits.shape[-1]
        expand = torch.arange(self.batch, device=run.device).repeat_interleave(self.beams)
        run.reorder(expand)
        run.num_beams = self.beams
        logits = logits.index_select(0, expand.to(logits.device))
        self.prompt_mask = run.attention_mask.clone()
        self.prompt_positions = run.last_positions.clone()
        self.image_keys = self.image_mask.to(run.device).index_select(0, expand)
        device = logits.device
        self.column_logs = torch.zeros(self.rows, self.max_new + 1, device=device)
        self.lengths = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.samples = [
            _Sample(BeamState.start(1, self.beams, self.max_new, self.pad_id, device),
                    slice(b * self.beams, (b + 1) * self.beams),
                    torch.zeros(self.beams, self.max_new + 1, dtype=torch.long, device=device))
            for b in range(self.batch)
        ]
        for b, sample in enumerate(self.samples):
            sample.scorer = self._scorer(b)
        return logits

    def _scorer(self, b: int) -> BeamSearch:
        """The beam bookkeeping of sample b. Faithful: transformers 4.29's `BeamSearchScorer`, which scores a
        hypothesis by its length INCLUDING the reference's prompt input_ids: one dummy BOS on the
        `inputs_embeds` path (MiniGPT-4, InstructBLIP, and a language model with an explicit image span here),
        the text tokens plus one image placeholder on the LLaVA path (images passed with input_ids)."""
        rules = self.cfg.beam_rules
        if rules == "stock" or (rules == "auto" and not self.cfg.faithful):
            return self.beam_search
        if self.cfg.image_span is not None:
            offset = 1
        else:
            prompt = int(self.run.batch.attention_mask[b].sum())
            offset = prompt - int(self.image_mask[b].sum()) + 1
        return ReferenceBeamSearch(num_beams=self.cfg.num_beams, length_penalty=self.cfg.length_penalty,
                                   early_stopping=self.cfg.early_stopping, length_offset=offset)

    def _check_cache(self) -> None:
        for layer in self.run.cache.layers:
            if getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None \
                    or not getattr(layer, "is_croppable", False):
                raise UnsupportedModelError(f"OPERA needs a full-attention dynamic KV cache; got "
                                            f"{type(layer).__name__}")

    def _step(self, logits: torch.Tensor) -> torch.Tensor | None:
        cfg, run = self.cfg, self.run
        cand_logits, cand_tokens = torch.topk(logits, self.cands, dim=-1)
        next_logits, probs = self._forward_candidates(cand_tokens)
        weights, image_mass = self._window(probs, self.lengths)
        log_scores, valid = window_log_scores(self.column_logs, weights, self.lengths, cfg.scale_factor)
        scores = quantize_scores(log_scores, cfg.faithful)
        if not cfg.faithful:
            first = (self.lengths + 1 - cfg.window_size).clamp(min=0)
            columns = torch.arange(scores.shape[-1], device=scores.device)
            valid = valid & (columns[None, :] >= first[:, None])[:, None, :]
        penalty, locations = over_trust(scores, valid)
        early = (self.lengths + 1 <= IMAGE_BONUS_POSITIONS)[:, None]
        penalty = torch.where(early, -image_mass, penalty)
        if cfg.faithful or cfg.penalty_weights != 0:
            # Faithful: literally z - alpha * penalty, so alpha = 0 with a saturated (inf) score gives NaN
            # logits as in the reference (NaN rows then win every topk). Otherwise alpha = 0 means "no penalty".
            cand_logits = cand_logits - cfg.penalty_weights * penalty
        row_locations = smallest_mode(locations)

        rollbacks: dict[int, _Rollback] = {}
        for b, sample in enumerate(self.samples):
            if not sample.active:
                continue
            sample.locations[:, sample.length] = row_locations[sample.rows]
            decision = self._rollback_decision(sample)
            if decision is not None:
                rollbacks[b] = decision
        rebuilt = None
        if rollbacks:
            for b, decision in rollbacks.items():
                self._restore(self.samples[b], decision)
            rebuilt = self._rebuild()  # every row's logits on the new cache (restored beams: re-chosen position)

        sources = torch.arange(self.rows, device=logits.device)
        tokens = torch.full((self.rows,), self.pad_id, dtype=torch.long, device=logits.device)
        for b, sample in enumerate(self.samples):
            if not sample.active:
                continue
            rows = sample.rows
            if rebuilt is not None and b in rollbacks and rollbacks[b].from_saved_candidates:
                saved_tokens, saved_logits = sample.history[sample.length].candidates
                logprobs = self._candidate_logprobs(torch.full_like(rebuilt[rows], self.filler), saved_tokens,
                                                    saved_logits)
            elif rebuilt is not None and b in rollbacks:
                logprobs = self._rechoice_logprobs(rebuilt[rows], sample)
            else:
                logprobs = self._candidate_logprobs(logits[rows], cand_tokens[rows], cand_logits[rows])
                self._save(sample, cand_tokens[rows], cand_logits[rows])
            step = sample.length
            source, chosen, done = sample.scorer.step(sample.state, logprobs, step, self.max_new, self.eos_ids)
            sample.history[step].choices = (source.clone(), chosen.clone())
            if b in rollbacks:
                sample.events[-1]["chosen"] = _pairs(source, chosen)
            if not cfg.faithful:
                sample.locations[:, : step + 1] = sample.locations[source, : step + 1]
            sample.length = step + 1
            sample.steps += 1
            if done:
                sample.active = False
                continue
            sources[rows] = source + rows.start
            tokens[rows] = chosen
        if not any(s.active for s in self.samples):
            return None

        active_rows = self._active_rows()
        in_candidates = cand_tokens.index_select(0, sources) == tokens[:, None]
        reuse = not rollbacks and bool(in_candidates.any(dim=1)[active_rows].all())
        if reuse:
            chosen_cand = in_candidates.long().argmax(dim=1)  # 0 for the rows of finished inputs
            row_weights = weights[sources, chosen_cand]
            tokens = torch.where(active_rows, tokens, cand_tokens.index_select(0, sources)[:, 0])
            logits = self._commit_candidates(sources, chosen_cand, tokens, next_logits)
            new_lengths = self.lengths.index_select(0, sources)
        else:
            if not rollbacks:
                run.cache.crop(-self.cands)
            run.reorder(sources)
            with self._capture("last") as capture:
                logits = run.advance(tokens)
            new_lengths = self.lengths.index_select(0, sources)
            row_weights, _ = self._window(capture.records[-1][:, 0], new_lengths)
            row_weights = row_weights[:, 0]
        self._update_columns(sources, row_weights, new_lengths)
        for sample in self.samples:
            if sample.active:
                self.lengths[sample.rows] = sample.length
        return logits

    def _active_rows(self) -> torch.Tensor:
        active = torch.zeros(self.rows, dtype=torch.bool, device=self.lengths.device)
        for sample in self.samples:
            active[sample.rows] = sample.active
        return active

    # --- forwards ----------------------------------------------------------------------------------------
    def _forward(self, **kwargs: Any) -> Any:
        """A forward of the model with the run's plan active (the search holds `attention_plan` open)."""
        run = self.run
        return model_forward(run.model, **kwargs, **run.extra_forward_kwargs, use_cache=True, return_dict=True)

    def _forward_candidates(self, cand_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All beams x candidates in one forward on the beams' cache; the cache keeps C new entries per row.

        Returns the candidates' raw next-token logits [N, C, V] and the last layer's max-over-heads attention
        of the candidate rows [N, C, L + C] (L = cached keys; candidate c's own key is column L + c).
        """
        run = self.run
        rows, cands = cand_tokens.shape
        keys = run.attention_mask.shape[1]
        prefix = run.attention_mask.bool()[:, None, None, :].expand(rows, 1, cands, keys)
        own = torch.eye(cands, dtype=torch.bool, device=run.device)[None, None].expand(rows, 1, cands, cands)
        mask = torch.cat([prefix, own], dim=-1)
        positions = (run.last_positions + 1)[..., None].expand(*run.last_positions.shape, cands)
        with self._capture("all") as capture, self._all_rows_are_queries():
            run.plan.step = run.step + 1  # plan ops see the step these tokens would be fed at
            try:
                out = self._forward(input_ids=cand_tokens.to(run.device), attention_mask=mask,
                                    position_ids=positions, past_key_values=run.cache)
            finally:
                run.plan.step = run.step
        return out.logits.float(), capture.records[-1][:, 0]

    def _commit_candidates(self, sources: torch.Tensor, chosen: torch.Tensor, tokens: torch.Tensor,
                           next_logits: torch.Tensor) -> torch.Tensor:
        """Make the chosen candidates the next step: reorder rows, keep their KV entry, drop the others."""
        run = self.run
        run.reorder(sources)
        rows = torch.arange(self.rows, device=run.device)
        chosen_dev = chosen.to(run.device)
        for layer in run.cache.layers:
            base = layer.keys.shape[2] - self.cands
            if self.cands > 1:
                layer.keys[:, :, base] = layer.keys[rows, :, base + chosen_dev]
                layer.values[:, :, base] = layer.values[rows, :, base + chosen_dev]
                layer.crop(-(self.cands - 1))
        ones = torch.ones(self.rows, 1, dtype=run.attention_mask.dtype, device=run.device)
        run.attention_mask = torch.cat([run.attention_mask, ones], dim=1)
        run.last_positions = run.last_positions + 1
        run.step += 1
        run.plan.step = run.step
        raw = next_logits[sources.to(next_logits.device), chosen.to(next_logits.device)]
        return run._process(raw, tokens.to(run.device))

    def _rebuild(self) -> torch.Tensor:
        """New cache = kept prompt KV + one forward over every row's response (after a rollback).

        Rows whose response is shorter than the longest hold masked gap entries between prompt and response,
        so the cache stays rectangular. Returns the processed logits for every row's next position.
        """
        run = self.run
        lengths = torch.zeros(self.rows, dtype=torch.long, device=run.device)
        for sample in self.samples:
            if sample.active:
                lengths[sample.rows] = sample.length
        span = int(lengths.max())
        region_tokens = torch.full((self.rows, span), self.pad_id, dtype=torch.long, device=run.device)
        for sample in self.samples:
            if sample.active and sample.length:
                region_tokens[sample.rows, span - sample.length:] = sample.state.running_tokens[0, :, : sample.length]
        offsets = torch.arange(span, device=run.device)[None, :] - (span - lengths)[:, None]  # 0 = first token
        region_mask = (offsets >= 0).to(self.prompt_mask.dtype)
        expand = torch.arange(self.batch, device=run.device).repeat_interleave(self.beams)
        cache_class = type(run.cache)
        run.cache = None  # release the old cache before building the new one (peak memory)
        cache = cache_class(
            ddp_cache_data=[(k.index_select(0, expand.to(k.device)), v.index_select(0, expand.to(v.device)))
                            for k, v in self.prompt_kv],
            config=run.model.config,
        )
        attention_mask = torch.cat([self.prompt_mask, region_mask], dim=1)
        if span:
            step_offsets = (offsets.clamp(min=0) + 1)
            if self.prompt_positions.dim() == 2:  # M-RoPE positions [3, N]
                positions = self.prompt_positions[:, :, None] + step_offsets[None]
            else:
                positions = self.prompt_positions[:, None] + step_offsets
            with self._all_rows_are_queries():
                out = self._forward(input_ids=region_tokens, attention_mask=attention_mask, position_ids=positions,
                                    past_key_values=cache, logits_to_keep=1)
            raw = out.logits[:, -1, :].float()
        else:  # nothing to re-run: the prefill's (already processed) logits
            processed = self.prompt_logits.index_select(0, expand.to(self.prompt_logits.device))
        run.cache = cache
        run.attention_mask = attention_mask
        run.last_positions = self.prompt_positions + (lengths if self.prompt_positions.dim() == 1
                                                      else lengths[None, :])
        run.step = span
        run.plan.step = span
        self.lengths = lengths.to(self.lengths.device)
        if span:
            processed = run._process(raw, region_tokens[:, -1])
        return processed

    # --- attention windows and column products --------------------------------------------------------
    def _window(self, probs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Renormalised response-window weights and image mass of new query rows.

        probs: [N, C, L + C] attention of C query rows per beam (row c's own key at column L + c; the response
        of row n is the last lengths[n] keys before column L). Returns (weights [N, C, T + 1] with columns
        0..t_n - 1 = response tokens, column t_n = the row itself, zeros beyond; image mass [N, C]).
        """
        rows, cands, width = probs.shape
        keys = width - cands
        probs = probs.float()
        probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalise the max-over-heads row over all keys
        image_keys = torch.zeros(rows, keys, dtype=torch.bool, device=probs.device)
        prompt = min(keys, self.image_keys.shape[1])
        image_keys[:, :prompt] = self.image_keys[:, :prompt].to(probs.device)
        image_mass = (probs[:, :, :keys] * image_keys[:, None, :]).sum(dim=-1)
        lengths = lengths.to(probs.device)
        span = int(lengths.max()) if rows else 0
        columns = torch.arange(span + 1, device=probs.device)
        source = (keys - lengths)[:, None] + columns[None, :]  # key index of response column j
        is_response = columns[None, :] < lengths[:, None]
        gathered = torch.gather(probs[:, :, :keys], 2,
                                source.clamp(max=keys - 1).clamp(min=0)[:, None, :].expand(rows, cands, -1))
        weights = torch.where(is_response[:, None, :], gathered, torch.zeros((), device=probs.device))
        own = torch.diagonal(probs[:, :, keys:], dim1=1, dim2=2)  # [N, C]
        weights.scatter_(2, lengths[:, None, None].expand(rows, cands, 1), own[:, :, None])
        return weights, image_mass

    def _update_columns(self, sources: torch.Tensor, row_weights: torch.Tensor, lengths: torch.Tensor) -> None:
        """Append each new beam's chosen row to the column log-products of its source beam."""
        logs = self.column_logs.index_select(0, sources.to(self.column_logs.device))
        width = row_weights.shape[-1]
        columns = torch.arange(width, device=logs.device)
        lengths = lengths.to(logs.device)
        inside = columns[None, :] <= lengths[:, None]
        added = torch.where(inside, torch.log(row_weights.float() * self.cfg.scale_factor),
                            torch.zeros((), device=logs.device))
        logs[:, :width] = logs[:, :width] + added
        self.column_logs = logs

    # --- retrospection ---------------------------------------------------------------------------------
    def _save(self, sample: _Sample, cand_tokens: torch.Tensor, cand_logits: torch.Tensor) -> None:
        step = sample.length
        rows = sample.rows
        sample.history[step] = _Saved(
            _clone_state(sample.state), self.column_logs[rows, :step].clone(),
            sample.locations[:, : step + 1].clone(), candidates=(cand_tokens.clone(), cand_logits.clone()))
        while len(sample.history) > self.cfg.window_size:
            sample.history.popitem(last=False)

    def _rollback_decision(self, sample: _Sample) -> _Rollback | None:
        cfg = self.cfg
        if not self.rollback_enabled:
            return None
        step = sample.length
        history = sample.locations[:, : step + 1]
        if not cfg.faithful:
            history = history[:, max(0, step + 1 - cfg.window_size):]
        location = int(smallest_mode(sample.locations[:, step]))
        if not bool(((history == location).sum(dim=1) > cfg.threshold).all()):
            return None
        if location < MIN_ROLLBACK_LOCATION:
            return None
        target = location + 1
        if cfg.faithful and target >= cfg.window_size:
            # The reference's per-position rollback counters have window_size entries: reading the one at
            # s + 1 raises IndexError inside its bare `except`, i.e. no rollback (and no fallback to s).
            return None
        if sample.rollbacks_at.get(target, 0) >= self.cands:
            target -= 1
            if sample.rollbacks_at.get(target, 0) >= self.cands:
                return None
        restore = min(target, step - 1)
        if restore not in sample.history or restore <= step - cfg.window_size:
            # The reference would need a state older than its history: it raises inside its bare `except` and
            # goes on without rolling back (only reachable after ~window_size tokens).
            return None
        sample.rollbacks_at[target] = sample.rollbacks_at.get(target, 0) + 1
        return _Rollback(target, restore, location, max(0, step - target - 1),
                         from_saved_candidates=cfg.faithful and target + 1 >= cfg.window_size)

    def _restore(self, sample: _Sample, decision: _Rollback) -> None:
        step = sample.length
        # The reference appends this step's state (dropping the oldest of a full history) before it pops back:
        # the oldest state is gone after a rollback too.
        for position in [p for p in sample.history if p <= step - self.cfg.window_size]:
            del sample.history[position]
        saved = sample.history[decision.restore]
        # Rejection lists: the reference clears entries counted from the end of its window-long list (a bug
        # kept when faithful) and the one after the target; otherwise every regenerated position is cleared.
        if self.cfg.faithful:
            for j in range(decision.popped):
                sample.rejected.pop(self.cfg.window_size - 1 - j, None)
            sample.rejected.pop(decision.target + 1, None)
        else:
            for position in [p for p in sample.rejected if p > decision.restore]:
                sample.rejected.pop(position)
        source, token = saved.choices
        banned = source * self.vocab_size + token
        key = decision.target if self.cfg.faithful else decision.restore
        previous = sample.rejected.get(key)
        if previous is not None:
            banned = torch.cat([previous, banned])
        if decision.from_saved_candidates:  # the reference raised before recording the ban
            banned = banned[:0]
        else:
            sample.rejected[key] = banned
        sample.banned_now = banned
        for position in [p for p in sample.history if p > decision.restore]:
            del sample.history[position]
        sample.state = _clone_state(saved.state)
        restore = decision.restore
        rows = sample.rows
        self.column_logs[rows] = 0
        self.column_logs[rows, :restore] = saved.column_logs
        sample.locations[:, : restore + 1] = saved.locations
        sample.locations[:, restore + 1:] = 0
        sample.length = restore
        sample.events.append({"at_step": step, "location": decision.location, "target": decision.target,
                              "position": restore, "banned": _flat_pairs(banned, self.vocab_size)})

    def _rechoice_logprobs(self, logits: torch.Tensor, sample: _Sample) -> torch.Tensor:
        """Full-vocabulary choice at a rollback position with the earlier choices banned (no penalty)."""
        beams, vocab = logits.shape
        banned = sample.banned_now.to(logits.device)
        if self.cfg.faithful:
            # The reference shifts by the row minimum; over finite entries only, so that a logits rewrite that
            # leaves -inf entries (DeCo's candidate cut) does not turn the row into NaN. With finite logits (the
            # reference's case) this is the same minimum.
            finite_min = logits.masked_fill(~torch.isfinite(logits), float("inf")).min(dim=-1, keepdim=True).values
            shifted = logits - (-REFERENCE_FILLER + finite_min)
            flat = shifted.reshape(-1).clone()
            flat[banned] = REFERENCE_FILLER
        else:
            flat = logits.reshape(-1).clone()
            flat[banned] = float("-inf")
            if not torch.isfinite(flat).any():
                # Every finite choice is banned (a logits rewrite left only the banned tokens): re-choose as if
                # nothing were banned rather than from a row of -inf (NaN scores).
                flat = logits.reshape(-1).clone()
        return torch.log_softmax(flat.view(beams, vocab), dim=-1)

    def _candidate_logprobs(self, logits: torch.Tensor, cand_tokens: torch.Tensor, cand_logits: torch.Tensor
                            ) -> torch.Tensor:
        if self.cfg.renormalize_candidates:
            full = torch.full_like(logits, self.filler)
        else:
            full = logits.clone()
        full.scatter_(1, cand_tokens, cand_logits.to(full.dtype))
        return torch.log_softmax(full, dim=-1)

    def _finish(self, sample: _Sample) -> Hypothesis:
        hyp = sample.scorer.finalize(sample.state, self.eos_ids)[0]
        hyp.extras["opera"] = {"rollbacks": len(sample.events), "decoding_steps": sample.steps,
                               "rollback_events": sample.events}
        return hyp

    # --- plan helpers ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _capture(self, rows: str) -> Iterator[Capture]:
        """Capture the last layer's max-over-heads attention for the duration of a forward; undone on exit."""
        plan = self.run.plan
        existed = self.last_layer in plan.layers
        ops = plan.layer(self.last_layer)
        last_row_only = ops.last_row_only
        capture = plan.add_capture(self.last_layer, Capture(rows=rows, head_reduce="max"))  # type: ignore[arg-type]
        try:
            yield capture
        finally:
            ops.captures.remove(capture)
            ops.last_row_only = last_row_only
            if not existed and ops.empty():
                plan.layers.pop(self.last_layer, None)

    @contextlib.contextmanager
    def _all_rows_are_queries(self) -> Iterator[None]:
        """Every query row of the next forward is a decoding row (candidates, re-run response tokens):
        turn off the engine's prefill shortcut that applies ops to the last row only."""
        plan = self.run.plan
        saved = {idx: ops.last_row_only for idx, ops in plan.layers.items()}
        for ops in plan.layers.values():
            ops.last_row_only = False
        try:
            yield
        finally:
            for idx, value in saved.items():
                if idx in plan.layers:
                    plan.layers[idx].last_row_only = value


def _pairs(source: torch.Tensor, token: torch.Tensor) -> list[list[int]]:
    return [[int(s), int(t)] for s, t in zip(source.tolist(), token.tolist())]


def _flat_pairs(flat: torch.Tensor, vocab: int) -> list[list[int]]:
    return [[int(i) // vocab, int(i) % vocab] for i in flat.tolist()]


# --- plain causal language models ------------------------------------------------------------------------------

def opera_generate(model: Any, input_ids: torch.Tensor, image_span: tuple[int, int], *,
                   attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                   eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                   tokenizer: Any = None, interventions: Sequence[Any] = (), **params: Any) -> list[Hypothesis]:
    """OPERA on any causal language model (e.g. `LlamaForCausalLM`), with the "image" tokens given as a span.

    `params` are `OperaDecoding` fields (num_beams, scale_factor, ...). One `Hypothesis` per input row.
    """
    from vlmscope.decoding.session import GenerationRun

    method = DECODINGS.create("opera", {**params, "image_span": tuple(image_span)})
    adapter = TextAdapter(model, tokenizer)
    if eos_token_id is None:
        eos_ids = adapter.eos_token_ids()
    else:
        eos_ids = [int(e) for e in eos_token_id] if isinstance(eos_token_id, list | tuple) else [int(eos_token_id)]
    if pad_token_id is None:
        pad_token_id = adapter.pad_token_id()
    device = next(model.parameters()).device
    batch = text_batch(input_ids.to(device), None if attention_mask is None else attention_mask.to(device),
                       image_span)
    with torch.no_grad(), GenerationRun(model, adapter, batch, list(interventions)) as run:
        return method.decode(run, max_new_tokens, eos_ids, int(pad_token_id))

