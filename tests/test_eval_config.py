"""Eval configs are validated at every depth: unknown keys, wrong types, out-of-range values, bad method specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmscope.cli import main
from vlmscope.errors import InputError
from vlmscope.eval.config import SCHEMA, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "no-such-model", "batch_size": 2, "decoding": "greedy", "interventions": [],
        "chair": {"prompt": "describe .", "max_new_tokens": 4, "num_images": 2, "seed": 1},
        "pope": {"prompt_suffix": "", "max_new_tokens": 2}}


def _config(tmp_path: Path, **changes) -> Path:
    data = {**BASE, **changes}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, expected", [
    # The two typos old main ignored (it ran with 512 tokens / no suffix).
    ({"chair": {"max_new_token": 32}}, ["'chair.max_new_token'", "max_new_tokens", "prompt"]),
    ({"pope": {"promt_suffix": " Answer yes or no."}}, ["'pope.promt_suffix'", "prompt_suffix"]),
    ({"batch_sise": 4}, ["'batch_sise'", "batch_size"]),
    ({"batch_size": "8"}, ["'batch_size'", "an integer"]),
    ({"batch_size": 0}, ["'batch_size'", ">= 1"]),
    ({"chair": {"max_new_tokens": -5}}, ["'chair.max_new_tokens'", ">= 1"]),
    ({"chair": {"max_new_tokens": True}}, ["'chair.max_new_tokens'", "an integer"]),
    ({"chair": {"num_images": 0}}, ["'chair.num_images'", ">= 1"]),
    ({"chair": "all"}, ["'chair'", "a mapping"]),
    ({"pope": {"rule": "offical"}}, ["'pope.rule'", "official"]),
    ({"dtype": "float17"}, ["'dtype'", "bfloat16"]),
    ({"decoding": "beam:num_beam=5"}, ["'decoding'", "num_beams"]),
    ({"interventions": ["pai:alfa=0.2"]}, ["'interventions[0]'", "alpha"]),
    ({"methods": {"opera": {"num_beam": 5}}}, ["'methods.opera'", "num_beams"]),
    ({"methods": {"operra": {"num_beams": 5}}}, ["'methods.operra'", "opera"]),
])
def test_config_errors_name_file_key_and_known_keys(tmp_path, capsys, changes, expected):
    path = _config(tmp_path, **changes)
    with pytest.raises(InputError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for part in expected:
        assert part in message, message
    # Through the CLI: exit 2, one line, nothing written, before any model loads (the model does not exist).
    out = tmp_path / "run"
    assert main(["eval", "chair", "--config", str(path), "--data-path", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not out.exists()


def test_shipped_configs_are_valid_and_a_method_default_applies(tmp_path):
    for path in sorted((ROOT / "eval_configs").glob("*.yaml")):
        config = load_config(path)
        assert set(vars(config)) == set(SCHEMA)
    from vlmscope.decoding import DECODINGS
    from vlmscope.eval.model_eval import resolve_method

    config = load_config(ROOT / "eval_configs" / "llava-1.5.yaml")
    opera = resolve_method("opera", config.methods, DECODINGS)
    assert (opera.num_beams, opera.scale_factor, opera.threshold) == (5, 50.0, 15)


def test_empty_and_non_mapping_configs(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).model == "tiny-llava"
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n")
    with pytest.raises(InputError, match="top level must be a mapping"):
        load_config(listing)
