"""Information-flow truncation against zhangbaijin/From-Redundancy-to-Relevance's modeling_llama_truncation.py
(transformers 4.31 API), token for token.

Fixture: tests/data/parity/truncate/reference.json, written by tools/parity/truncate/ (see its README). The
reference hard-codes LLaVA-1.5's geometry (image tokens 36..611, truncation from layer 22, K = 0), so the parity
model is a 24-layer tiny LLaVA with 576 image tokens and a system message that puts the image at position 36.
"""

from __future__ import annotations

import pytest
from parity_support import check_model_and_inputs, generate_cases, load_fixture, mismatches, parity_vlm

FIXTURE = load_fixture("truncate")
SETTINGS = FIXTURE["settings"]


def test_fixture_model_and_inputs_rebuild():
    assert FIXTURE["reference"]["repo"] == "zhangbaijin/From-Redundancy-to-Relevance"
    assert len(FIXTURE["cases"]) >= 20
    assert all((c["img_start"], c["img_end"]) == (36, 612) for c in FIXTURE["cases"])
    check_model_and_inputs(parity_vlm("truncation"), FIXTURE)


def test_truncation_changes_the_output():
    base = SETTINGS["baseline_greedy"]["output_ids"]
    changed = sum(a != b for a, b in zip(SETTINGS["truncate_l22_k0"]["output_ids"], base, strict=True))
    assert changed >= len(base) // 2


def test_truncate_matches_reference():
    got = generate_cases(parity_vlm("truncation"), FIXTURE, "greedy", ["truncate:layer=22,keep=0"])
    assert mismatches(got, SETTINGS["truncate_l22_k0"]["output_ids"]) == []


@pytest.mark.slow
def test_baseline_matches_stock_4_31():
    got = generate_cases(parity_vlm("truncation"), FIXTURE, "greedy", [])
    assert mismatches(got, SETTINGS["baseline_greedy"]["output_ids"]) == []
