"""`vlmscope demo` runs end to end and writes a report that links what it made."""

from __future__ import annotations

import json

from vlmscope.cli import main


def test_demo_on_tiny_model(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny-llava", "--out", str(out), "--n", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"greedy", "beam"} <= set(report["captions"])
    assert all(len(caps) == 4 for caps in report["captions"].values())
    page = (out / "report.html").read_text()
    for figure in report["figures"]:
        assert figure in page and (out / figure).is_file()
    assert "scene0.png" in page and (out / "scene0.png").is_file()
