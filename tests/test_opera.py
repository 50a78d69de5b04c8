"""OPERA beam search: oracles are stock `generate`, a naive literal port of the reference loop (full
recomputation with stock eager attentions, one forward per candidate), numpy float16 and hand computations."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.decoding import DECODINGS
from vlmscope.decoding.beam import BeamSearch, BeamState
from vlmscope.decoding.opera import OperaDecoding, opera_generate, text_batch
from vlmscope.decoding.opera_penalty import (
    first_max,
    quantize_scores,
    smallest_mode,
    square_scores,
    window_log_scores,
)
from vlmscope.decoding.session import GenerationRun, Intervention
from vlmscope.errors import InputError
from vlmscope.models.tiny import build_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Stock beam rules, so that these settings reduce OPERA to stock beam search (the reference's 4.29 rules are
# checked against the reference itself in test_parity_opera.py).
NEUTRAL = dict(penalty_weights=0.0, threshold=1000, renormalize_candidates=False, beam_rules="stock")


def _image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def llava() -> VLM:
    model, processor = build_tiny("llava")
    return VLM(model, processor, "tiny-llava")


def _eos(vlm: VLM) -> list[int]:
    return [int(vlm.model.generation_config.eos_token_id)]


def _decode(vlm: VLM, batch, method, max_new: int, eos_ids=None, interventions=()):
    tokenizer = vlm.adapter.tokenizer
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, list(interventions)) as run:
        return method.decode(run, max_new, _eos(vlm) if eos_ids is None else eos_ids, tokenizer.pad_token_id)


def _stock_beam(vlm: VLM, batch, beams: int, max_new: int, **kwargs):
    out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs,
                             num_beams=beams, do_sample=False, max_new_tokens=max_new,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    width = batch.input_ids.shape[1]
    return out.sequences[:, width:].tolist(), out.sequences_scores.tolist()


def _strip(tokens: list[int], pad: int) -> list[int]:
    while tokens and tokens[-1] == pad:
        tokens = tokens[:-1]
    return tokens


# --- the penalty as pure functions -------------------------------------------------------------------------

def test_penalty_hand_computed_window():
    # Renormalised window of 3 response rows (the last one is the candidate), sigma = 50.
    window = torch.tensor([[0.5, 0.0, 0.0],
                           [0.25, 0.5, 0.0],
                           [0.1, 0.2, 0.6]])
    scores = square_scores(window, 50.0, faithful=True)
    # column 0: 1e-7 * (25 * 12.5 * 5); column 1: 1e-7 * (25 * 10); column 2: 1e-7 * 30 (float16 subnormals)
    expected = np.array([1e-7 * 25 * 12.5 * 5, 1e-7 * 25 * 10, 1e-7 * 30], dtype=np.float32).astype(np.float16)
    assert scores.tolist() == expected.astype(np.float32).tolist()
    assert expected[1] != np.float32(2.5e-5)  # really rounded (subnormal)
    penalty, location = first_max(scores)
    assert int(location) == 0 and float(penalty) == float(expected[0])
    # Non-faithful: plain float32 products.
    plain = square_scores(window, 50.0, faithful=False)
    assert torch.allclose(plain, torch.tensor([1.5625e-4, 2.5e-5, 3e-6]), rtol=1e-5)


def test_penalty_saturates_and_vanishes_like_float16():
    # One column with weight 1 on 10 rows: 1e-7 * 50**10 ~ 9.8e9 > 65504 -> +inf in float16.
    window = torch.eye(10) * 0.01
    window[:, 0] = 1.0
    scores = square_scores(window, 50.0)
    assert math.isinf(float(scores[0]))
    # Columns 1..8 contain zeros below the diagonal -> 0; the last column is only its diagonal entry,
    # 1e-7 * 50 * 0.01 = 5e-8, which rounds UP to the smallest float16 subnormal 2**-24.
    assert scores[1:9].eq(0).all()
    assert float(scores[9]) == 2.0 ** -24
    log_values = torch.log(torch.tensor([1e-9, 3e-8, 6e-5, 65519.0, 65520.0, 1e6]))
    with np.errstate(over="ignore"):  # 1e6 overflows float16 on purpose
        expected = np.exp(log_values.numpy().astype(np.float32)).astype(np.float16).astype(np.float32)
    assert quantize_scores(log_values, faithful=True).tolist() == expected.tolist()
    # Ties (all zero) resolve to the first column, as the reference's `max(-1)` does.
    _, location = first_max(torch.zeros(2, 5))
    assert location.tolist() == [0, 0]


def test_incremental_scores_equal_square_scores():
    torch.manual_seed(0)
    size, beams, cands = 7, 2, 3
    raw = torch.rand(beams, cands, size, size).tril() + 1e-3
    window = (raw / raw.sum(-1, keepdim=True)).tril()
    window[:, :, :, :] = window[:, :1]  # the rows before the candidate row are shared by the candidates
    window[:, :, -1] = raw[:, :, -1] / raw[:, :, -1].sum(-1, keepdim=True)
    previous = window[:, 0, :-1, :-1]
    column_logs = torch.zeros(beams, size)
    lengths = torch.full((beams,), size - 1)
    rows = torch.arange(size - 1)
    logs = torch.where(rows[:, None] >= rows[None, :], torch.log(previous * 50.0), torch.zeros(()))
    column_logs[:, : size - 1] = logs.sum(dim=1)
    log_scores, valid = window_log_scores(column_logs, window[:, :, -1], lengths, 50.0)
    incremental = quantize_scores(log_scores, faithful=False)
    direct = square_scores(window, 50.0, faithful=False)
    assert valid.all()
    assert torch.allclose(incremental, direct, rtol=1e-4)


def test_mode_and_first_max_match_torch():
    torch.manual_seed(1)
    values = torch.randint(0, 4, (50, 5))
    assert torch.equal(smallest_mode(values), torch.mode(values, dim=-1).values)
    scores = torch.randint(0, 3, (50, 9)).float()
    assert torch.equal(first_max(scores)[1], scores.max(dim=-1).indices)


# --- equivalences with stock transformers -------------------------------------------------------------------

@pytest.mark.parametrize("beams,cands,faithful", [(3, 5, True), (5, 5, True), (3, 5, False), (3, 1, True)])
def test_neutral_settings_equal_stock_beam_search(llava, beams, cands, faithful):
    # With one candidate most chosen tokens are not candidates: the KV of the candidate forward cannot be
    # kept and the chosen tokens are fed instead; both paths must give stock results.
    batch = llava.encode([_image(3)], ["describe this image ."])
    method = OperaDecoding(num_beams=beams, num_attn_candidates=cands, faithful=faithful, **NEUTRAL)
    hyp = _decode(llava, batch, method, 12)[0]
    tokens, scores = _stock_beam(llava, batch, beams, 12)
    assert hyp.token_ids == _strip(tokens[0], 3)
    assert hyp.sequence_score == pytest.approx(scores[0], abs=1e-4)


def test_eos_ends_a_beam_as_in_stock_beam_search(llava):
    batch = llava.encode([_image(0)], ["describe this image ."])
    greedy = _decode(llava, batch, DECODINGS.create("greedy"), 12)[0].token_ids
    # Declare as end-of-sequence a token the model produces early, such that stock beam search's best
    # hypothesis really ends with it.
    for eos in dict.fromkeys(greedy):
        tokens, scores = _stock_beam(llava, batch, 3, 12, eos_token_id=eos)
        stock = _strip(tokens[0], 3)
        if stock[-1] == eos and len(stock) < 12:
            break
    else:
        pytest.fail("no early end-of-sequence token found")
    hyp = _decode(llava, batch, OperaDecoding(num_beams=3, **NEUTRAL), 12, eos_ids=[eos])[0]
    assert hyp.token_ids == stock
    assert hyp.sequence_score == pytest.approx(scores[0], abs=1e-4)


def test_one_beam(llava):
    batch = llava.encode([_image(0)], ["describe this image ."])
    hyp = _decode(llava, batch, OperaDecoding(num_beams=1, **NEUTRAL), 10)[0]
    greedy = _decode(llava, batch, DECODINGS.create("greedy"), 10)[0]
    assert hyp.token_ids == greedy.token_ids
    default = _decode(llava, batch, OperaDecoding(num_beams=1), 10)[0]
    assert len(default.token_ids) == 10


def test_language_model_with_explicit_image_span():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(6.0)
    input_ids = torch.randint(3, 64, (1, 12))
    hyp = opera_generate(model, input_ids, image_span=(2, 8), max_new_tokens=10, num_beams=3, **NEUTRAL)[0]
    out = model.generate(input_ids, num_beams=3, do_sample=False, max_new_tokens=10, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    assert hyp.token_ids == _strip(out.sequences[0, 12:].tolist(), 0)
    assert hyp.sequence_score == pytest.approx(float(out.sequences_scores[0]), abs=1e-4)
    # Default settings run too, and the explicit span is what the image bonus reads.
    default = opera_generate(model, input_ids, image_span=(2, 8), max_new_tokens=24, threshold=2, num_beams=2)
    assert len(default[0].token_ids) >= 1
    assert text_batch(input_ids, image_span=(2, 8)).image_mask[0].nonzero().flatten().tolist() == list(range(2, 8))
    with pytest.raises(InputError):
        opera_generate(model, input_ids, image_span=(2, 40), max_new_tokens=4)


# --- a naive literal port of the reference loop (batch 1) as the oracle for the faithful default ----------

def _prompt_embeds(vlm: VLM, batch) -> torch.Tensor:
    """The language model's input embeddings of the prompt (image features merged), read by a pre-hook."""
    captured = {}

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach()

    handle = vlm.model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        vlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs)
    finally:
        handle.remove()
    return captured["embeds"]


