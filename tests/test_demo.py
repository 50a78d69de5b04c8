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
    assert data["compare"]["label"] == "opera:num_beams=3" and data["compare"]["tokens"]
    # Method parameters are the full registry specs; figure captions are words, not file names.
    assert report["methods"]["beam"].startswith("beam:num_beams=3,")
    html_report = (out / "report.html").read_text()
    assert report["methods"]["beam"] in html_report
    assert "<figcaption>steps.png</figcaption>" not in html_report
    assert report["scene_candidates"] == 12 and len(report["captions"]["greedy"]) == 4


def test_demo_scene_choice_and_hallucination_marks():
    from vlmscope.cli.demo_cmd import _marked_caption, _scenes_that_differ

    captions = {"a": ["x", "y", "z", "w"], "b": ["x", "q", "z", "v"], "c": ["x", "r", "z", "w"]}
    # distinct captions per scene: 1, 3, 1, 2 → the two most different are scenes 1 and 3, in scene order.
    assert _scenes_that_differ(captions, 4, 2) == [1, 3]
    marked = _marked_caption("a red circle and a blue square.", ["circle"])
    assert marked == "a red circle and a blue <mark title='not in the scene'>square.</mark>"
    assert _marked_caption("a <b>", None) == "a &lt;b&gt;"
