"""Shared pieces of the reference-parity tests (tests/test_parity_*.py): the fixture, the rebuilt model, batched
generation over the fixture's cases. The fixtures come from tools/parity/<method>/ (reference code, run
unmodified in its own transformers 4.x venv); the model is rebuilt here from its seed and checked by digest."""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity" / "common"))

from parity_model import PARITY_MODELS, case_image, case_prompt, weights_digest  # noqa: E402

from vlmscope.api import VLM  # noqa: E402


def load_fixture(method: str) -> dict[str, Any]:
    return json.loads((ROOT / "tests" / "data" / "parity" / method / "reference.json").read_text())


@cache
def parity_vlm(name: str = "default") -> VLM:
    return PARITY_MODELS[name][0]()


def _image_size(fixture: dict[str, Any]) -> int:
    return fixture["model"].get("image_size", 32)


def check_model_and_inputs(vlm: VLM, fixture: dict[str, Any]) -> None:
    """The rebuilt model is bit-identical to the exported one, and it encodes the cases as the fixture says."""
    assert weights_digest(vlm.model) == fixture["model"]["weights_sha256"]
    for case in fixture["cases"]:
        assert case_prompt(case["index"]) == case["prompt"]
        batch = vlm.encode([case_image(case["index"], _image_size(fixture))], [case["prompt"]])
        ids = batch.input_ids[0].tolist()
        assert ids == case["input_ids"]
        positions = batch.image_mask[0].nonzero().flatten().tolist()
        assert (positions[0], positions[-1] + 1) == (case["img_start"], case["img_end"])


def generate_cases(vlm: VLM, fixture: dict[str, Any], decoding: str, interventions: list[str]) -> list[list[int]]:
    """vlmscope's output ids for every case of the fixture, in one left-padded batch."""
    indices = [case["index"] for case in fixture["cases"]]
    outputs = vlm.generate([case_image(i, _image_size(fixture)) for i in indices], [case_prompt(i) for i in indices],
                           max_new_tokens=fixture["max_new_tokens"], decoding=decoding,
                           interventions=interventions or None)
    return [out.token_ids for out in outputs]


def mismatches(got: list[list[int]], want: list[list[int]]) -> list[tuple[int, int]]:
    """(case, first differing step) for every case whose ids differ."""
    bad = []
    for case, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append((case, step))
    return bad


def generate_case(vlm: VLM, fixture: dict[str, Any], index: int, decoding: str, interventions: list[str]
                  ) -> list[int]:
    """vlmscope's output ids for one case alone (sampling: the generator stream is per input, as the reference's)."""
    out = vlm.generate(case_image(index, _image_size(fixture)), case_prompt(index), max_new_tokens=fixture["max_new_tokens"],
                       decoding=decoding, interventions=interventions or None)
    return out.token_ids
