"""Beam search with the same rules as stock transformers 5.x `generate(num_beams=K)`.

Per step: accumulated log-probs over K·V candidates, the top max(2, 1 + #eos)·K kept; candidates ending in EOS
(or reaching the length limit) that rank within the top K become finished hypotheses, scored
sum_logprob / length**length_penalty; the best K unfinished continue. The search stops when no running beam
can beat the worst finished one (the stock heuristic for `early_stopping=False`), when every beam is finished
under `early_stopping=True`, or at the length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmscope.decoding.base import DECODINGS, DecodingMethod, Hypothesis, eos_tensor, trim_after_eos

NEG = -1.0e9


@dataclass
class BeamState:
    """Running and finished beams for B inputs × K beams; token buffers hold generated tokens only."""

    running_tokens: torch.Tensor  # [B, K, T]
    running_logprobs: torch.Tensor  # [B, K, T] per-token log-probs
    running_scores: torch.Tensor  # [B, K]
    finished_tokens: torch.Tensor
    finished_logprobs: torch.Tensor
    finished_scores: torch.Tensor  # [B, K], length-penalised
    finished_lengths: torch.Tensor  # [B, K]
    is_finished: torch.Tensor  # [B, K] bool: a finished hypothesis occupies the slot
    improvable: torch.Tensor  # [B, 1] bool

    @classmethod
    def start(cls, batch: int, beams: int, max_new: int, pad_id: int, device: torch.device) -> BeamState:
        tokens = torch.full((batch, beams, max_new), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(batch, beams, max_new, device=device)
        running = torch.zeros(batch, beams, device=device)
        running[:, 1:] = NEG
        return cls(tokens, logprobs, running, tokens.clone(), logprobs.clone(),
                   torch.full((batch, beams), NEG, device=device),
                   torch.zeros(batch, beams, dtype=torch.long, device=device),
                   torch.zeros(batch, beams, dtype=torch.bool, device=device),
                   torch.ones(batch, 1, dtype=torch.bool, device=device))


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 (beams) with a [B, M] index, for tensors [B, K, ...]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.gather(tensor, 1, index.expand(*index.shape[:2], *tensor.shape[2:]))


@DECODINGS.register("beam")
@dataclass
class BeamSearch(DecodingMethod):
    num_beams: int = 5
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")

    def decode(self, run, max_new_tokens, eos_ids, pad_id):
        beams = self.num_beams
        batch = run.batch.batch_size
        run.expand(beams)
        logits = run.prefill()
        state = BeamState.start(batch, beams, max_new_tokens, pad_id, logits.device)
        # An intervention may hand back final log-scores that the beams add as given (PAI's CFG, as stock 4.x
        # beam search adds its processors' output); otherwise each step's scores are log-softmaxed.
        as_given = any(getattr(i, "final_log_scores", False) for i in run.interventions)
        for step in range(max_new_tokens):
            logprobs = logits if as_given else torch.log_softmax(logits, dim=-1)
            beam_idx, tokens, done = self.step(state, logprobs, step, max_new_tokens, eos_ids)
            if done:
                break
            run.reorder(beam_idx)
            logits = run.advance(tokens)
        return self.finalize(state, eos_ids)

    def step(self, state: BeamState, logprobs: torch.Tensor, step: int, max_new: int, eos_ids: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Advance the beam state by one token. Returns (flat source rows, next tokens, finished?)."""
        batch, beams = state.running_scores.shape
        vocab = logprobs.shape[-1]
        logprobs = logprobs.view(batch, beams, vocab)
        eos = eos_tensor(eos_ids, logprobs.device)
        keep = max(2, 1 + len(eos_ids)) * beams
        total = (logprobs + state.running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = torch.topk(total, keep)
        source = top_index // vocab
        tokens = top_index % vocab
        token_lp = logprobs.view(batch, -1).gather(1, top_index)
        cand_tokens = _gather(state.running_tokens, source)
        cand_lp = _gather(state.running_logprobs, source)
        cand_tokens[:, :, step] = tokens
        cand_lp[:, :, step] = token_lp
        hits = torch.isin(tokens, eos) | (step + 1 >= max_new)

        # Running beams for the next step: the best K that did not stop.
        running_scores = top_scores + hits.float() * NEG
        next_index = torch.topk(running_scores, beams).indices
        state.running_tokens = _gather(cand_tokens, next_index)
        state.running_logprobs = _gather(cand_lp, next_index)
        state.running_scores = running_scores.gather(1, next_index)
        next_source = source.gather(1, next_index)
        next_tokens = tokens.gather(1, next_index)

        # Finished hypotheses: only candidates ranked within the top K may enter.
        in_top = torch.zeros_like(hits)
        in_top[:, :beams] = True
        just_finished = hits & in_top
        length = step + 1
        final = top_scores / (length ** self.length_penalty)
        full = state.is_finished.all(dim=1, keepdim=True) & bool(self.early_stopping)
        final = final + full.float() * NEG + (~state.improvable).float() * NEG + (~just_finished).float() * NEG
        merged_scores = torch.cat([state.finished_scores, final], 1)
        best = torch.topk(merged_scores, beams).indices
        state.finished_tokens = _gather(torch.cat([state.finished_tokens, cand_tokens], 1), best)
        state.finished_logprobs = _gather(torch.cat([state.finished_logprobs, cand_lp], 1), best)
        state.finished_scores = merged_scores.gather(1, best)
        lengths = torch.full_like(tokens, length)
        state.finished_lengths = torch.cat([state.finished_lengths, lengths], 1).gather(1, best)
        state.is_finished = torch.cat([state.is_finished, just_finished], 1).gather(1, best)

        # Can a running beam still beat the worst finished one? (stock heuristic, early_stopping=False)
        best_running = state.running_scores[:, :1] / (length ** self.length_penalty)
        worst_finished = torch.where(state.is_finished, state.finished_scores.min(dim=1, keepdim=True).values,
                                     torch.full_like(state.finished_scores, NEG))
        state.improvable = state.improvable & (best_running > worst_finished).any(dim=1, keepdim=True)
        open_beams = not (bool(state.is_finished.all()) and self.early_stopping is True)
        done = not (bool(state.improvable.any()) and open_beams and not bool(hits.all()))
        offsets = torch.arange(batch, device=logprobs.device)[:, None] * beams
        return (next_source + offsets).view(-1), next_tokens.view(-1), done

    def finalize(self, state: BeamState, eos_ids: list[int]) -> list[Hypothesis]:
        out = []
        for b in range(state.finished_scores.shape[0]):
            length = int(state.finished_lengths[b, 0])
            tokens = state.finished_tokens[b, 0, :length].tolist()
            scores = state.finished_logprobs[b, 0, :length].tolist()
            tokens, scores = trim_after_eos(tokens, scores, eos_ids)
            out.append(Hypothesis(tokens, scores, sequence_score=float(state.finished_scores[b, 0])))
        return out


