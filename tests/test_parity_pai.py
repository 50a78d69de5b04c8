"""PAI (+CFG) against LALBJ/PAI's own attention.py and CFG.py (transformers 4.37), token for token.

Fixture: tests/data/parity/pai/reference.json, written by tools/parity/pai/ (see its README for how the reference
is driven). Every setting runs vlmscope's faithful mode on the same tiny model and inputs in one batch.
"""

from __future__ import annotations

import pytest
from parity_support import (
    check_model_and_inputs,
    generate_case,
    generate_cases,
    load_fixture,
    mismatches,
    parity_vlm,
)

FIXTURE = load_fixture("pai")
SETTINGS = FIXTURE["settings"]
METHOD_SETTINGS = [name for name in SETTINGS if not name.startswith("baseline") and not SETTINGS[name]["sample"]]
SAMPLE_SETTINGS = [name for name in SETTINGS if SETTINGS[name]["sample"]]
BEAM_CFG = "cfg_g2_a0.5_l1-4_beam3"


def _vlmscope_spec(setting: dict, case: int = 0) -> tuple[str, list[str]]:
    decoding = "greedy" if setting["beam"] == 1 else f"beam:num_beams={setting['beam']}"
    if setting["sample"]:
        # The reference script's --sample: HF 4.37 defaults (temperature 1, top-k 50, top-p 1), seeded per case.
        decoding = f"sample:seed={setting['sample_seeds'][case]},temperature=1.0,top_k=50,top_p=1.0"
    if not setting["use_attn"]:
        return decoding, []
    spec = f"pai:alpha={setting['alpha']},start={setting['start_layer']},end={setting['end_layer']}"
    if setting["use_cfg"]:
        # Faithful: no boost until the first CFG pass, and the unconditional cache does not follow the beams.
        # Beam search adds the CFG scores unnormalised (cfg_beam_raw_scores), as 4.37's beam search does.
        spec += (f",cfg=true,gamma={setting['gamma']},skip_prefill_with_cfg=true,cfg_reorder_uncond_cache=false,"
                 "cfg_beam_raw_scores=true")
    return decoding, [spec]


def test_fixture_model_and_inputs_rebuild():
    assert FIXTURE["reference"]["repo"] == "LALBJ/PAI" and len(FIXTURE["cases"]) >= 20
    check_model_and_inputs(parity_vlm(), FIXTURE)


def test_reference_settings_change_the_output():
    # A parity test is only informative where the method changes what the model says.
    for name in METHOD_SETTINGS + [n for n in SAMPLE_SETTINGS if not n.startswith("baseline")]:
        setting = SETTINGS[name]
        base = SETTINGS["baseline_sample" if setting["sample"] else
                        "baseline_beam3" if setting["beam"] > 1 else "baseline_greedy"]["output_ids"]
        changed = sum(a != b for a, b in zip(SETTINGS[name]["output_ids"], base, strict=True))
        assert changed >= len(base) // 2 or name == "cfg_g1_a0.5_l1-4_greedy", (name, changed)
    # gamma=1: the reference's processor returns before it ever enables the boost, so nothing changes.
    assert SETTINGS["cfg_g1_a0.5_l1-4_greedy"]["output_ids"] == SETTINGS["baseline_greedy"]["output_ids"]


@pytest.mark.parametrize("name", METHOD_SETTINGS)
def test_pai_matches_reference(name):
    decoding, interventions = _vlmscope_spec(SETTINGS[name])
    got = generate_cases(parity_vlm(), FIXTURE, decoding, interventions)
    assert mismatches(got, SETTINGS[name]["output_ids"]) == []


def test_renormalised_cfg_beam_scores_differ_from_reference():
    # The option the parity depends on: renormalising the CFG scores changes how beams of different parents rank.
    decoding, interventions = _vlmscope_spec(SETTINGS[BEAM_CFG])
    fixed = [interventions[0].replace("cfg_beam_raw_scores=true", "cfg_beam_raw_scores=false")]
    got = generate_cases(parity_vlm(), FIXTURE, decoding, fixed)
    assert len(mismatches(got, SETTINGS[BEAM_CFG]["output_ids"])) >= len(FIXTURE["cases"]) // 2


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("baseline") else n
                                  for n in SAMPLE_SETTINGS])
def test_pai_sampling_matches_reference(name):
    # One input at a time: the reference's multinomial draws come from one RNG stream per case.
    vlm = parity_vlm()
    got = [generate_case(vlm, FIXTURE, case["index"], *_vlmscope_spec(SETTINGS[name], i))
           for i, case in enumerate(FIXTURE["cases"])]
    assert mismatches(got, SETTINGS[name]["output_ids"]) == []
