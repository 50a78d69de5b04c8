"""AAI against Maccusl/AAI's own attention.py and extract.py (transformers 4.37), token for token.

Fixture: tests/data/parity/aai/reference.json, written by tools/parity/aai/ (see its README). Includes the
reference's vis_ref (the vision tower's last-layer attention received per patch) for every case.
"""

from __future__ import annotations

import pytest
import torch
from parity_support import (
    case_image,
    check_model_and_inputs,
    generate_cases,
    load_fixture,
    mismatches,
    parity_vlm,
)

from vlmscope.interventions.aai import vision_reference

FIXTURE = load_fixture("aai")
SETTINGS = FIXTURE["settings"]
METHOD_SETTINGS = [name for name in SETTINGS if not name.startswith("baseline")]


def _vlmscope_spec(setting: dict) -> tuple[str, list[str]]:
    decoding = "greedy" if setting["beam"] == 1 else f"beam:num_beams={setting['beam']}"
    # Faithful defaults: warm-up on (the first 6 generated tokens are unedited), vision reference map.
    return decoding, [f"aai:alpha={setting['alpha']},beta={setting['beta']},start={setting['start_layer']},"
                      f"end={setting['end_layer']},warmup=true,warmup_steps=5,reference=vision"]


def test_fixture_model_and_inputs_rebuild():
    assert FIXTURE["reference"]["repo"] == "Maccusl/AAI" and len(FIXTURE["cases"]) >= 20
    check_model_and_inputs(parity_vlm(), FIXTURE)


def test_vis_ref_matches_reference_extract():
    vlm = parity_vlm()
    for case, want in zip(FIXTURE["cases"], FIXTURE["vis_ref"], strict=True):
        batch = vlm.encode([case_image(case["index"])], [case["prompt"]])
        got = vision_reference(vlm.model, vlm.adapter, batch)[0].float()
        torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)


def test_reference_settings_change_the_output():
    for name in METHOD_SETTINGS:
        base = SETTINGS["baseline_beam3" if SETTINGS[name]["beam"] > 1 else "baseline_greedy"]["output_ids"]
        changed = sum(a != b for a, b in zip(SETTINGS[name]["output_ids"], base, strict=True))
        assert changed >= len(base) // 2, (name, changed)
        # The warm-up: the first 6 generated tokens are the unsteered ones.
        assert all(a[:6] == b[:6] for a, b in zip(SETTINGS[name]["output_ids"], base, strict=True)) or \
            SETTINGS[name]["beam"] > 1


@pytest.mark.parametrize("name", METHOD_SETTINGS)
def test_aai_matches_reference(name):
    decoding, interventions = _vlmscope_spec(SETTINGS[name])
    got = generate_cases(parity_vlm(), FIXTURE, decoding, interventions)
    assert mismatches(got, SETTINGS[name]["output_ids"]) == []
