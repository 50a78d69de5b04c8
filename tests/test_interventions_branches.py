"""Branch-owning interventions (VCD, PAI's CFG), beam search composition and batch invariance.

Oracles: full stock forwards (no cache) over prompt + generated history for every beam row after reorders, the
VCD diffusion schedule computed in numpy, unsteered beam search for identity settings, single-input runs for
batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.decoding.session import GenerationRun, Intervention
from vlmscope.interventions import INTERVENTIONS
from vlmscope.interventions.vcd import add_diffusion_noise, diffusion_coefficients, noised_model_inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["describe this image .", "what is in the image ? is there a cat on the table ?"]


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))


IMAGES = [_image(0), _image(1)]


@pytest.fixture(scope="module")
def vlm(tiny_llava: VLM) -> VLM:
    return tiny_llava  # the shared session model (conftest); nothing here changes its weights


def _generate(vlm, spec=None, images=IMAGES, prompts=PROMPTS, n=6, decoding="greedy"):
    return vlm.generate(list(images), list(prompts), max_new_tokens=n, decoding=decoding, interventions=spec)


# --- VCD noise ------------------------------------------------------------------------------------------------------


def test_diffusion_schedule_matches_numpy():
    betas = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = np.cumprod(1.0 - betas)
    for step in (0, 500, 999):
        keep, noise = diffusion_coefficients(step)
        assert keep == pytest.approx(np.sqrt(alpha_bar[step]), abs=1e-9)
        assert noise == pytest.approx(np.sqrt(1 - alpha_bar[step]), abs=1e-9)
    assert diffusion_coefficients(500) == pytest.approx((0.863, 0.505), abs=1e-3)  # peers.md
    assert diffusion_coefficients(999) == pytest.approx((0.285, 0.959), abs=1e-3)


def test_noise_is_seeded_per_input():
    pixels = torch.randn(2, 3, 8, 8)
    noised = noised_model_inputs({"pixel_values": pixels}, 500, seed=3)["pixel_values"]
    keep, scale = diffusion_coefficients(500)
    eps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3))
    for row in range(2):  # every input gets the seed's noise, whatever the batch around it
        torch.testing.assert_close(noised[row], keep * pixels[row] + scale * eps)
        torch.testing.assert_close(noised[row], add_diffusion_noise(pixels[row], 500, 3))
    assert not torch.equal(add_diffusion_noise(pixels[0], 500, 4), noised[0])


# --- branches follow beam reorders ------------------------------------------------------------------------------------

# One input expanded to 3 beams, histories made different by distinct tokens and shuffled by reorders.
_STEPS = [(None, [5, 6, 7]), ([2, 0, 2], [8, 9, 10]), ([1, 2, 0], [11, 12, 13])]


def _drive(vlm, batch, intervention):
    """Run the beam-style schedule; return the processed logits after the last step and the row histories."""
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [intervention]) as run:
        run.expand(3)
        run.prefill()
        histories = [[] for _ in range(3)]
        logits = None
        for order, tokens in _STEPS:
            if order is not None:
                run.reorder(torch.tensor(order))
                histories = [list(histories[i]) for i in order]
            for row, tok in enumerate(tokens):
                histories[row].append(tok)
            logits = run.advance(torch.tensor(tokens))
    return logits, histories


def _stock_last_logits(vlm, input_ids, attention_mask, histories, model_inputs=None):
    """Full (uncached) stock forwards of prompt + each row's history; [rows, V] fp32."""
    rows = []
    for row, history in enumerate(histories):
        ids = torch.cat([input_ids[row:row + 1], torch.tensor([history])], dim=1)
        mask = torch.cat([attention_mask[row:row + 1], torch.ones(1, len(history), dtype=attention_mask.dtype)],
                         dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        extra = {k: v[row:row + 1] for k, v in (model_inputs or {}).items()}
        with torch.no_grad():
            out = vlm.model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra)
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


def _assert_same_scores(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=2e-4, rtol=0)


def test_vcd_branch_follows_beam_reorders(vlm):
    batch = vlm.encode(IMAGES[:1], PROMPTS[:1])
    alpha, beta = 1.0, 0.1
    got, histories = _drive(vlm, batch, INTERVENTIONS.parse(f"vcd:alpha={alpha},beta={beta},noise_seed=7"))
    ids, mask = batch.input_ids.expand(3, -1), batch.attention_mask.expand(3, -1)
    clean = {"pixel_values": batch.model_inputs["pixel_values"].expand(3, -1, -1, -1)}
    noised = noised_model_inputs(clean, 500, 7)
    clean_logits = _stock_last_logits(vlm, ids, mask, histories, clean)
    noised_logits = _stock_last_logits(vlm, ids, mask, histories, noised)
    want = (1 + alpha) * clean_logits - alpha * noised_logits
    cutoff = np.log(beta) + clean_logits.max(dim=-1, keepdim=True).values
    want = want.masked_fill(clean_logits < cutoff, float("-inf"))
    _assert_same_scores(got, want)


