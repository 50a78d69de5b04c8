"""FastV against pkunlp-icler/FastV's llava-hf port (its transformers 4.39.0.dev0 fork, `fastv_forward`),
token for token.

Fixture: tests/data/parity/fastv/reference.json, written by tools/parity/fastv/ (see its README). The reference
runs one input at a time; here all cases run in one batch with `rank_per_row=true` (each row ranked on its own
attention, which is what the reference does for its single row). The fork's two paths map to two settings:
`use_cache=True` (ranks once, in the prefill) is `rerank=prefill`, `use_cache=False` (demo-hf.py: recomputes the
whole sequence every step and re-ranks on the newest token) is `rerank=every_step`.
"""

from __future__ import annotations

import pytest
import torch
from parity_support import (
    case_image,
    case_prompt,
    check_model_and_inputs,
    generate_cases,
    load_fixture,
    mismatches,
    parity_vlm,
)

from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions import INTERVENTIONS

FIXTURE = load_fixture("fastv")
SETTINGS = FIXTURE["settings"]
CACHED = [name for name, s in SETTINGS.items() if s["fastv"] and s["use_cache"]]
# use_cache=False (demo-hf.py): the fork recomputes the whole sequence every step and re-ranks the image tokens on
# the newest token's attention; vlmscope's rerank=every_step.
UNCACHED = [name for name, s in SETTINGS.items() if s["fastv"] and not s["use_cache"]]


def test_fixture_model_and_inputs_rebuild():
    assert FIXTURE["reference"]["repo"] == "pkunlp-icler/FastV" and len(FIXTURE["cases"]) >= 20
    check_model_and_inputs(parity_vlm(), FIXTURE)


def test_reference_settings_change_the_output():
    base = SETTINGS["baseline_greedy"]["output_ids"]
    for name in CACHED + UNCACHED:
        changed = sum(a != b for a, b in zip(SETTINGS[name]["output_ids"], base, strict=True))
        assert changed >= len(base) // 2, (name, changed)


def test_uncached_reference_agrees_on_the_first_token():
    # The one step where both reference paths rank on the same (prompt) row: the first generated token.
    for name in UNCACHED:
        s = SETTINGS[name]
        cached = next(n for n in CACHED if (SETTINGS[n]["fastv_k"], SETTINGS[n]["fastv_r"]) == (s["fastv_k"], s["fastv_r"]))
        assert [r[0] for r in s["output_ids"]] == [r[0] for r in SETTINGS[cached]["output_ids"]]
        assert s["output_ids"] != SETTINGS[cached]["output_ids"]


@pytest.mark.parametrize("mode", ["drop", "mask"])
@pytest.mark.parametrize("name", CACHED)
def test_fastv_matches_reference(name, mode):
    s = SETTINGS[name]
    spec = f"fastv:k={s['fastv_k']},ratio={s['fastv_r']},mode={mode},rank_per_row=true"
    got = generate_cases(parity_vlm(), FIXTURE, "greedy", [spec])
    assert mismatches(got, s["output_ids"]) == []


def _spec(s: dict, mode: str, rerank: str) -> str:
    return f"fastv:k={s['fastv_k']},ratio={s['fastv_r']},mode={mode},rank_per_row=true,rerank={rerank}"


@pytest.mark.parametrize("mode", ["drop", "mask"])
@pytest.mark.parametrize("name", UNCACHED)
def test_fastv_rerank_every_step_matches_reference_without_cache(name, mode):
    s = SETTINGS[name]
    got = generate_cases(parity_vlm(), FIXTURE, "greedy", [_spec(s, mode, "every_step")])
    assert mismatches(got, s["output_ids"]) == []


@pytest.mark.parametrize("name", UNCACHED)
def test_ranking_once_does_not_reproduce_the_uncached_reference(name):
    # The re-ranking is what the uncached fixture measures: ranking once misses most of its sequences.
    s = SETTINGS[name]
    got = generate_cases(parity_vlm(), FIXTURE, "greedy", [_spec(s, "drop", "prefill")])
    assert len(mismatches(got, s["output_ids"])) >= len(s["output_ids"]) // 2


def test_rerank_every_step_changes_the_kept_set_and_undoes_its_hooks():
    vlm = parity_vlm()
    case = FIXTURE["cases"][0]
    batch = vlm.encode([case_image(case["index"], FIXTURE["model"]["image_size"])], [case_prompt(case["index"])])
    spec = INTERVENTIONS.parse("fastv:k=2,ratio=0.5,rerank=every_step")
    kept_sets = []
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [spec]) as run:
        state = run.state(spec)
        logits = run.prefill()
        for _ in range(6):
            kept_sets.append(tuple(state._keep[0, : batch.input_ids.shape[1]].nonzero().flatten().tolist()))
            logits = run.advance(logits.argmax(-1))
        assert run.cache.get_seq_length() == batch.input_ids.shape[1]  # no cache grows after the prefill
    n_image = int(batch.image_mask.sum())
    text = batch.input_ids.shape[1] - n_image
    assert all(len(k) == text + round(n_image * 0.5) for k in kept_sets)
    assert len(set(kept_sets)) > 1, "the newest token's ranking must move the kept set at least once"
    assert not any(m._forward_pre_hooks for m in vlm.model.modules())


def test_rerank_every_step_refuses_a_generated_image_placeholder():
    # Fed back as ids, the placeholder would be expanded into another image: a one-line error instead.
    vlm = parity_vlm()
    case = FIXTURE["cases"][0]
    batch = vlm.encode([case_image(case["index"], FIXTURE["model"]["image_size"])], [case_prompt(case["index"])])
    placeholder = int(batch.input_ids[batch.image_mask.bool()][0])
    spec = INTERVENTIONS.parse("fastv:k=2,rerank=every_step")
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [spec]) as run:
        run.prefill()
        with pytest.raises(InputError, match="image placeholder token"):
            run.advance(torch.tensor([placeholder]))
    assert not any(m._forward_pre_hooks for m in vlm.model.modules())
