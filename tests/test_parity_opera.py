"""Parity with the reference code itself: shikiw/OPERA's `opera_beam_search` and the plain beam search of its
vendored transformers 4.29.2, run unmodified by tools/parity/opera/run_reference.py on a tiny random Llama with
a fake image span. The fixtures (tests/data/parity/opera/) hold the tiny model's weights, the prompts, the
reference's output ids, its rollbacks (seen as re-prefills) and every decoding step's top log-probs; here
vlmscope's faithful OPERA and its beam searches run on the same weights and inputs and must agree token for
token."""

from __future__ import annotations

import json
import math
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmscope.decoding import DECODINGS
from vlmscope.decoding.beam import ReferenceBeamSearch
from vlmscope.decoding.opera import TextAdapter, _OperaSearch, opera_generate, text_batch
from vlmscope.decoding.session import GenerationRun

FIXTURES = Path(__file__).parent / "data" / "parity" / "opera"
OPERA_SETTINGS = sorted(p.stem for p in FIXTURES.glob("opera_*.json"))
BEAM_SETTINGS = sorted(p.stem for p in FIXTURES.glob("beam_*.json"))
# Plain beam search under vlmscope's stock transformers-5 rules (the `beam` method) differs from the reference's
# 4.29 rules where a hypothesis that ended with EOS competes with beams that reach the length limit: 4.29 divides
# a score by the length of its input_ids (prompt input_ids included: one dummy BOS with inputs_embeds, the whole
# prompt with input_ids) without the EOS, 5.x by the generated length with the EOS. {setting: seeds}: the only
# runs where that changes the output (one of the two ends with EOS, the other runs to the length limit);
# ReferenceBeamSearch reproduces them all.
STOCK_BEAM_EXCEPTIONS: dict[str, set[int]] = {"beam_3": {10}, "beam_5": {3, 5}, "beam_3_input_ids": {6, 9}}
# Per-step top log-probs: float32 noise between the 4.29 and 5.x forwards, except that the over-trust penalty is
# rounded to float16, so that noise can move a penalty (and the candidate log-probs) by one float16 step.
STEP_ABS_TOLERANCE = 5e-3
STEP_REL_TOLERANCE = 1e-3


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@cache
def _model(weights: str) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    meta = _fixture(OPERA_SETTINGS[0])
    config = LlamaConfig(**meta["model_config"], attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(load_file(str(FIXTURES / weights)), strict=True)
    return model


def _span(run: dict[str, Any]) -> tuple[int, int]:
    position = run["key_position"]  # the reference's inclusive image_end
    assert position["response_start"] == len(run["input_ids"])
    return position["image_start"], position["image_end"] + 1


class _StepRecorder:
    """Records the (processed) log-probs OPERA hands to the beam bookkeeping at every decoding step, the same
    tensor the reference passes through `logits_processor` (its StepLog)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lengths: list[int] = []
        self.top: list[list[float]] = []
        for name in ("_candidate_logprobs", "_rechoice_logprobs"):
            original = getattr(_OperaSearch, name)

            def wrapped(search, *args, _original=original, **kwargs):
                logprobs = _original(search, *args, **kwargs)
                self.lengths.append(search.samples[0].length)
                self.top.append(logprobs.max(dim=-1).values.tolist())
                return logprobs

            monkeypatch.setattr(_OperaSearch, name, wrapped)

    def reset(self) -> None:
        self.lengths, self.top = [], []


def _same_floats(ours: list[list[float]], ref: list[list[float]]) -> bool:
    if len(ours) != len(ref):
        return False
    for row_ours, row_ref in zip(ours, ref):
        for a, b in zip(row_ours, row_ref, strict=True):
            close = abs(a - b) <= STEP_ABS_TOLERANCE + STEP_REL_TOLERANCE * abs(b)
            if math.isnan(a) != math.isnan(b) or (not math.isnan(a) and not close):
                return False
    return True


def test_fixtures_come_from_the_reference():
    for name in OPERA_SETTINGS + BEAM_SETTINGS:
        fixture = _fixture(name)
        assert fixture["reference"] == "shikiw/OPERA"
        assert fixture["reference_commit"].startswith("61426ef")
        assert fixture["transformers"] == "4.29.2"
        assert len({r["seed"] for r in fixture["runs"]}) == len(fixture["runs"]) >= 6
    assert len(_fixture("opera_paper_defaults")["runs"]) >= 20
    # The rollback settings really exercise rollbacks (otherwise they would test nothing the others do not).
    assert sum(r["rollbacks"] for r in _fixture("opera_rollbacks")["runs"]) >= 3
    assert sum(r["rollbacks"] for name in OPERA_SETTINGS for r in _fixture(name)["runs"]) >= 10


@pytest.mark.parametrize("setting", OPERA_SETTINGS)
def test_faithful_opera_equals_reference(setting, monkeypatch):
    fixture = _fixture(setting)
    model = _model(fixture["weights"])
    params = dict(fixture["params"])
    max_new = params.pop("max_new_tokens")
    recorder = _StepRecorder(monkeypatch)
    mismatches = []
    for run in fixture["runs"]:
        recorder.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # num_attn_candidates=1 warns that the penalty is inert
            hyp = opera_generate(model, torch.tensor([run["input_ids"]]), _span(run), max_new_tokens=max_new,
                                 **params)[0]
        extras = hyp.extras["opera"]
        ours = {"output_ids": hyp.token_ids, "rollbacks": extras["rollbacks"],
                "rollback_positions": [event["position"] for event in extras["rollback_events"]],
                "decoding_steps": extras["decoding_steps"], "step_lengths": recorder.lengths}
        ref = {key: run[key] for key in ours}
        if ours != ref or not _same_floats(recorder.top, run["step_top_logprobs"]):
            mismatches.append((run["seed"], ours, ref))
    assert mismatches == []


def _beam(model: torch.nn.Module, method: Any, run: dict[str, Any], max_new: int):
    ids = torch.tensor([run["input_ids"]])
    config = model.generation_config
    with torch.no_grad(), GenerationRun(model, TextAdapter(model, None), text_batch(ids), []) as session:
        return method.decode(session, max_new, [int(config.eos_token_id)], int(config.pad_token_id))[0]


@pytest.mark.parametrize("setting", BEAM_SETTINGS)
def test_reference_beam_rules_equal_reference_beam_search(setting):
    fixture = _fixture(setting)
    model = _model(fixture["weights"])
    max_new = fixture["params"]["max_new_tokens"]
    for run in fixture["runs"]:
        # 4.29 counts the reference's input_ids in a hypothesis' length: one dummy BOS when the prompt went in as
        # inputs_embeds, the whole prompt when it went in as input_ids.
        offset = len(run["input_ids"]) if fixture["kind"] == "beam_input_ids" else 1
        method = ReferenceBeamSearch(num_beams=fixture["params"]["num_beams"], length_offset=offset)
        hyp = _beam(model, method, run, max_new)
        assert hyp.token_ids == run["output_ids"], run["seed"]
        assert hyp.sequence_score == pytest.approx(run["sequence_score"], abs=1e-5)


@pytest.mark.parametrize("setting", BEAM_SETTINGS)
def test_stock_beam_differs_from_reference_only_in_the_listed_runs(setting):
    fixture = _fixture(setting)
    model = _model(fixture["weights"])
    max_new = fixture["params"]["max_new_tokens"]
    method = DECODINGS.create("beam", {"num_beams": fixture["params"]["num_beams"]})
    eos = int(model.generation_config.eos_token_id)
    differing = set()
    for run in fixture["runs"]:
        hyp = _beam(model, method, run, max_new)
        if hyp.token_ids != run["output_ids"]:
            differing.add(run["seed"])
            # The documented cause: one ends with EOS, the other runs to the length limit.
            ends = {hyp.token_ids[-1] == eos, run["output_ids"][-1] == eos}
            runs_to_limit = {len(hyp.token_ids) == max_new, len(run["output_ids"]) == max_new}
            assert ends == runs_to_limit == {True, False}, run["seed"]
    assert differing == STOCK_BEAM_EXCEPTIONS[setting]
