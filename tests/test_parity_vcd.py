"""VCD against DAMO-NLP-SG/VCD's own vcd_sample.py / vcd_add_noise.py and vendored LLaVA (transformers 4.31),
token for token, sampling included.

Fixture: tests/data/parity/vcd/reference.json, written by tools/parity/vcd/ (see its README). The reference seeds
the global RNG per case before the noise and before `generate`; vlmscope gets the same seeds as `noise_seed` and
the sampler's `seed`, so noise and every multinomial draw come from the same streams.
"""

from __future__ import annotations

import pytest
from parity_support import check_model_and_inputs, generate_case, load_fixture, mismatches, parity_vlm

FIXTURE = load_fixture("vcd")
SETTINGS = FIXTURE["settings"]


def _specs(setting: dict, case: int) -> tuple[str, list[str]]:
    decoding = f"sample:seed={setting['sample_seeds'][case]},temperature=1.0,top_k=0,top_p=1.0"
    if not setting["use_cd"]:
        return decoding, []
    return decoding, [f"vcd:alpha={setting['cd_alpha']},beta={setting['cd_beta']},"
                      f"noise_step={setting['noise_step']},noise_seed={setting['noise_seeds'][case]}"]


def test_fixture_model_and_inputs_rebuild():
    assert FIXTURE["reference"]["repo"] == "DAMO-NLP-SG/VCD" and len(FIXTURE["cases"]) >= 20
    assert FIXTURE["embeds_max_abs_diff"] < 1e-6  # the reference's LLaVA merges the image as the 5.x model does
    check_model_and_inputs(parity_vlm(), FIXTURE)


def test_contrast_changes_the_samples():
    base = SETTINGS["baseline_sample"]["output_ids"]
    for name, setting in SETTINGS.items():
        if setting["use_cd"]:
            changed = sum(a != b for a, b in zip(setting["output_ids"], base, strict=True))
            assert changed >= len(base) // 4, (name, changed)


# The reference script's defaults run always; the other settings (and plain sampling) are marked slow to keep the
# default suite fast (about 5 s each on one core).
DEFAULT = "vcd_a1_b0.1_n500"


@pytest.mark.parametrize("name", [n if n == DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in SETTINGS])
def test_vcd_matches_reference(name):
    vlm = parity_vlm()
    setting = SETTINGS[name]
    got = [generate_case(vlm, FIXTURE, case["index"], *_specs(setting, i)) for i, case in enumerate(FIXTURE["cases"])]
    assert mismatches(got, setting["output_ids"]) == []
