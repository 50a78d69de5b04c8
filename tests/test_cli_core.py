"""The CLI: generate / methods / errors, exit codes and the JSON line."""

from __future__ import annotations

import json

from vlmscope.cli import main


def test_generate_json(image_file, capsys):
    code = main(["generate", "--model", "tiny-llava", "--image", str(image_file), "--prompt",
                 "describe this image .", "--max-new-tokens", "4", "--json", "--decoding", "beam:num_beams=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # one JSON object per input, nothing else on stdout
    row = json.loads(out)
    # The full spec, every parameter: it parses back into the method that ran.
    assert row["decoding"] == "beam:num_beams=2,length_penalty=1.0,early_stopping=false"
    from vlmscope.decoding import DECODINGS
    from vlmscope.decoding.beam import BeamSearch

    assert DECODINGS.parse(row["decoding"]) == BeamSearch(num_beams=2)
    assert row["image_tokens"] == 16
    assert len(row["scores"]) == len(row["token_ids"]) <= 4


def test_methods_lists_registries(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "beam: num_beams=5" in out and "greedy" in out


def test_errors_exit_nonzero_with_one_line(tmp_path, image_file, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    cases = [
        ["generate", "--model", "tiny-llava", "--image", str(bad), "--prompt", "x"],
        ["generate", "--model", "tiny-llava", "--image", str(tmp_path / "missing.png"), "--prompt", "x"],
        ["generate", "--model", str(tmp_path / "nomodel"), "--image", str(image_file), "--prompt", "x"],
        ["generate", "--model", "tiny-llava", "--image", str(image_file), "--prompt", "x", "--decoding", "beam:k=1"],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_explain_rerun_replaces_its_own_files(tmp_path, image_file, capsys):
    """Old main kept the previous run's overlays beside the new run.json."""
    out = tmp_path / "explain"
    base = ["explain", "--model", "tiny-llava", "--image", str(image_file), "--prompt", "describe this image .",
            "--max-new-tokens", "2", "--out", str(out)]
    assert main([*base, "--layers", "1-2", "--reduce", "steps,heads"]) == 0
    assert sorted(p.name for p in out.glob("overlay_*.png")) == ["overlay_l01.png", "overlay_l02.png"]
    capsys.readouterr()
    assert main([*base, "--layers", "3", "--reduce", "steps,heads", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # --json: one JSON document on stdout
    assert sorted(p.name for p in out.glob("overlay_*.png")) == ["overlay_l03.png"]
    assert [str(out / "overlay_l03.png")] == doc["files"]["overlays"]
    run = json.loads((out / "run.json").read_text())
    assert run["output"]["files"]["overlays"] == doc["files"]["overlays"]
