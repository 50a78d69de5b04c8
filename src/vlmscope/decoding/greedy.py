"""Greedy decoding and sampling over a `GenerationRun` (one forward per step, finished rows padded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmscope.decoding.base import DECODINGS, DecodingMethod, Hypothesis, eos_tensor, trim_after_eos


@DECODINGS.register("greedy")
@dataclass(frozen=True)
class Greedy(DecodingMethod):
    """Pick the most likely token at every step (stock `generate(do_sample=False, num_beams=1)`)."""

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The random generator of one decode (made per run, so one spec serves several runs)."""
        return None

    def choose(self, logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return logprobs.argmax(dim=-1)

    def decode(self, run, max_new_tokens, eos_ids, pad_id):
        logits = run.prefill()
        generator = self.generator(logits.device)
        n = logits.shape[0]
        eos = eos_tensor(eos_ids, logits.device)
        unfinished = torch.ones(n, dtype=torch.bool, device=logits.device)
        tokens, scores = [], []
        for step in range(max_new_tokens):
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = self.choose(logprobs, generator)
            score = logprobs.gather(1, chosen[:, None]).squeeze(1)
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_id))
            tokens.append(chosen)
            scores.append(score)
            unfinished &= ~torch.isin(chosen, eos)
            if not bool(unfinished.any()) or step == max_new_tokens - 1:
                break
            logits = run.advance(chosen)
        token_rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(n)]
        score_rows = torch.stack(scores, 1).tolist() if scores else [[] for _ in range(n)]
        out = []
        for row_tokens, row_scores in zip(token_rows, score_rows):
            row_tokens, row_scores = trim_after_eos(row_tokens, row_scores, eos_ids)
            out.append(Hypothesis(row_tokens, row_scores, sequence_score=float(sum(row_scores))))
        return out


@DECODINGS.register("sample")
@dataclass(frozen=True)
class Sample(Greedy):
    """Multinomial sampling with temperature / top-k / top-p, seeded for reproducibility."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy for temperature 0)")

    def generator(self, device: torch.device) -> torch.Generator | None:
        return torch.Generator(device=device).manual_seed(self.seed)

    def choose(self, logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            generator = self.generator(logprobs.device)
        logits = logprobs / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) > self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
