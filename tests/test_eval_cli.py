"""CLI: vlmscope chair / pope / compare and the repository-root chair.py, exit codes and JSON output."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from vlmscope.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHAIR_KEYS = ["CHAIR_S", "CHAIR_I", "Recall", "Len", "Precision", "F1"]
GT = {"1": ["dog", "person", "frisbee", "bench"], "2": ["cat", "couch"], "3": ["car"]}
CAPS = [
    {"image_id": 1, "caption": "A man throws a frisbee to a dog. The dog jumps."},
    {"image_id": 2, "caption": "A cat sleeps on a couch next to a laptop."},
    {"image_id": 3, "caption": "Two cars and a truck."},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(GT))
    return {"caps": _jsonl(tmp_path / "caps.jsonl", CAPS), "gt": gt, "tmp": tmp_path}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_chair_json_is_pure_and_save(files, capsys) -> None:
    save = files["tmp"] / "out" / "details.json"
    code = main(["chair", "--captions", str(files["caps"]), "--gt-objects", str(files["gt"]), "--json", "--save", str(save)])
    captured = capsys.readouterr()
    assert code == 0
    metrics = json.loads(captured.out)  # stdout is one JSON document (`| python -m json.tool` works)
    assert list(metrics)[:6] == CHAIR_KEYS and metrics["normaliser"] in ("nltk", "builtin")
    assert metrics["CHAIR_S"] == pytest.approx(200 / 3) and metrics["CHAIR_I"] == pytest.approx(200 / 9)
    assert metrics["Len"] == pytest.approx(10.0)
    assert "CHAIR_S" in captured.err.splitlines()[2]  # the readable table went to stderr
    saved = json.loads(save.read_text())
    assert saved["metrics"] == {k: metrics[k] for k in CHAIR_KEYS} and len(saved["per_caption"]) == 3
    assert [round(v, 6) for v in saved["intervals"]["CHAIR_S"].values()][:3] != [None] * 3
    assert saved["per_caption"][1]["mscoco_hallucinated_words"] == [["laptop", "laptop"]]


def test_chair_custom_keys_and_errors(files, capsys) -> None:
    alt = _jsonl(files["tmp"] / "alt.jsonl", [{"id": c["image_id"], "text": c["caption"]} for c in CAPS])
    args = ["chair", "--captions", str(alt), "--gt-objects", str(files["gt"])]
    assert main([*args, "--image-id-key", "id", "--caption-key", "text", "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["CHAIR_I"] == pytest.approx(200 / 9)
    # unknown key
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no key 'image_id'" in err and "--image-id-key" in err
    # missing file
    assert main(["chair", "--captions", str(files["tmp"] / "missing.jsonl")]) == 2
    assert "captions file not found" in capsys.readouterr().err
    # malformed line
    bad = files["tmp"] / "bad.jsonl"
    bad.write_text('{"image_id": 1, "caption": "x"}\n{"image_id": 2,, }\n')
    assert main(["chair", "--captions", str(bad), "--gt-objects", str(files["gt"])]) == 2
    assert "line 2" in capsys.readouterr().err
    # image absent from the ground truth
    other = _jsonl(files["tmp"] / "other.jsonl", [{"image_id": 77, "caption": "A dog."}])
    assert main(["chair", "--captions", str(other), "--gt-objects", str(files["gt"])]) == 2
    assert "image 77 is not in the ground truth" in capsys.readouterr().err
    assert main(["chair", "--captions", str(other), "--gt-objects", str(files["gt"]), "--missing", "skip"]) == 0


def _coco_annotations(folder: Path) -> Path:
    folder.mkdir()
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 34, "name": "frisbee"}]
    inst = {"categories": cats, "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 34}]}
    (folder / "instances_val2014.json").write_text(json.dumps(inst))
    caps = {"annotations": [{"image_id": 1, "caption": "A man and his dog play frisbee."}]}
    (folder / "captions_val2014.json").write_text(json.dumps(caps))
    return folder


def test_chair_cache_gt_and_annotation_folder(files, capsys) -> None:
    ann = _coco_annotations(files["tmp"] / "annotations")
    out = files["tmp"] / "cache" / "gt.json.gz"
    assert main(["chair", "cache-gt", "--coco-annotations", str(ann), "--out", str(out)]) == 0
    assert "1 images" in capsys.readouterr().out
    caps = _jsonl(files["tmp"] / "one.jsonl", [{"image_id": 1, "caption": "A man with a dog and a cat."}])
    for source in (["--gt-objects", str(out)], ["--coco-annotations", str(ann)]):
        assert main(["chair", "--captions", str(caps), *source, "--json"]) == 0
        metrics = _last_json(capsys.readouterr().out)
        assert metrics["CHAIR_I"] == pytest.approx(100 / 3)  # cat is hallucinated
        assert metrics["Recall"] == pytest.approx(200 / 3)  # person, dog of person, dog, frisbee
    assert main(["chair", "--captions", str(caps), "--coco-annotations", str(files["tmp"] / "none")]) == 2
    assert "not found" in capsys.readouterr().err


def test_pope_score_and_build(tmp_path: Path, capsys) -> None:
    qs = [
        {"question_id": i + 1, "image": "a.jpg", "text": "?", "label": lab}
        for i, lab in enumerate(["yes", "no", "yes", "no"])
    ]
    qfile = _jsonl(tmp_path / "coco_pope_popular.jsonl", qs)
    afile = _jsonl(tmp_path / "ans.jsonl", [{"question_id": i + 1, "text": t} for i, t in enumerate(["Yes", "No", "NO", "yes"])])
    assert main(["pope", "score", "--answers", str(afile), "--questions", str(qfile), "--json"]) == 0
    out = _last_json(capsys.readouterr().out)
    # official: yes no yes("NO") yes vs yes no yes no → TP 2, TN 1, FP 1
    assert out["splits"]["popular"]["Accuracy"] == 75.0 and out["splits"]["popular"]["Yes_ratio"] == 75.0
    assert main(["pope", "score", "--answers", str(afile), "--questions", str(qfile), "--rule", "opera", "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["splits"]["popular"]["Accuracy"] == 50.0
    assert main(["pope", "score", "--answers", str(tmp_path / "nope.jsonl"), "--questions", str(qfile)]) == 2
    assert "not found" in capsys.readouterr().err

    rng = random.Random(0)
    names = ["person", "dog", "cat", "car", "apple", "chair", "cup", "bus"]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(1, 31)]
    anns = [{"image_id": i, "category_id": c} for i in range(1, 31) for c in rng.sample(range(1, 9), rng.randint(1, 5))]
    inst = tmp_path / "instances_val2014.json"
    inst.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}))
    out_dir = tmp_path / "pope"
    assert main(["pope", "build", "--instances", str(inst), "--out", str(out_dir), "--num-images", "8", "--seed", "1"]) == 0
    for split in ("random", "popular", "adversarial"):
        lines = (out_dir / f"coco_pope_{split}.jsonl").read_text().splitlines()
        assert len(lines) == 48 and json.loads(lines[0])["label"] == "yes"
    assert len(json.loads((out_dir / "build_info.json").read_text())["images"]) == 8
    assert main(["pope", "build", "--instances", str(inst), "--out", str(out_dir), "--num-images", "500"]) == 2
    assert "lower --num-images" in capsys.readouterr().err


def test_compare(tmp_path: Path, capsys) -> None:
    for name, s in (("greedy", 45.0), ("opera", 44.6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"task": "chair", "metrics": {"CHAIR_S": s, "CHAIR_I": 12.5}}))
    assert main(["compare", str(tmp_path / "greedy"), str(tmp_path / "opera")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| run | CHAIR_S | CHAIR_I |",
        "|---|---:|---:|",
        "| greedy | 45.0 | 12.5 |",
        "| opera | 44.6 | 12.5 |",
    ]
    assert main(["compare", str(tmp_path / "opera"), "--metrics", "CHAIR_I"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| opera | 12.5 |"
    assert main(["compare", str(tmp_path / "opera"), "--metrics", "BLEU"]) == 2
    assert "unknown metric 'BLEU'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "has no metrics.json" in capsys.readouterr().err


def test_repository_root_chair_script(files, capsys) -> None:
    spec = importlib.util.spec_from_file_location("root_chair", ROOT / "chair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    save = files["tmp"] / "ref.json"
    code = module.main(["--cap_file", str(files["caps"]), "--coco_path", str(files["gt"]), "--save_path", str(save)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["CHAIRs    : 66.7", "CHAIRi    : 22.2"]
    saved = json.loads(save.read_text())
    assert saved["overall_metrics"]["CHAIRs"] == pytest.approx(2 / 3) and len(saved["sentences"]) == 3
    assert module.main(["--cap_file", str(files["tmp"] / "nope.jsonl")]) == 2


def test_compare_shows_what_produced_the_numbers(tmp_path: Path, capsys) -> None:
    runs = {"greedy": ("greedy", [], 512, 45.0), "pai": ("beam:num_beams=5,length_penalty=1.0,early_stopping=false",
                                                       ["pai:alpha=0.2"], 64, 40.0)}
    for name, (decoding, interventions, tokens, s) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "task": "chair", "metrics": {"CHAIR_S": s},
            "settings": {"decoding": decoding, "interventions": interventions, "max_new_tokens": tokens}}))
    assert main(["compare", str(tmp_path / "greedy"), str(tmp_path / "pai")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| run | decoding | interventions | max_new_tokens | CHAIR_S |",
        "|---|---:|---:|---:|---:|",
        "| greedy | greedy | none | 512 | 45.0 |",
        "| pai | beam:num_beams=5,length_penalty=1.0,early_stopping=false | pai:alpha=0.2 | 64 | 40.0 |",
    ]


def test_chair_refuses_empty_and_duplicate_captions(files, capsys) -> None:
    """Old main: an empty captions file scored CHAIR 0.0 (a perfect score), exit 0."""
    empty = files["tmp"] / "empty.jsonl"
    empty.write_text("")
    assert main(["chair", "--captions", str(empty), "--gt-objects", str(files["gt"])]) == 2
    assert "no captions" in capsys.readouterr().err
    dup = _jsonl(files["tmp"] / "dup.jsonl", [*CAPS, CAPS[0]])
    assert main(["chair", "--captions", str(dup), "--gt-objects", str(files["gt"])]) == 2
    assert "image 1 has several captions" in capsys.readouterr().err


def test_shapes_eval_json_is_pure(monkeypatch, capsys) -> None:
    """Old main printed the scenes and a summary line, then one JSON line (`| python -m json.tool` failed)."""
    import vlmscope.shapes.evaluate as shapes_evaluate

    def fake_evaluate(vlm, n, seed, decoding, interventions, progress=None, keep_outputs=False):
        return {"n": n, "seed": seed, "object_recall": 50.0, "pope_accuracy": 75.0, "CHAIR_S": 10.0, "CHAIR_I": 5.0,
                "captions": ["a red circle ."] * n, "answers": []}

    monkeypatch.setattr(shapes_evaluate, "evaluate", fake_evaluate)
    assert main(["shapes-eval", "--n", "2", "--decoding", "beam:num_beams=2", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["decoding"] == "beam:num_beams=2,length_penalty=1.0,early_stopping=false"
    assert doc["CHAIR_I"] == 5.0 and "scene 0" in captured.err