def _cfg_expected(vlm, batch, histories, gamma):
    ids, mask = batch.input_ids.expand(3, -1), batch.attention_mask.expand(3, -1)
    cond = _stock_last_logits(vlm, ids, mask, histories,
                              {"pixel_values": batch.model_inputs["pixel_values"].expand(3, -1, -1, -1)})
    text_ids, text_mask = vlm.adapter.encode_text_only(PROMPTS[:1])
    assert text_ids.shape[1] == ids.shape[1] - 16 and int(text_ids[0, 0]) == int(ids[0, 0])  # BOS, no image
    uncond = _stock_last_logits(vlm, text_ids.expand(3, -1), text_mask.expand(3, -1), histories)
    s, u = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    want = gamma * (s - u) + u
    return want.masked_fill(s < np.log(0.1) + s.max(dim=-1, keepdim=True).values, float("-inf"))


def test_pai_cfg_branch_follows_beam_reorders(vlm):
    batch = vlm.encode(IMAGES[:1], PROMPTS[:1])
    got, histories = _drive(vlm, batch, INTERVENTIONS.parse("pai:alpha=0,cfg=true,gamma=2"))
    want = _cfg_expected(vlm, batch, histories, 2.0)
    _assert_same_scores(torch.log_softmax(got, -1), torch.log_softmax(want, -1))
    # The reference's unreordered unconditional cache mixes the beams' histories.
    quirk, _ = _drive(vlm, batch, INTERVENTIONS.parse("pai:alpha=0,cfg=true,gamma=2,cfg_reorder_uncond_cache=false"))
    finite = torch.isfinite(want) & torch.isfinite(quirk)
    assert (quirk[finite] - got[finite]).abs().max() > 1e-3


def test_pai_cfg_prefill_is_unboosted_by_default(vlm):
    batch = vlm.encode(IMAGES[:1], PROMPTS[:1])

    def first_two(spec):
        with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [INTERVENTIONS.parse(spec)]) as run:
            return run.prefill(), run.advance(torch.tensor([5]))

    base = "cfg=true,gamma=2,start=0"
    faithful = first_two(f"pai:alpha=2,{base}")
    unboosted = first_two(f"pai:alpha=0,{base}")
    boosted_prefill = first_two(f"pai:alpha=2,{base},skip_prefill_with_cfg=false")
    torch.testing.assert_close(faithful[0], unboosted[0], atol=1e-5, rtol=0)  # reference quirk (PAI#22)
    finite = torch.isfinite(faithful[0]) & torch.isfinite(boosted_prefill[0])
    assert (faithful[0][finite] - boosted_prefill[0][finite]).abs().max() > 1e-3
    finite = torch.isfinite(faithful[1]) & torch.isfinite(unboosted[1])
    assert (faithful[1][finite] - unboosted[1][finite]).abs().max() > 1e-3


# --- identity settings and beam search --------------------------------------------------------------------------------


def test_vcd_alpha0_greedy_keeps_tokens(vlm):
    plain = _generate(vlm)
    steered = _generate(vlm, "vcd:alpha=0")
    assert [r.token_ids for r in steered] == [r.token_ids for r in plain]
    assert [r.token_ids for r in _generate(vlm, "vcd")] != [r.token_ids for r in plain]


BEAM = "beam:num_beams=3"


@pytest.fixture(scope="module")
def plain_beam(vlm):
    return _generate(vlm, decoding=BEAM)


@pytest.mark.parametrize("spec", ["pai:alpha=0", "aai:alpha=0", "truncate:layer=99", "fastv:ratio=0",
                                  "vcd:alpha=0,beta=0", "pai:alpha=0,cfg=true,gamma=1"])
def test_identity_settings_equal_plain_beam_search(vlm, plain_beam, spec):
    steered = _generate(vlm, spec, decoding=BEAM)
    for got, want in zip(steered, plain_beam):
        assert got.token_ids == want.token_ids
        assert got.sequence_score == pytest.approx(want.sequence_score, abs=1e-4)


@pytest.mark.parametrize("spec", ["pai:start=0,alpha=1", "aai:alpha=1,warmup_steps=1", "truncate:layer=1",
                                  "truncate:layer=2,keep=4", "fastv:k=1", "fastv:k=1,mode=mask", "vcd",
                                  "pai:cfg=true,gamma=2"])
