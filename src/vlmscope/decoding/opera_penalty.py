"""OPERA's over-trust score as pure tensor functions (no model, no state).

Notation (see shared/reference/opera.md §5): a response "window" holds the renormalised last-layer, max-over-heads
attention weights w(i, j) of response tokens i over response tokens j (j <= i), with the candidate token as the
last row. The reference scores every column j of the window by

    score(j) = 1e-7 * prod_{i=j}^{t} scale * w(i, j)

stores the scores in a float16 buffer (so they saturate to +inf above 65504 and vanish below ~3e-8), and takes
the maximum over j as the over-trust penalty and its argmax (first index among ties) as the candidate's
"location". Here the products are kept as sums of logarithms, which neither overflows nor underflows, and the
float16 rounding is applied explicitly at the end (`faithful`), so the result does not depend on the model's
dtype or on autocast.
"""

from __future__ import annotations

import math

import torch

SCORE_SCALE = 1e-7  # the reference multiplies every column product by 1e-7 (not in the paper)
FINITE_SCORE_MAX = 1e30  # non-faithful scores are clamped here so penalties stay finite


def log_scaled(weights: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """log(scale * w) in float32; -inf where the weight is 0 (masked keys)."""
    return torch.log(weights.float() * scale_factor)


def quantize_scores(log_scores: torch.Tensor, faithful: bool) -> torch.Tensor:
    """From log(score) to the score the reference would hold, as float32.

    faithful: exp, then a real float16 round trip (round to nearest even, subnormals, +inf above the float16
    range), as the reference's float16 buffer does. Otherwise: exp clamped at FINITE_SCORE_MAX.
    """
    values = torch.exp(log_scores.float())
    if faithful:
        return values.to(torch.float16).to(torch.float32)
    return values.clamp(max=FINITE_SCORE_MAX)


def first_max(values: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over the last dim and the FIRST index reaching it (the reference's `max(-1)` on ties).

    Entries where `valid` is False never win (they are treated as -inf).
    """
    if valid is not None:
        values = values.masked_fill(~valid, float("-inf"))
    best = values.max(dim=-1, keepdim=True).values
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(values)
    hit = (values == best) if valid is None else (values == best) & valid
    big = values.shape[-1]
    index = torch.where(hit, positions, torch.full_like(positions, big)).min(dim=-1).values
    return best.squeeze(-1), index.clamp(max=big - 1)


def smallest_mode(values: torch.Tensor) -> torch.Tensor:
    """Most frequent value along the last dim; the smallest one among equally frequent values (`torch.mode`)."""
    counts = (values[..., :, None] == values[..., None, :]).sum(dim=-1)
    most = counts.max(dim=-1, keepdim=True).values
    big = torch.iinfo(torch.long).max
    return torch.where(counts == most, values.long(), torch.full_like(values.long(), big)).min(dim=-1).values


def window_log_scores(column_logs: torch.Tensor, row_weights: torch.Tensor, lengths: torch.Tensor,
                      scale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log column scores when one new row (the candidate) is appended to each beam's window.

    column_logs: [N, T+1] float32, sum_{i=j}^{t_n - 1} log(scale * w(i, j)) for the existing rows of beam n
        (columns j < t_n), and 0 from column t_n on.
    row_weights: [N, C, T+1] the candidates' renormalised weights on response columns 0..t_n - 1 and, at column
        t_n, on themselves; anything beyond t_n is ignored.
    lengths: [N] long, t_n = the number of response tokens before the candidate.
    Returns (log scores [N, C, T+1] including log(1e-7), valid [N, 1, T+1] = columns 0..t_n).
    """
    width = row_weights.shape[-1]
    columns = torch.arange(width, device=row_weights.device)
    valid = (columns[None, :] <= lengths[:, None])[:, None, :]
    logs = column_logs[:, None, :width] + log_scaled(row_weights, scale_factor) + math.log(SCORE_SCALE)
    return logs.masked_fill(~valid, float("-inf")), valid


def square_scores(window: torch.Tensor, scale_factor: float, faithful: bool = True) -> torch.Tensor:
    """The reference's column scores for full windows [..., W, W] (rows i, columns j, lower triangular).

    score(j) = 1e-7 * prod_{i=j}^{W-1} scale * window[i, j], rounded through float16 when faithful.
    Used by tests and as the readable definition; decoding updates the same sums incrementally.
    """
    size = window.shape[-1]
    rows = torch.arange(size, device=window.device)
    lower = rows[:, None] >= rows[None, :]
    logs = torch.where(lower, log_scaled(window, scale_factor), torch.zeros((), device=window.device))
    return quantize_scores(logs.sum(dim=-2) + math.log(SCORE_SCALE), faithful)


def over_trust(scores: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, location): the maximal column score and the first column reaching it."""
    return first_max(scores, valid)
