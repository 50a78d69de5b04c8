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


def test_demo_writes_the_explorer_page(tmp_path):
    import re

    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny-llava", "--out", str(out), "--n", "2"]) == 0
    page = (out / "explorer.html").read_text()
    assert "explorer.html" in (out / "report.html").read_text()
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S).group(1))
    report = json.loads((out / "report.json").read_text())
    ranked = report["heads"]["ranking"]
    # The top heads' layers are embedded, so the page offers them as the localization-heads reduction.
    assert {layer for layer, _ in ranked} <= set(data["layers"])
    assert len(data["localization_heads"]) == len(ranked)
    assert data["flow"] is not None and data["flow"]["layers"]