def test_every_method_steers_beam_search_as_it_steers_one_sequence(vlm, spec):
    # Oracle: each returned hypothesis, teacher-forced alone (one row: no beams, no reorders) through the same
    # intervention, gets the per-token log-probabilities the beam search reported, and its sequence score is
    # their sum over the length (length_penalty 1). Beam reorders that left the intervention's state behind
    # (a branch cache, a key ranking, a step count) would break this. One input per search, so row-0 rankings
    # (fastv's default) are the input's own.
    for image, prompt in zip(IMAGES, PROMPTS):
        result = _generate(vlm, spec, [image], [prompt], decoding=BEAM)[0]
        assert result.token_ids, "empty hypothesis"
        want = _teacher_forced_logprobs(vlm, image, prompt, spec, result.token_ids)
        np.testing.assert_allclose(result.scores, want, atol=2e-4)
        assert result.sequence_score == pytest.approx(sum(want) / len(want), abs=2e-4)
        # The intervention does steer: unsteered, the same tokens are scored differently.
        plain = _teacher_forced_logprobs(vlm, image, prompt, None, result.token_ids)
        assert np.abs(np.asarray(plain) - want).max() > 1e-3, "the intervention changed nothing"


def _teacher_forced_logprobs(vlm, image, prompt, spec, tokens):
    """Log-probabilities of `tokens` under the (steered) processed logits, one row, fed token by token."""
    batch = vlm.encode([image], [prompt])
    scores = []
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, vlm.resolve_interventions(spec)) as run:
        logits = run.prefill()
        for step, token in enumerate(tokens):
            scores.append(float(torch.log_softmax(logits.float(), -1)[0, token]))
            if step < len(tokens) - 1:
                logits = run.advance(torch.tensor([token]))
    return scores


# --- a batch equals its inputs run alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["pai:start=0,alpha=1", "aai:alpha=1,warmup_steps=1", "truncate:layer=1",
                                  "truncate:layer=2,keep=4", "fastv:k=1,rank_per_row=true",
                                  "fastv:k=1,mode=mask,rank_per_row=true", "vcd", "pai:cfg=true,gamma=2"])
def test_batch_equals_inputs_alone(vlm, spec):
    batch = _generate(vlm, spec)
    for row in range(2):
        alone = _generate(vlm, spec, [IMAGES[row]], [PROMPTS[row]])[0]
        assert batch[row].token_ids == alone.token_ids
        np.testing.assert_allclose(batch[row].scores, alone.scores, atol=2e-4)
        assert batch[row].image_tokens == alone.image_tokens


# --- composition with OPERA -------------------------------------------------------------------------------------------

# Penalty neutral and rollback off: OPERA then is beam search (test_opera.py), so any intervention must steer it
# exactly as it steers plain beam search.
OPERA_NEUTRAL = "opera:num_beams=3,penalty_weights=0,threshold=100,renormalize_candidates=false,beam_rules=stock"


@pytest.mark.parametrize("spec", ["pai:start=0,alpha=1", "aai:alpha=1,warmup_steps=1", "truncate:layer=1",
                                  "fastv:k=1", "vcd", "pai:cfg=true,gamma=2"])
def test_interventions_steer_neutral_opera_as_beam_search(vlm, spec):
    with_opera = _generate(vlm, spec, decoding=OPERA_NEUTRAL)
    with_beam = _generate(vlm, spec, decoding=BEAM)
    for got, want in zip(with_opera, with_beam):
        assert got.token_ids == want.token_ids
        assert got.sequence_score == pytest.approx(want.sequence_score, abs=1e-4)


