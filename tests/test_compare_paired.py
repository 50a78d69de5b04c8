"""vlmscope compare: paired bootstrap differences over shared images, protocol checks (hand-computed cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmscope.cli import main
from vlmscope.eval.runner import score_chair, score_pope

GT = {i: frozenset({"dog"}) for i in range(1, 9)}


def _chair_run(folder: Path, captions: dict[int, str], protocol: str | None = "opera-500") -> Path:
    folder.mkdir()
    store = folder / "captions.jsonl"
    store.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in captions.items()))
    settings = {"protocol": {"name": protocol} if protocol else None}
    score_chair(list(captions), store, GT, folder, settings, bootstrap=200, normaliser="builtin")
    return folder


def test_paired_difference_of_a_constant_gap(tmp_path: Path, capsys) -> None:
    # Baseline hallucinates a cat in every caption, the other run in none: CHAIR_S 100 vs 0 on every replicate.
    base = _chair_run(tmp_path / "greedy", {i: "a dog and a cat ." for i in range(1, 9)})
    better = _chair_run(tmp_path / "opera", {i: "a dog ." for i in range(1, 9)})
    metrics = json.loads((base / "metrics.json").read_text())
    assert metrics["intervals"]["CHAIR_S"] == [100.0, 100.0] and metrics["bootstrap"]["draws"] == 200
    assert main(["compare", str(base), str(better), "--metrics", "CHAIR_S,CHAIR_I", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cmp = out["comparisons"][0]
    assert cmp["shared_items"] == 8 and cmp["baseline"] == "greedy" and cmp["run"] == "opera"
    s = cmp["metrics"]["CHAIR_S"]
    assert (s["a"], s["b"], s["diff"], s["low"], s["high"]) == (0.0, 100.0, -100.0, -100.0, -100.0)
    assert s["p_value"] == pytest.approx(1 / 1001)
    assert cmp["metrics"]["CHAIR_I"]["diff"] == pytest.approx(-50.0)  # 8 of 16 mentions vs 0 of 8
    assert [r["protocol"] for r in out["runs"]] == ["opera-500", "opera-500"]


def test_paired_over_shared_images_only_and_table(tmp_path: Path, capsys) -> None:
    base = _chair_run(tmp_path / "a", {i: "a dog ." for i in range(1, 9)})
    # Same captions on images 1-4, images 5-8 missing: identical on the shared items.
    other = _chair_run(tmp_path / "b", {i: "a dog ." for i in range(1, 5)})
    assert main(["compare", str(base), str(other), "--metrics", "CHAIR_S"]) == 0
    text = capsys.readouterr().out
    assert "| run | CHAIR_S | protocol |" in text and "| a | 0.0 | opera-500 |" in text
    assert "b − a over 4 shared images" in text
    assert "| CHAIR_S | 0.0 | 0.0 | +0.0 | [+0.0, +0.0] | 1.000 |" in text


def test_different_protocols_are_refused_unless_told(tmp_path: Path, capsys) -> None:
    a = _chair_run(tmp_path / "a", {i: "a dog ." for i in range(1, 5)})
    b = _chair_run(tmp_path / "b", {i: "a dog ." for i in range(1, 5)}, protocol="opera-500-64")
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different protocols" in err and "--allow-protocol-mismatch" in err
    assert main(["compare", str(a), str(b), "--allow-protocol-mismatch"]) == 0
    assert "opera-500-64" in capsys.readouterr().out


def test_pope_runs_compare_by_image(tmp_path: Path, capsys) -> None:
    questions = [{"question_id": 2 * i + k, "image": f"im{i}.jpg", "text": "?", "label": lab, "split": "random"}
                 for i in range(10) for k, lab in enumerate(("yes", "no"))]
    runs = []
    for name, wrong in (("base", {0, 1, 2, 3}), ("new", set())):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{**q, "qkey": f"random:{q['question_id']}",
                 "answer": ("No" if q["label"] == "yes" else "Yes") if int(q["image"][2:-4]) in wrong else q["label"]}
                for q in questions]
        (folder / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        score_pope(questions, folder / "answers.jsonl", "official", folder, {"protocol": None}, bootstrap=100)
        runs.append(folder)
    assert main(["compare", *map(str, runs), "--metrics", "Accuracy", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["comparisons"][0]["metrics"]["Accuracy"]
    # 4 of 10 images answered wrongly (both questions) in the baseline: accuracy 60 → 100.
    assert (acc["b"], acc["a"], acc["diff"]) == (60.0, 100.0, 40.0)
    assert acc["low"] > 0 and acc["p_value"] < 0.05