def _naive_forward(vlm: VLM, prompt_embeds: torch.Tensor, response: torch.Tensor):
    """Full recomputation of prompt + response with stock eager attention: last logits and the last layer's
    attention square, max over heads. (Generated tokens are embedded as text, so a generated `<image>` id does
    not count as an image placeholder.)"""
    rows = response.shape[0]
    embeds = torch.cat([prompt_embeds.expand(rows, -1, -1), vlm.model.get_input_embeddings()(response)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    out = vlm.model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    return out.logits[:, -1].float(), out.attentions[-1].float().max(dim=1).values


def naive_opera(vlm: VLM, batch, beams: int, cands: int, scale: float, threshold: int, alpha: float,
                max_new: int, eos_ids: list[int], pad: int, window: int = 512, faithful: bool = True):
    """The reference's `opera_beam_search` transcribed step by step (batch 1, no KV cache). With
    faithful=False, the documented clean-ups: float32 scores, -inf fillers, a location history that follows
    the beams, rejection lists cleared for regenerated positions, a local window of `window` columns."""
    prompt = batch.input_ids.shape[1]
    embeds = _prompt_embeds(vlm, batch)
    image = batch.image_mask[0].nonzero().flatten()
    image_start, image_end = int(image[0]), int(image[-1])
    search = BeamSearch(num_beams=beams)
    state = BeamState.start(1, beams, max_new, pad, batch.input_ids.device)
    response = torch.zeros(beams, 0, dtype=torch.long)
    history_states, history_locs = [], []
    rollback_times: dict[int, int] = {}
    rejected: dict[int, torch.Tensor] = {}
    next_tokens = next_idx = None
    rollbacks = []
    filler = -999.0 if faithful else float("-inf")

    def clone(s):
        return BeamState(*(None if t is None else t.clone() for t in vars(s).values()))

    while True:
        current = {"response": response.clone(), "state": clone(state),
                   "next_tokens": next_tokens, "next_idx": next_idx}
        logits, square = _naive_forward(vlm, embeds, response)
        cand_scores, cand_tokens = torch.topk(logits, cands, dim=-1)
        squares = []
        for c in range(cands):
            _, extended = _naive_forward(vlm, embeds, torch.cat([response, cand_tokens[:, c:c + 1]], 1))
            padded = torch.cat([square, torch.zeros(beams, square.shape[1], 1)], dim=-1)
            squares.append(torch.cat([padded, extended[:, -1:, :]], dim=1))
        attn = torch.stack(squares, dim=1)
        attn = attn / attn.sum(-1, keepdim=True)
        local = scale * attn[:, :, prompt:, prompt:]
        size = local.shape[-1]
        scores = torch.zeros(beams, cands, size, dtype=torch.float16 if faithful else torch.float32)
        for j in range(size):
            value = (1e-7 * local[..., j:, j].prod(-1)).to(torch.float32)
            scores[..., j] = value if faithful else value.clamp(max=1e30)
        if not faithful:
            scores[..., : max(0, size - window)] = float("-inf")
        image_mass = attn[:, :, -1, image_start:image_end + 1].sum(-1)
        top, locs = scores.max(-1)
        location = int(locs.mode().values.mode().values)
        penalty = -image_mass if size <= 10 else top.float()
        history_locs.append(locs.mode().values[:, None])
        gathered = torch.cat(history_locs, -1)
        current["locs"] = gathered.clone()
        counted = gathered if faithful else gathered[:, -window:]
        cand_scores = cand_scores - alpha * penalty
        if len(history_states) >= window:
            history_states.pop(0)
        history_states.append(current)
        rolled = False
        if all(int((g == location).sum()) > threshold for g in counted) and location >= 10:
            target = location + 1
            ok = True
            if rollback_times.get(target, 0) >= cands:
                target -= 1
                ok = rollback_times.get(target, 0) < cands
            restore = min(target, size - 2)
            ok = ok and restore >= size - len(history_states)  # the state to return to is still kept
            if ok:
                rollback_times[target] = rollback_times.get(target, 0) + 1
                for j in range(size - target - 2):
                    history_states.pop(-1)
                    history_locs.pop(-1)
                    if faithful:
                        rejected.pop(window - 1 - j, None)
                response = history_states[-2]["response"]
                state = clone(history_states[-2]["state"])
                banned_tokens, banned_idx = history_states[-1]["next_tokens"], history_states[-1]["next_idx"]
                logits, _ = _naive_forward(vlm, embeds, response)
                history_states.pop(-1)
                history_locs.pop(-1)
                if faithful:
                    rejected.pop(target + 1, None)
                    key = target
                    logits = logits - (999.0 + logits.min(-1, keepdim=True).values)
                else:
                    for position in [p for p in rejected if p > restore]:
                        rejected.pop(position)
                    key = restore
                    history_locs = list(history_states[-1]["locs"].split(1, dim=1))
                flat = logits.reshape(-1)
                banned = banned_idx * logits.shape[-1] + banned_tokens
                if key in rejected:
                    banned = torch.cat([rejected[key], banned])
                rejected[key] = banned
                flat[banned] = filler
                logits = flat.view(beams, -1)
                rolled = True
                rollbacks.append(response.shape[1])
        if not rolled:
            logits = torch.full_like(logits, filler).scatter(1, cand_tokens, cand_scores)
        logprobs = torch.log_softmax(logits, -1)
        source, chosen, done = search.step(state, logprobs, response.shape[1], max_new, eos_ids)
        next_tokens, next_idx = chosen, source
        if done:
            break
        if not faithful:
            history_locs = [h[source] for h in history_locs]
        response = torch.cat([response[source], chosen[:, None]], dim=1)
    return search.finalize(state, eos_ids)[0], rollbacks


@pytest.mark.parametrize("faithful,window,seed", [(True, 512, 4), (False, 8, 1)])
def test_matches_naive_reference_loop(llava, faithful, window, seed):
    # Small threshold and budget so that this short run rolls back several times, with rejection lists
    # accumulating at a position and the budget moving the target from s + 1 to s; window 8 (not faithful)
    # also exercises the local column window, the windowed location count and the capped state history.
    # The image seed is picked so that the tiny model's run rolls back >= 5 times in each setting.
    batch = llava.encode([_image(seed)], ["what is in the image ?"])
    beams, cands, threshold, max_new = 3, 2, 2, 36
    llava.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            expected, naive_rollbacks = naive_opera(llava, batch, beams, cands, 50.0, threshold, 1.0, max_new,
                                                    _eos(llava), 3, window=window, faithful=faithful)
    finally:
        llava.model.set_attn_implementation({"text_config": "sdpa"})
    method = OperaDecoding(num_beams=beams, num_attn_candidates=cands, threshold=threshold, faithful=faithful,
                           window_size=window, beam_rules="stock")  # the naive port uses stock BeamSearch
    hyp = _decode(llava, batch, method, max_new)[0]
    events = hyp.extras["opera"]["rollback_events"]
    assert len(naive_rollbacks) >= 5
    assert any(e["target"] == e["location"] for e in events)  # budget of s + 1 used up: back to s
    assert [e["position"] for e in events] == naive_rollbacks
    assert hyp.token_ids == expected.token_ids
    assert hyp.sequence_score == pytest.approx(expected.sequence_score, abs=1e-4)


# --- rollback on a constructed attention pattern ------------------------------------------------------------

@dataclass
class ColumnMagnet(Intervention):
    """Pulls the last layer's attention onto one key (a response position), creating an aggregation column."""

    layer: int = 3
    key_index: int = 0
    bias: float = 40.0

    def setup(self, run):
        run.plan.add_edit(self.layer, self._edit)

    def _edit(self, logits, ctx):
        if ctx.key_len <= self.key_index:
            return logits
        bump = torch.zeros(ctx.key_len, dtype=logits.dtype, device=logits.device)
        bump[self.key_index] = self.bias
        return logits + bump


def test_forced_aggregation_column_triggers_rollback_and_bans_tokens(llava):
    # An image on which the tiny model keeps talking past response token 12 (no early EOS).
    batch = llava.encode([_image(3)], ["describe this image ."])
    prompt = batch.input_ids.shape[1]
    magnet = ColumnMagnet(layer=3, key_index=prompt + 12)  # response token 12 becomes the summary token
    for beams in (1, 2):
        method = OperaDecoding(num_beams=beams, num_attn_candidates=2, threshold=3)
        hyp = _decode(llava, batch, method, 30, interventions=[magnet])[0]
        events = hyp.extras["opera"]["rollback_events"]
        assert events and events[0]["location"] == 12 and events[0]["position"] == 13
        per_target: dict[int, int] = {}
        for event in events:
            per_target[event["target"]] = per_target.get(event["target"], 0) + 1
            assert event["target"] in (12, 13)
            banned = {tuple(p) for p in event["banned"]}
            assert not banned & {tuple(p) for p in event["chosen"]}
        assert max(per_target.values()) <= 2  # budget: num_attn_candidates rollbacks per position
        last = events[-1]
        if beams == 1:
            banned_tokens = {t for _, t in last["banned"]}
            assert hyp.token_ids[last["position"]] == last["chosen"][0][1]
            assert hyp.token_ids[last["position"]] not in banned_tokens
    # Without the magnet, the same settings roll back elsewhere or not at all.
    plain = _decode(llava, batch, OperaDecoding(num_beams=1, num_attn_candidates=2, threshold=3), 30)[0]
    assert all(e["location"] != 12 for e in plain.extras["opera"]["rollback_events"])


def test_left_padded_batch_equals_each_input_alone(llava):
    images = [_image(1), _image(2)]
    prompts = ["describe this image .", "what is in the picture of a cat on the table ?"]
    method = OperaDecoding(num_beams=3, num_attn_candidates=3, threshold=2)
    batch = llava.encode(images, prompts)
    assert batch.attention_mask[0].eq(0).any()  # really padded
    together = _decode(llava, batch, method, 30)
    assert sum(h.extras["opera"]["rollbacks"] for h in together) > 0
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        alone = _decode(llava, llava.encode([image], [prompt]), method, 30)[0]
        assert together[row].token_ids == alone.token_ids
        assert together[row].sequence_score == pytest.approx(alone.sequence_score, abs=1e-4)
        assert together[row].extras["opera"]["rollback_events"] == alone.extras["opera"]["rollback_events"]


# --- interventions, errors, cleanup ---------------------------------------------------------------------------

@dataclass
class ImageBoostAndBias(Intervention):
    """An attention edit on image keys of one layer plus a logit bias: both must act inside OPERA's forwards."""

    token: int = 7
    supports_rollback: bool = True

    def setup(self, run):
        run.plan.add_edit(1, self._edit)

    def _edit(self, logits, ctx):
        return logits + 2.0 * ctx.image_keys[:, None, None, :].to(logits.dtype)

    def process_logits(self, logits, run, new_tokens):
        logits = logits.clone()
        logits[:, self.token] += 1.5
        return logits


def test_interventions_compose_with_opera(llava):
    batch = llava.encode([_image(3)], ["describe this image ."])
    boost = ImageBoostAndBias()
    hyp = _decode(llava, batch, OperaDecoding(num_beams=3, **NEUTRAL), 12, interventions=[boost])[0]
    beam = _decode(llava, batch, DECODINGS.create("beam", {"num_beams": 3}), 12, interventions=[boost])[0]
    plain = _decode(llava, batch, OperaDecoding(num_beams=3, **NEUTRAL), 12)[0]
    assert hyp.token_ids == beam.token_ids
    assert hyp.sequence_score == pytest.approx(beam.sequence_score, abs=1e-4)
    assert hyp.token_ids != plain.token_ids or hyp.sequence_score != pytest.approx(plain.sequence_score)


def test_intervention_without_rollback_support_is_refused(llava):
    batch = llava.encode([_image(0)], ["describe this image ."])

    @dataclass
    class Stateful(Intervention):
        supports_rollback: bool = False

    with pytest.raises(InputError, match="rollback"):
        _decode(llava, batch, OperaDecoding(num_beams=2), 30, interventions=[Stateful()])
    # With rollback impossible (threshold >= max_new_tokens) it runs.
    _decode(llava, batch, OperaDecoding(num_beams=2, threshold=30), 30, interventions=[Stateful()])


def test_out_of_memory_in_a_rollback_surfaces_and_model_is_restored(llava):
    batch = llava.encode([_image(3)], ["describe this image ."])
    prompt = batch.input_ids.shape[1]

    @dataclass
    class FailInRebuild(Intervention):
        def setup(self, run):
            self.run = run
            run.plan.add_edit(0, self._edit)

        def _edit(self, logits, ctx):
            if ctx.step > 0 and ctx.query_len > 4:  # only the rollback's multi-token re-run
                raise torch.OutOfMemoryError("simulated out of memory")
            return logits

    failing = FailInRebuild()
    before = llava.model.config.text_config._attn_implementation
    with pytest.raises(torch.OutOfMemoryError):
        _decode(llava, batch, OperaDecoding(num_beams=2, num_attn_candidates=2, threshold=3), 30,
                interventions=[ColumnMagnet(key_index=prompt + 12), failing])
    assert llava.model.config.text_config._attn_implementation == before
    last = failing.run.plan.layers[3]
    assert not last.captures  # OPERA's temporary capture is gone
    assert last.last_row_only  # and the engine's prefill shortcut is back


def test_registry_cli_spec_and_yaml():
    method = DECODINGS.parse("opera:num_beams=2,scale_factor=40,image_span=(3,9),faithful=false")
    assert isinstance(method, OperaDecoding)
    assert (method.num_beams, method.scale_factor, method.image_span, method.faithful) == (2, 40.0, (3, 9), False)
    method = DECODINGS.from_config({"name": "opera", "threshold": 25, "num_attn_candidates": 2,
                                    "renormalize_candidates": False})
    assert (method.threshold, method.num_attn_candidates, method.renormalize_candidates) == (25, 2, False)
    assert OperaDecoding() == OperaDecoding(num_beams=5, scale_factor=50.0, threshold=15, num_attn_candidates=5,
                                            penalty_weights=1.0, window_size=512)
    with pytest.raises(InputError):
        DECODINGS.parse("opera:num_beams=0")


@pytest.mark.parametrize("arch", ["qwen2-vl", "llava-next"])
def test_other_families_neutral_equal_beam(arch):
    model, processor = build_tiny(arch)
    vlm = VLM(model, processor, arch)
    size = 48 if arch == "qwen2-vl" else 40
    batch = vlm.encode([_image(3, size)], ["describe this image ."])
    hyp = _decode(vlm, batch, OperaDecoding(num_beams=2, **NEUTRAL), 8)[0]
    beam = _decode(vlm, batch, DECODINGS.create("beam", {"num_beams": 2}), 8)[0]
    assert hyp.token_ids == beam.token_ids
    assert hyp.sequence_score == pytest.approx(beam.sequence_score, abs=1e-4)
    default = vlm.generate(_image(3, size), "describe this image .", max_new_tokens=8, decoding="opera:num_beams=2")
    assert default.token_ids


# --- the rollback's cache rebuild from the kept prompt KV ---------------------------------------------------

def _full_forward_logits(vlm: VLM, image, prompt: str, tokens: list[int]) -> torch.Tensor:
    """Stock forward of one unpadded prompt (image included) followed by `tokens`: the last logits."""
    single = vlm.encode([image], [prompt])
    extra = torch.tensor([tokens], dtype=torch.long)
    inputs = dict(single.model_inputs)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL: appended text tokens are text
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    ids = torch.cat([single.input_ids, extra], dim=1)
    return vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0, -1].float()


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_rollback_rebuild_equals_full_forward(arch):
    """After a rollback the cache is rebuilt from the prompt KV + one forward over each row's response, with
    masked gap entries for inputs whose response is shorter; logits there and after one more token must equal
    a stock forward of prompt + response from scratch."""
    from vlmscope.attention.engine import attention_plan
    from vlmscope.decoding.opera import _OperaSearch

    model, processor = build_tiny(arch)
    vlm = VLM(model, processor, arch)
    size = 48 if arch == "qwen2-vl" else 32
    images = [_image(1, size), _image(2, size)]
    prompts = ["what is in the picture of a cat on the table ?", "describe this image ."]
    batch = vlm.encode(images, prompts)
    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(11, 40, (2, 5), generator=generator), torch.randint(11, 40, (2, 3), generator=generator)]
    following = torch.randint(11, 40, (4,), generator=generator)
    with torch.no_grad(), GenerationRun(model, vlm.adapter, batch, []) as run:
        search = _OperaSearch(OperaDecoding(num_beams=2), run, 8, _eos(vlm), 3)
        search.start()
        for sample, response in zip(search.samples, responses):
            sample.state.running_tokens[0, :, : response.shape[1]] = response
            sample.length = response.shape[1]
        with attention_plan(model, run.plan):
            rebuilt = search._rebuild()
        after = run.advance(following)
        assert run.attention_mask[2:, batch.input_ids.shape[1]:].tolist()[0][:2] == [0, 0]  # the gap
        for row in range(4):
            sample, beam = divmod(row, 2)
            tokens = responses[sample][beam].tolist()
            expected = _full_forward_logits(vlm, images[sample], prompts[sample], tokens)
            assert torch.allclose(rebuilt[row], expected, atol=1e-4), row
            expected = _full_forward_logits(vlm, images[sample], prompts[sample], tokens + [int(following[row])])
            assert torch.allclose(after[row], expected, atol=1e-4), row