@dataclass
class _AggregationColumn(Intervention):
    """Pulls the last layer's attention onto response token `tokens[i]` of input i (`token` for all when
    `tokens` is empty), so OPERA finds an aggregation column there and rolls back (test_opera.py: the same
    construction without other interventions).

    The key is found per row as the token-th key after the prompt (`prompt_width` keys) that the forward's last
    query row may attend to, not at a fixed column: after a rollback in a batch, OPERA's rebuilt cache holds
    masked gap entries before a shorter response, so the same response token sits at different columns in
    different rows (a fixed column would pull the rows with a gap onto an earlier token than the input alone).
    """

    prompt_width: int = 0
    token: int = 12
    tokens: tuple[int, ...] = ()
    layer: int = 3
    bias: float = 40.0

    def setup(self, run):
        run.plan.add_edit(self.layer, self._edit)

    def _edit(self, logits, ctx):
        # Masked keys (prompt padding, OPERA's gap entries, a candidate's sibling candidates) hold the dtype minimum.
        visible = logits[:, 0, -1, :] > torch.finfo(logits.dtype).min
        visible[:, : self.prompt_width] = False
        response_index = visible.cumsum(dim=1) - 1
        token = torch.tensor(self.tokens or (self.token,), device=logits.device)
        token = token.repeat_interleave(logits.shape[0] // token.numel())  # inputs -> their beam rows
        column = visible & (response_index == token[:, None])
        return logits + self.bias * column[:, None, None, :].to(logits.dtype)


ROLLBACK_OPERA = "opera:num_beams=2,num_attn_candidates=2,threshold=3,beam_rules=stock"


def _opera_with_column(vlm, spec, images, prompts, n=24, tokens=()):
    magnet = _AggregationColumn(prompt_width=vlm.encode(list(images), list(prompts)).input_ids.shape[1],
                                tokens=tuple(tokens))
    steering = [*vlm.resolve_interventions(spec), magnet]
    return vlm.generate(list(images), list(prompts), max_new_tokens=n, decoding=ROLLBACK_OPERA,
                        interventions=steering)


@pytest.mark.parametrize("spec", [
    "pai:start=0,alpha=1", "aai:alpha=1,warmup_steps=1", "truncate:layer=1",
    # Mask mode keeps every key in the cache; the physical drop shortens the prompt of later layers, so the
    # magnet's `prompt_width` would no longer be where their responses start.
    "fastv:k=1,mode=mask,rank_per_row=true"])
def test_interventions_run_under_opera_with_rollback(vlm, spec):
    together = _opera_with_column(vlm, spec, IMAGES, PROMPTS)
    for row, result in enumerate(together):
        events = result.extras["opera"]["rollback_events"]
        # Rollbacks did happen, at the constructed column (response token 12, rolled back to 13).
        assert result.extras["opera"]["rollbacks"] == len(events) > 0
        assert events[0]["location"] == 12 and events[0]["position"] == 13
        # Oracle: the input alone (no padding, no other row) rolls back and decodes the same way, so each row's
        # intervention state followed its own rollbacks.
        alone = _opera_with_column(vlm, spec, [IMAGES[row]], [PROMPTS[row]])[0]
        assert result.token_ids == alone.token_ids
        assert result.sequence_score == pytest.approx(alone.sequence_score, abs=1e-4)
        assert events == alone.extras["opera"]["rollback_events"]
    # And the intervention acts: without it the same rollback setting decodes differently.
    unsteered = _opera_with_column(vlm, None, IMAGES, PROMPTS)
    assert [r.token_ids for r in together] != [r.token_ids for r in unsteered]


def _rebuild_lengths(monkeypatch) -> list[list[int]]:
    """Record, for every OPERA rebuild, the response lengths of the inputs still decoding."""
    from vlmscope.decoding import opera

    recorded: list[list[int]] = []
    rebuild = opera._OperaSearch._rebuild

    def recording(search):
        recorded.append([s.length for s in search.samples if s.active])
        return rebuild(search)

    monkeypatch.setattr(opera._OperaSearch, "_rebuild", recording)
    return recorded


@pytest.mark.parametrize("spec", ["pai:start=0,alpha=1", "pai:start=0,alpha=1,edit_dtype=float32"])
def test_pai_after_a_rollback_with_gap_entries_equals_the_input_alone(vlm, spec, monkeypatch):
    # Regression (was a strict xfail): the inputs' columns are at different response tokens, so they roll back at
    # different steps and the rebuilt cache of the input
    # with the shorter response holds masked gap entries between its prompt and its response. PAI boosts the
    # prompt's image keys of every rebuilt row; the gap must change nothing. An earlier version of this test's
    # magnet pulled attention onto a fixed key column, which after a gap is an earlier response token than in the
    # input run alone: the batch then rolled back differently, which looked like a PAI bug.
    lengths = _rebuild_lengths(monkeypatch)
    columns = (12, 15)
    together = _opera_with_column(vlm, spec, IMAGES, PROMPTS, tokens=columns)
    assert any(len(set(active)) > 1 for active in lengths), lengths  # some rebuild really had a gap
    for row, result in enumerate(together):
        alone = _opera_with_column(vlm, spec, [IMAGES[row]], [PROMPTS[row]], tokens=columns[row:row + 1])[0]
        assert result.extras["opera"]["rollback_events"][0]["location"] == columns[row]
        assert result.token_ids == alone.token_ids
        assert result.sequence_score == pytest.approx(alone.sequence_score, abs=1e-4)
        assert result.extras["opera"]["rollback_events"] == alone.extras["opera"]["rollback_events"]


@pytest.mark.parametrize("spec", ["vcd", "pai:cfg=true"])
def test_branch_interventions_refuse_opera_rollback_with_a_clear_error(vlm, spec):
    from vlmscope.errors import InputError

    with pytest.raises(InputError, match="rollback"):
        _generate(vlm, spec, decoding="opera:num_beams=2", n=40)  # rollback possible: threshold 15 < 40 - 10
