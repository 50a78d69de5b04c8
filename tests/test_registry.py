"""Methods as data: parsing specs and configs with the dataclass's own types."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vlmscope.errors import InputError
from vlmscope.registry import Registry


@pytest.fixture()
def registry():
    reg = Registry("thing")

    @reg.register("demo")
    @dataclass
    class Demo:
        alpha: float = 0.2
        layers: tuple[int, int] = (2, 32)
        flag: bool = False
        mode: str = "a"
        span: tuple[int, int] | None = None

    return reg


def test_parse_spec_coerces_types(registry):
    obj = registry.parse("demo:alpha=0.5,layers=(1,3),flag=true,span=(3,9)")
    assert obj.alpha == 0.5 and obj.layers == (1, 3) and obj.flag is True and obj.span == (3, 9)
    assert registry.parse("demo").alpha == 0.2


def test_from_config_mapping(registry):
    obj = registry.from_config({"name": "demo", "alpha": 1, "flag": "no"})
    assert obj.alpha == 1.0 and obj.flag is False
    assert registry.from_config(obj) is obj


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown thing"), ("demo:beta=1", "no parameter 'beta'"), ("demo:alpha=x", "expected float"),
    ("demo:flag=maybe", "true/false"), ("demo:alpha", "key=value"),
])
def test_errors(registry, spec, message):
    with pytest.raises(InputError, match=message):
        registry.parse(spec)


def test_spec_string_round_trips_every_parameter():
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS
    from vlmscope.registry import spec_string

    opera = DECODINGS.parse("opera:num_beams=3,image_span=(4,9),faithful=false")
    text = spec_string(opera)
    assert text.startswith("opera:num_beams=3,") and "image_span=[4,9]" in text and "faithful=false" in text
    assert DECODINGS.parse(text) == opera
    pai = INTERVENTIONS.parse("pai:alpha=0.5,cfg=true")
    assert INTERVENTIONS.parse(spec_string(pai)) == pai
    assert spec_string(DECODINGS.parse("greedy")) == "greedy"


def test_provenance_records_versions_and_specs():
    import transformers

    from vlmscope.decoding import DECODINGS
    from vlmscope.provenance import provenance

    record = provenance(model_id="tiny-llava", decoding=DECODINGS.parse("beam:num_beams=2"), seed=3)
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["decoding"] == "beam:num_beams=2,length_penalty=1.0,early_stopping=false"
    assert record["model"] == "tiny-llava" and record["seed"] == 3
