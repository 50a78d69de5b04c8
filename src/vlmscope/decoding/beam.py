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
    worst_scores: torch.Tensor | None = None  # [B] float64, only for ReferenceBeamSearch (4.29's worst_score)

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
@dataclass(frozen=True)
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

@dataclass(frozen=True)
class ReferenceBeamSearch(BeamSearch):
    """Beam search with the rules of transformers 4.29's `BeamSearchScorer`, the scorer shikiw/OPERA's
    `opera_beam_search` (and its plain beam-search baseline) run on. Not registered: OPERA's faithful mode uses
    it, and the parity tests compare it with the reference's own beam search.

    Differences from the stock 5.x rules of `BeamSearch` (each changes outputs, typically only on ties or when
    a finished and a running hypothesis compete at the length limit):
    - the running beams are the first K non-EOS candidates in `topk` order (5.x re-ranks them with a second
      `topk`, whose order among tied scores differs; OPERA's -999 filler produces exact ties);
    - a hypothesis is scored sum_logprob / (length_offset + tokens before its EOS) ** length_penalty, and the
      beams still running at the length limit by (length_offset + max_new_tokens): 4.29 counts the prompt's
      input_ids (`length_offset`: 1 for an `inputs_embeds` prompt, whose input_ids are one dummy BOS) and not
      the EOS; 5.x counts the generated tokens, EOS included;
    - at the length limit the K running beams (best non-EOS candidates) are added to the finished list, not
      the top K of all candidates;
    - the list of finished hypotheses keeps insertion order: a new one enters while fewer than K are stored
      or when it beats the worst (which is then removed, the earliest among tied worst ones); the output is the
      best, the latest stored among tied best ones;
    - a sample is done when K hypotheses are stored and the worst of them is >= the best candidate score of
      the step divided by (length_offset + step + 1) ** length_penalty (`early_stopping=False`), or once K are
      stored (`early_stopping=True`).
    """

    length_offset: int = 1

    def step(self, state: BeamState, logprobs: torch.Tensor, step: int, max_new: int, eos_ids: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        batch, beams = state.running_scores.shape
        vocab = logprobs.shape[-1]
        logprobs = logprobs.view(batch, beams, vocab)
        total = (logprobs + state.running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = torch.topk(total, 2 * beams)
        source = top_index // vocab
        tokens = top_index % vocab
        token_lp = logprobs.view(batch, -1).gather(1, top_index)
        eos = set(eos_ids)
        next_rank = torch.zeros(batch, beams, dtype=torch.long, device=logprobs.device)
        last_step = step + 1 >= max_new
        for b in range(batch):
            if not bool(state.improvable[b, 0]):  # done: 4.29 pads (beam 0, pad token), nothing is recorded
                continue
            ranks: list[int] = []
            for rank in range(2 * beams):
                if int(tokens[b, rank]) in eos:
                    if rank < beams:
                        self._add(state, b, self._candidate(state, b, source, tokens, token_lp, rank, step),
                                  float(top_scores[b, rank]), self.length_offset + step)
                else:
                    ranks.append(rank)
                if len(ranks) == beams:
                    break
            next_rank[b] = torch.tensor(ranks, device=logprobs.device)
            if int(state.is_finished[b].sum()) >= beams:  # 4.29's BeamHypotheses.is_done
                if self.early_stopping is True:
                    state.improvable[b, 0] = False
                else:
                    # 4.29's cur_len = input_ids length + 1 = the length the new scores are computed on
                    best = float(top_scores[b].max()) / (self.length_offset + step + 1) ** self.length_penalty
                    if float(state.worst_scores[b]) >= best:
                        state.improvable[b, 0] = False
        new_tokens, new_lp = [], []
        for b in range(batch):
            cand = [self._candidate(state, b, source, tokens, token_lp, int(r), step) for r in next_rank[b]]
            new_tokens.append(torch.stack([c[0] for c in cand]))
            new_lp.append(torch.stack([c[1] for c in cand]))
        running_scores = top_scores.gather(1, next_rank)
        if last_step:  # 4.29's finalize: the running beams of unfinished samples join the hypotheses, in order
            for b in range(batch):
                if bool(state.improvable[b, 0]):
                    for k in range(beams):
                        self._add(state, b, (new_tokens[b][k], new_lp[b][k], step + 1),
                                  float(running_scores[b, k]), self.length_offset + max_new)
        state.running_tokens = torch.stack(new_tokens)
        state.running_logprobs = torch.stack(new_lp)
        state.running_scores = running_scores
        next_source = source.gather(1, next_rank)
        next_tokens = tokens.gather(1, next_rank)
        done = last_step or not bool(state.improvable.any())
        offsets = torch.arange(batch, device=logprobs.device)[:, None] * beams
        return (next_source + offsets).view(-1), next_tokens.view(-1), done

    @staticmethod
    def _candidate(state: BeamState, b: int, source: torch.Tensor, tokens: torch.Tensor, token_lp: torch.Tensor,
                   rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(token buffer, log-prob buffer, length) of candidate `rank`: its source beam plus the new token."""
        beam = int(source[b, rank])
        ids = state.running_tokens[b, beam].clone()
        lps = state.running_logprobs[b, beam].clone()
        ids[step] = tokens[b, rank]
        lps[step] = token_lp[b, rank]
        return ids, lps, step + 1

    def _add(self, state: BeamState, b: int, hyp: tuple[torch.Tensor, torch.Tensor, int], sum_logprobs: float,
             norm_length: int) -> None:
        """4.29's `BeamHypotheses.add`, statement for statement (python floats, so NaN scores behave the same),
        on slots kept in insertion order (slots 0..n-1 occupied) and a tracked worst score."""
        beams = state.finished_scores.shape[1]
        self._double(state)
        score = sum_logprobs / norm_length ** self.length_penalty
        stored = int(state.is_finished[b].sum())
        worst_score = float(state.worst_scores[b])
        if not (stored < beams or score > worst_score):
            return
        slot_tokens = [state.finished_tokens[b, i] for i in range(stored)] + [hyp[0]]
        slot_lp = [state.finished_logprobs[b, i] for i in range(stored)] + [hyp[1]]
        slot_scores = [float(state.finished_scores[b, i]) for i in range(stored)] + [score]
        slot_lengths = [int(state.finished_lengths[b, i]) for i in range(stored)] + [hyp[2]]
        if len(slot_scores) > beams:
            sorted_scores = sorted([(s, i) for i, s in enumerate(slot_scores)])
            for slots in (slot_tokens, slot_lp, slot_scores, slot_lengths):
                del slots[sorted_scores[0][1]]
            worst_score = sorted_scores[1][0]
        else:
            worst_score = min(score, worst_score)
        state.worst_scores[b] = worst_score
        for i in range(len(slot_scores)):
            state.finished_tokens[b, i] = slot_tokens[i]
            state.finished_logprobs[b, i] = slot_lp[i]
            state.finished_scores[b, i] = slot_scores[i]
            state.finished_lengths[b, i] = slot_lengths[i]
            state.is_finished[b, i] = True

    @staticmethod
    def _double(state: BeamState) -> None:
        """Hypothesis scores in float64 (4.29 keeps python floats) and the tracked worst score (4.29: 1e9)."""
        if state.finished_scores.dtype != torch.float64:
            state.finished_scores = state.finished_scores.double()
        if state.worst_scores is None:
            state.worst_scores = torch.full((state.finished_scores.shape[0],), 1e9, dtype=torch.float64,
                                            device=state.finished_scores.device)

    def finalize(self, state: BeamState, eos_ids: list[int]) -> list[Hypothesis]:
        out = []
        for b in range(state.finished_scores.shape[0]):
            stored = int(state.is_finished[b].sum())
            scores = state.finished_scores[b, :stored].tolist()
            best = sorted(range(stored), key=lambda i: scores[i]).pop()  # as 4.29: the latest among tied best
            length = int(state.finished_lengths[b, best])
            tokens = state.finished_tokens[b, best, :length].tolist()
            logprobs = state.finished_logprobs[b, best, :length].tolist()
            tokens, logprobs = trim_after_eos(tokens, logprobs, eos_ids)
            out.append(Hypothesis(tokens, logprobs, sequence_score=float(scores[best])))
        return out
